"""The attention explorer in a real browser: JupyterLab, headless Chromium, notebook 07 run from the page.

The test starts JupyterLab on a free loopback port with a one-time token and its own configuration, runtime, data,
settings and workspace folders (nothing of the user's Jupyter setup is read or written), opens a copy of
`notebooks/07_attention_explorer.ipynb` in Debian's Chromium (`/usr/bin/chromium`, driven by Playwright; no
browser download), runs all cells, waits for the explorer to render, then changes the image, the stage and the query
pixel (a mouse click on the figure) and checks each time that the pixels of the rendered figure changed; last it
switches to the "all stages" view, whose own figure must take the one-panel figure's place and render.
Screenshots are written to ``$SEMASK_TEST_ARTIFACTS/browser`` (or a temporary folder), printed at the end.

It is skipped only when no Chromium executable exists (``apt-get install -y chromium`` provides one; `.ci/run`
installs it). JupyterLab, its kernels and the browser are shut down at the end, also when the test fails.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import pytest

from helpers import CHROMIUM_FLAGS, chromium_executable

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "07_attention_explorer.ipynb"
SERVER_START_S = 120  # JupyterLab start on a busy 2-core machine
RUN_ALL_S = 300  # the notebook's cells, run by the page's kernel
REDRAW_S = 60  # a control change until the canvas shows it

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Every live descendant of process `pid` (Linux /proc), so kernels in their own sessions are found too."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _end(pids: list[int], timeout: float = 10.0) -> None:
    """SIGTERM the given processes (ours), then SIGKILL those still alive after `timeout`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not any(_alive(p) for p in pids):
            return


@contextlib.contextmanager
def jupyter_lab(workdir: Path, home: Path, log_path: Path) -> Iterator[str]:
    """Run JupyterLab on a free loopback port; yields its base URL with the token as query."""
    port, token = _free_port(), os.urandom(16).hex()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "JPY_"))}
    env.update(JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_RUNTIME_DIR=str(home / "runtime"),
               JUPYTER_DATA_DIR=str(home / "data"), IPYTHONDIR=str(home / "ipython"),
               MPLCONFIGDIR=str(home / "matplotlib"), JUPYTER_PLATFORM_DIRS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])),
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
               SEMASK_NOTEBOOKS="ci")  # the notebook's small CI setting (see notebooks/conftest.py)
    env.pop("MPLBACKEND", None)  # the kernel's default (inline) backend, as for a user
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={workdir}", "--ServerApp.allow_root=True", "--LabApp.expose_app_in_browser=True",
               f"--LabApp.user_settings_dir={home / 'settings'}", f"--LabApp.workspaces_dir={home / 'workspaces'}",
               "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
               "--LabApp.extension_manager=readonly"]  # nothing is fetched from the network
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir,
                                  start_new_session=True)
    kernels: set[int] = set()
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with code {server.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"JupyterLab did not answer within {SERVER_START_S} s:\n"
                                   f"{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"{base}/lab/tree/{{path}}?token={token}"
        kernels.update(_children(server.pid))
    finally:
        kernels.update(_children(server.pid))
        request = urllib.request.Request(f"{base}/api/shutdown", method="POST",
                                         headers={"Authorization": f"token {token}"})
        with contextlib.suppress(OSError):
            urllib.request.urlopen(request, timeout=10).close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=20)
        _end([server.pid] + sorted(kernels))
        server.wait(timeout=10)


