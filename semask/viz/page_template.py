"""The HTML, CSS and script of the shareable explorer page (`semask.viz.page`; SeMask, arXiv 2112.12782).

One page, no outside resource: `page_html` puts the title at ``__TITLE__`` and the views as JSON at
``__DATA__``. The script draws the chosen view on a canvas: the picture, then a label map (an RGBA PNG, blended
at the opacity), a probability map (a greyscale picture coloured with the viridis table) or a query's attention
(its window of weights, cell by cell at the cells' pixel edges, coloured with inferno), and the query marks. The
controls carry stable ids (``semask-image``, ``semask-view``, ``semask-stage``, ``semask-class``,
``semask-query``, ``semask-opacity``, ``semask-canvas``); after each drawing the canvas's ``data-draws`` counts
up and ``data-view`` names what it shows, which is what the browser test waits on.
"""
from __future__ import annotations

__all__ = ["PAGE_TEMPLATE"]

PAGE_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; img-src data:; script-src 'unsafe-inline'; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
body { font-family: system-ui, sans-serif; font-size: 14px; margin: 16px 20px; color: #222; }
h1 { font-size: 19px; margin: 0 0 10px 0; }
h2 { font-size: 16px; margin: 22px 0 6px 0; }
.controls { display: flex; flex-wrap: wrap; gap: 6px 16px; align-items: center; margin-bottom: 10px; }
.controls label { display: flex; gap: 6px; align-items: center; }
select:disabled, input:disabled { opacity: 0.45; }
.main { display: flex; gap: 18px; align-items: flex-start; flex-wrap: wrap; }
#semask-canvas { border: 1px solid #ccc; cursor: crosshair; display: block; }
#semask-caption { font-weight: 600; margin-bottom: 4px; }
.side { max-width: 300px; font-size: 13px; line-height: 1.45; }
.legend div { display: flex; align-items: center; gap: 6px; }
.swatch { width: 14px; height: 14px; border: 1px solid #888; flex: none; }
.bar { width: 220px; height: 14px; border: 1px solid #888; }
.ticks { display: flex; justify-content: space-between; width: 222px; font-size: 12px; }
#semask-gamma span { margin-right: 10px; color: #666; }
#semask-gamma b { color: #000; }
.help { font-style: italic; color: #444; margin-top: 6px; }
table { border-collapse: collapse; font-size: 13px; }
td, th { border: 1px solid #ccc; padding: 2px 7px; text-align: right; }
tr.current td { background: #fff6cc; }
.matrix td { width: 38px; font-size: 11px; text-align: center; }
.muted { color: #777; }
</style>
</head>
<body>
<h1 id="semask-title">__TITLE__</h1>
<noscript>This page draws its views with JavaScript; please allow scripts for this file.</noscript>
<div class="controls">
  <label>image <select id="semask-image"></select></label>
  <label>view <select id="semask-view"></select></label>
  <label>stage <select id="semask-stage"></select></label>
  <label>class <select id="semask-class"></select></label>
  <label>query <select id="semask-query"></select></label>
  <label>opacity <input id="semask-opacity" type="range" min="0" max="1" step="0.05"></label>
</div>
<div class="main">
  <div><div id="semask-caption"></div><canvas id="semask-canvas" data-draws="0"></canvas></div>
  <div class="side">
    <div id="semask-legend" class="legend"></div>
    <div id="semask-info"></div>
    <div id="semask-gamma"></div>
  </div>
</div>
<div id="semask-analysis"></div>
<script type="application/json" id="semask-data">__DATA__</script>
<script>
(function () {
"use strict";
const D = JSON.parse(document.getElementById("semask-data").textContent);
const $ = (id) => document.getElementById("semask-" + id);
const canvas = $("canvas"), ctx = canvas.getContext("2d");
const SIDE = 512;  // the canvas's longest side in screen pixels
const ARGMAX = "argmax";
const lut = {};
for (const name in D.luts) {
  const hex = D.luts[name], table = new Uint8Array(768);
  for (let i = 0; i < 768; i++) { table[i] = parseInt(hex.substr(2 * i, 2), 16); }
  lut[name] = table;
}
const pictures = new Map();  // data URI -> decoded image
function picture(uri) {
  if (!pictures.has(uri)) {
    const img = new Image();
    img.src = uri;
    pictures.set(uri, img.decode().then(() => img));
  }
  return pictures.get(uri);
}
const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
const pct = (v, d) => (v === null || v === undefined) ? "-" : (100 * v).toFixed(d === undefined ? 1 : d);
function options(select, items, keep) {
  select.innerHTML = items.map(([v, t]) => `<option value="${esc(v)}">${esc(t)}</option>`).join("");
  if (items.some(([v]) => String(v) === String(keep))) { select.value = String(keep); }
}

// ------------------------------------------------------------------------------------------------ controls
const semantic = D.stages.length > 0;
const views = ["prediction", "ground truth", "error map"].concat(semantic ? ["semantic prior", "semantic attention"] : []);
options($("image"), D.images.map((im, i) => [i, `${i}: ${im.title}`]), 0);
options($("view"), views.map((v) => [v, v]), "prediction");
options($("stage"), D.stages.map((s) => [s.index, `stage ${s.index + 1}`]), D.stages.length ? D.stages[0].index : "");
$("opacity").value = D.opacity;
function image() { return D.images[Number($("image").value)]; }
function imageChanged() {
  const im = image();
  options($("class"), [[ARGMAX, "all classes (argmax)"]].concat(im.classes.map((k) => [k, D.classes[k]])), $("class").value);
  options($("query"), im.points.map((p, i) => [i, `row ${p[0]}, col ${p[1]}`]), $("query").value || Math.floor(D.grid / 2) * (D.grid + 1));
  draw();
}
for (const name of ["view", "stage", "class", "query", "opacity"]) { $(name).addEventListener(name === "opacity" ? "input" : "change", draw); }
$("image").addEventListener("change", imageChanged);
canvas.addEventListener("click", (event) => {
  // the nearest grid point to the clicked pixel of the original image
  const im = image(), rect = canvas.getBoundingClientRect();
  const y = (event.clientY - rect.top) / rect.height * im.size[0], x = (event.clientX - rect.left) / rect.width * im.size[1];
  const clamp = (v) => Math.max(0, Math.min(D.grid - 1, v));
  const i = clamp(Math.round(y / im.size[0] * D.grid - 0.5)), j = clamp(Math.round(x / im.size[1] * D.grid - 0.5));
  $("query").value = String(i * D.grid + j);
  draw();
});

// ------------------------------------------------------------------------------------------------ drawing
function legend(classes, names, colours) {
  return classes.map((k) => `<div><span class="swatch" style="background:${colours[k]}"></span>${esc(names[k])}</div>`).join("");
}
function colourBar(name, vmax, label) {
  const t = lut[name], stops = [];
  for (let i = 0; i <= 16; i++) { const k = Math.min(255, i * 16) * 3; stops.push(`rgb(${t[k]},${t[k + 1]},${t[k + 2]})`); }
  return `<div>${esc(label)}</div><div class="bar" style="background:linear-gradient(to right,${stops.join(",")})"></div>` +
         `<div class="ticks"><span>0</span><span>${vmax < 0.01 ? vmax.toExponential(2) : vmax.toFixed(3)}</span></div>`;
}
function heat(gray, name, alpha, w, h) {
  // a greyscale picture (0..255 = 0..1) through a colour table, as an RGBA canvas of the picture's size
  const off = document.createElement("canvas");
  off.width = w; off.height = h;
  const c = off.getContext("2d");
  c.drawImage(gray, 0, 0, w, h);
  const pixels = c.getImageData(0, 0, w, h), d = pixels.data, t = lut[name], a = Math.round(255 * alpha);
  for (let i = 0; i < d.length; i += 4) { const k = d[i] * 3; d[i] = t[k]; d[i + 1] = t[k + 1]; d[i + 2] = t[k + 2]; d[i + 3] = a; }
  c.putImageData(pixels, 0, 0);
  return off;
}
function attention(att, q, z, alpha) {
  // the query's window (or map) of weights, each cell filled over its pixel box; returns its maximum
  const m = att.maps[att.queries[q][2]], bytes = atob(m.data), t = lut.inferno;
  for (let r = 0; r < m.h; r++) {
    for (let c = 0; c < m.w; c++) {
      const k = bytes.charCodeAt(r * m.w + c) * 3, y0 = att.rows[m.r0 + r] * z, x0 = att.cols[m.c0 + c] * z;
      ctx.fillStyle = `rgba(${t[k]},${t[k + 1]},${t[k + 2]},${alpha})`;
      ctx.fillRect(x0, y0, att.cols[m.c0 + c + 1] * z - x0, att.rows[m.r0 + r + 1] * z - y0);
    }
  }
  return m;
}
function marks(im, att, q, z) {
  const [r, c] = att.queries[q], p = im.points[q];
  const sy = im.shown[0] / im.size[0], sx = im.shown[1] / im.size[1];
  const px = (p[1] + 0.5) * sx * z, py = (p[0] + 0.5) * sy * z;
  ctx.lineWidth = 2;
  if (att.window) {
    const r0 = r - r % att.window, c0 = c - c % att.window;
    const r1 = Math.min(r0 + att.window, att.rows.length - 1), c1 = Math.min(c0 + att.window, att.cols.length - 1);
    ctx.setLineDash([6, 4]); ctx.strokeStyle = "cyan";
    ctx.strokeRect(att.cols[c0] * z, att.rows[r0] * z, (att.cols[c1] - att.cols[c0]) * z, (att.rows[r1] - att.rows[r0]) * z);
    ctx.setLineDash([]);
  }
  ctx.strokeStyle = "white";
  ctx.strokeRect(att.cols[c] * z, att.rows[r] * z, (att.cols[c + 1] - att.cols[c]) * z, (att.rows[r + 1] - att.rows[r]) * z);
  ctx.strokeStyle = "cyan"; ctx.lineWidth = 3;
  ctx.beginPath();
  ctx.moveTo(px - 7, py - 7); ctx.lineTo(px + 7, py + 7); ctx.moveTo(px + 7, py - 7); ctx.lineTo(px - 7, py + 7);
  ctx.stroke();
}
function info(im, view, q) {
  const p = im.points[q], lines = [`<b>${esc(im.title)}</b>`, `${im.size[1]}x${im.size[0]} pixels, run at ${im.input[1]}x${im.input[0]}`];
  lines.push(im.miou === null ? "no ground truth for this image" : `this image: mIoU ${pct(im.miou)}%, pixel accuracy ${pct(im.acc)}%`);
  let query = `query (${p[0]}, ${p[1]}): predicted ${esc(D.classes[p[2]])}`;
  if (p[3] !== null) { query += `, labelled ${p[3] === 255 ? "ignored" : esc(D.classes[p[3]])}`; }
  lines.push(query);
  let note = (view === "ground truth" || view === "error map") && !im.layers[view] ? "This image has no label: the ground-truth and error-map views need one." : D.help[view];
  if (view === "semantic attention") { note += ` This page holds ${D.grid}x${D.grid} query positions: pick one, or click the image for the nearest.`; }
  lines.push(`<div class="help">${esc(note)}</div>`);
  return lines.join("<br>");
}
function gammas(stage, active) {
  if (!semantic) { return `<span>no semantic layers (plain-Swin baseline)</span>`; }
  return "<div>learned gates &gamma;:</div>" + D.stages.map((s) => {
    const text = `stage ${s.index + 1}: ${s.gamma.map((g) => (g >= 0 ? "+" : "") + g.toFixed(3)).join(", ")}`;
    return active && s.index === stage ? `<b>${text}</b>` : `<span>${text}</span>`;
  }).join(" ");
}
let pending = 0;
async function draw() {
  const ticket = ++pending;
  const im = image(), view = $("view").value, stage = Number($("stage").value), q = Number($("query").value);
  const cls = $("class").value, alpha = Number($("opacity").value), isSemantic = view.startsWith("semantic");
  $("stage").disabled = !isSemantic;
  $("class").disabled = view !== "semantic prior";
  const base = await picture(im.picture);
  let layer = null, gray = null;
  const prior = isSemantic ? im.priors[String(stage)] : null;
  if (im.layers[view]) { layer = await picture(im.layers[view].png); }
  if (view === "semantic prior") {
    if (cls === ARGMAX) { layer = await picture(prior.argmax.png); } else { gray = await picture(prior.class[cls]); }
  }
  if (ticket !== pending) { return; }  // a newer change is drawing
  const [h, w] = im.shown, z = SIDE / Math.max(h, w);
  canvas.width = Math.round(w * z); canvas.height = Math.round(h * z);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(base, 0, 0, canvas.width, canvas.height);
  let detail = view, side = "";
  if (layer) {
    ctx.globalAlpha = alpha;
    ctx.drawImage(layer, 0, 0, canvas.width, canvas.height);
    ctx.globalAlpha = 1;
  }
  if (view === "prediction" || view === "ground truth") {
    side = legend(im.layers[view].classes, D.classes, D.palette);
  } else if (view === "error map" && layer) {
    const [right, wrong] = im.layers[view].percent;
    side = legend([0, 1, 2], [`${D.errors.names[0]} ${right.toFixed(1)}%`, `${D.errors.names[1]} ${wrong.toFixed(1)}%`, `${D.errors.names[2]} (bare image)`], D.errors.palette);
  } else if (view === "semantic prior") {
    if (gray) {
      ctx.drawImage(heat(gray, "viridis", alpha, w, h), 0, 0, canvas.width, canvas.height);
      detail = `stage ${stage + 1} semantic prior: ${D.classes[cls]}`;
      side = colourBar("viridis", 1, `P(${D.classes[cls]}) in the stage ${stage + 1} prior`);
    } else {
      detail = `stage ${stage + 1} semantic prior: argmax over classes`;
      side = legend(prior.argmax.classes, D.classes, D.palette);
    }
  } else if (view === "semantic attention") {
    const att = im.attention[String(stage)], m = attention(att, q, z, alpha);
    marks(im, att, q, z);
    const kind = att.window ? `${att.window}x${att.window} windows` : "global";
    detail = `stage ${stage + 1} semantic attention (${kind}, ${att.rows.length - 1}x${att.cols.length - 1} tokens)`;
    side = colourBar("inferno", m.max, "attention weight");
  }
  if (!layer && !gray && view !== "semantic attention" && view !== "prediction") { detail = `${view}: no ground truth for this image`; }
  $("caption").textContent = `${im.title}: ${detail}`;
  $("legend").innerHTML = side;
  $("info").innerHTML = info(im, view, q);
  $("gamma").innerHTML = gammas(stage, isSemantic);
  analysisTable(stage);
  canvas.dataset.view = [Number($("image").value), view, isSemantic ? stage : "", view === "semantic prior" ? cls : "", view === "semantic attention" ? q : ""].join("|");
  canvas.dataset.draws = String(Number(canvas.dataset.draws) + 1);
}

// ------------------------------------------------------------------------------------------------ analysis
function analysisTable(stage) {
  const A = D.analysis, box = $("analysis");
  if (!A) { return; }
  const rows = A.stages.map((s) => {
    const extent = !s.semantic ? "-" : (s.window_size ? `${s.window_size}x${s.window_size}` : "global");
    const gamma = s.gamma ? s.gamma.map((g) => g.toFixed(3)).join(", ") : "-";
    const cells = [`${s.stage} (/${s.stride})`, extent, pct(s.prior_mIoU), pct(s.prior_mAcc), pct(s.prior_aAcc),
                   pct(s.same_class_attention), pct(s.same_class_chance),
                   s.attention_entropy === null ? "-" : s.attention_entropy.toFixed(3),
                   s.attention_distance_px === null ? "-" : s.attention_distance_px.toFixed(1), gamma];
    return `<tr class="${s.stage === stage + 1 ? "current" : ""}">` + cells.map((c) => `<td>${esc(c)}</td>`).join("") + "</tr>";
  });
  const head = ["stage", "attention", "prior mIoU", "prior mAcc", "prior aAcc", "same-class", "chance", "entropy", "distance px", "gamma"];
  let out = `<h2>Over the split (${A.num_images} images)</h2><table id="semask-analysis-table"><tr>` +
            head.map((h) => `<th>${h}</th>`).join("") + "</tr>" + rows.join("") + "</table>" +
            `<p>Decoder prior: mIoU ${pct(A.decoder_prior_mIoU)}, mAcc ${pct(A.decoder_prior_mAcc)}, aAcc ${pct(A.decoder_prior_aAcc)}. ` +
            `Prediction: mIoU ${pct(A.mIoU)}, mAcc ${pct(A.mAcc)}, aAcc ${pct(A.aAcc)}. ` +
            `<span class="muted">Percent, except entropy (0..1) and distance (pixels of the model's input).</span></p>`;
  const s = A.stages.find((x) => x.stage === stage + 1);
  if (s && s.class_attention && A.classes.length <= 30) {
    const t = lut.viridis;
    out += `<h2>Stage ${s.stage}: where each class's attention goes (row: query class, column: key class, percent)</h2><table class="matrix"><tr><th></th>` +
           A.classes.map((n) => `<th>${esc(n)}</th>`).join("") + "</tr>" +
           s.class_attention.map((row, a) => `<tr><th>${esc(A.classes[a])}</th>` + row.map((v) => {
             if (v === null) { return "<td>-</td>"; }
             const k = Math.round(Math.max(0, Math.min(1, v)) * 255) * 3, ink = v > 0.6 ? "#000" : "#fff";
             return `<td style="background:rgb(${t[k]},${t[k + 1]},${t[k + 2]});color:${ink}">${pct(v, 0)}</td>`;
           }).join("") + "</tr>").join("") + "</table>";
  }
  box.innerHTML = out;
}
imageChanged();
})();
</script>
</body>
</html>
"""