def _wait(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


NOTEBOOK_STATE_JS = """() => {
    const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    if (!panel || !panel.sessionContext || !panel.content || !panel.content.widgets) { return null; }
    const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
    const cells = panel.content.widgets.filter(c => c.model.type === "code");
    const errors = [];
    for (const cell of cells) {
        for (const output of cell.model.outputs.toJSON()) {
            if (output.output_type === "error") { errors.push(output.ename + ": " + output.evalue); }
        }
    }
    return {kernel: kernel ? kernel.status : null, cells: cells.length,
            executed: cells.filter(c => c.model.executionCount !== null).length, errors: errors};
}"""


def test_explorer_notebook_in_jupyterlab_and_chromium(tmp_path: Path) -> None:
    chromium = chromium_executable()
    from playwright.sync_api import sync_playwright  # a dev dependency: missing it is an error, not a skip

    artifacts = Path(os.environ.get("SEMASK_TEST_ARTIFACTS", tmp_path / "artifacts")) / "browser"
    artifacts.mkdir(parents=True, exist_ok=True)
    workdir, home = tmp_path / "work", tmp_path / "jupyter-home"
    workdir.mkdir()
    home.mkdir()
    shutil.copy(NOTEBOOK, workdir / NOTEBOOK.name)  # the page may autosave: never touch the repository's file
    settings = home / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)  # no "get notified about Jupyter news?" toast over the screenshots
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    hashes: dict[str, str] = {}

    with jupyter_lab(workdir, home, artifacts / "jupyterlab.log") as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), headless=True, args=CHROMIUM_FLAGS)
        console: list[str] = []  # the page's console, saved with the screenshots
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
            page.goto(url.format(path=NOTEBOOK.name), timeout=SERVER_START_S * 1000)
            page.wait_for_function(f"({NOTEBOOK_STATE_JS})() !== null && ({NOTEBOOK_STATE_JS})().kernel === 'idle'",
                                   timeout=SERVER_START_S * 1000, polling=500)
            page.evaluate("window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs')")
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")

            def ran_all() -> bool:
                state = page.evaluate(f"({NOTEBOOK_STATE_JS})()")
                if state["errors"]:
                    page.screenshot(path=str(artifacts / "error.png"), full_page=True)
                    raise AssertionError(f"a cell failed in the browser: {state['errors']}")
                return state["executed"] == state["cells"] and state["kernel"] == "idle"

            _wait(ran_all, RUN_ALL_S, "all cells of the notebook to run")
            explorer = page.locator(".semask-explorer").first
            explorer.wait_for(state="visible", timeout=REDRAW_S * 1000)
            canvas = explorer.locator("canvas").first
            canvas.wait_for(state="visible", timeout=REDRAW_S * 1000)
            explorer.scroll_into_view_if_needed()

            def figure_hash(target) -> str:
                return hashlib.sha256(target.screenshot()).hexdigest()

            def settled(name: str, previous: str | None, target=canvas) -> str:
                """Wait until the `target` canvas differs from `previous` and holds still, then save screenshots."""
                state = {"last": None}

                def ready() -> bool:
                    now = figure_hash(target)
                    done = now != previous and now == state["last"]
                    state["last"] = now
                    return done

                _wait(ready, REDRAW_S, f"the figure to redraw after: {name}", interval=1.0)
                explorer.screenshot(path=str(artifacts / f"{name}.png"))
                hashes[name] = state["last"]
                return state["last"]

            blank = hashlib.sha256(b"").hexdigest()
            first = settled("1-after-run-all", blank)
            page.screenshot(path=str(artifacts / "1-page.png"))

            image = explorer.locator(".semask-image select")
            options = image.locator("option").all_inner_texts()
            assert len(options) == 4, f"expected the 4 toy scenes in the image control, got {options}"
            image.select_option(label=options[1])
            second = settled("2-image-1", first)

            explorer.locator(".semask-stage button", has_text="stage 1").click()
            third = settled("3-stage-1", second)
            row_before = explorer.locator(".semask-row .widget-readout").inner_text()

            box = canvas.bounding_box()  # the figure; ipympl's event canvas lies on top of it
            page.mouse.click(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.3)  # on the image
            settled("4-clicked-query", third)
            row_after = explorer.locator(".semask-row .widget-readout").inner_text()
            assert row_after != row_before, "a click on the image should move the query pixel (row slider)"
            page.screenshot(path=str(artifacts / "4-page.png"))

            explorer.locator(".semask-view button", has_text="all stages").click()
            grid = explorer.locator(".semask-stage-grid canvas").first
            grid.wait_for(state="visible", timeout=REDRAW_S * 1000)
            settled("5-all-stages", blank, target=grid)
            assert not canvas.is_visible(), "the all-stages figure should take the one-panel figure's place"
            page.screenshot(path=str(artifacts / "5-page.png"))
        finally:
            (artifacts / "console.log").write_text("\n".join(console))
            browser.close()
    assert len(set(hashes.values())) == len(hashes), f"every change should redraw the figure: {hashes}"
    print(f"\nbrowser-test screenshots in {artifacts}: {sorted(p.name for p in artifacts.glob('*.png'))}")
    (artifacts / "hashes.json").write_text(json.dumps(hashes, indent=1))
