"""The measurements of `semask benchmark` (SeMask FPN, arXiv 2112.12782), each run in the calling process.

`run_task` runs one of them on a freshly built model; `semask.apps.benchmark.runner` calls it in a spawned
process per measurement (docs/design.md, "Apps").
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

import semask
from semask.apps.benchmark.config import BenchmarkConfig
from semask.apps.benchmark.timing import count_flops, synchronize, time_it
from semask.device import PeakMemory, autocast, autocast_dtype, keep_freed_memory
from semask.engine.losses import semask_loss
from semask.errors import UnknownNameError, UsageError

__all__ = ["build_model", "random_images", "bench_inference", "interleaved_speedup", "prediction_agreement",
           "bench_train", "bench_protocols", "bench_eval_memory", "bench_data", "bench_onnxruntime", "run_task"]


def build_model(cfg: BenchmarkConfig, device: torch.device) -> torch.nn.Module:
    """The model to measure (seeded fresh weights, or the checkpoint's), on `device`, channels-last if asked."""
    torch.manual_seed(0)
    if cfg.checkpoint:
        model = semask.load_checkpoint(cfg.checkpoint)
        model.set_grad_checkpointing(cfg.grad_checkpointing)
    else:
        model = semask.create_model(cfg.model, num_classes=cfg.num_classes,
                                    grad_checkpointing=cfg.grad_checkpointing)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def random_images(cfg: BenchmarkConfig, batch: int, device: torch.device) -> torch.Tensor:
    """(batch, 3, H, W) seeded normal noise at `cfg.size`, channels-last if asked."""
    x = torch.randn(batch, 3, *cfg.size, generator=torch.Generator().manual_seed(0)).to(device)
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x


def _infer(forward: Callable, x: torch.Tensor, device: torch.device, precision: str) -> Any:
    with torch.inference_mode(), autocast(device, autocast_dtype(precision, device)):
        return forward(x)


def bench_inference(cfg: BenchmarkConfig, model: torch.nn.Module, device: torch.device,
                    forward: Callable) -> dict[str, Any]:
    """Forward-pass latency, throughput, FLOPs and peak memory at `cfg.batch_size`; for bf16/fp16 also the speed-up
    over fp32 (`interleaved_speedup`) and the agreement of the predictions with fp32 (`prediction_agreement`)."""
    model.eval()
    x = random_images(cfg, cfg.batch_size, device)
    with PeakMemory(device) as mem:
        stats = time_it(lambda: _infer(forward, x, device, cfg.precision), cfg.warmup, cfg.repeats, device)
    # after timing: its memory is not the model's
    with torch.inference_mode(), autocast(device, autocast_dtype(cfg.precision, device)):
        flops = count_flops(lambda: model(x)) / cfg.batch_size
    out = {"batch_size": cfg.batch_size, "latency": stats, "images_per_s": cfg.batch_size / stats["median_s"],
           "flops_per_image": flops, "achieved_flops": flops * cfg.batch_size / stats["median_s"],
           "peak_memory_bytes": mem.peak_bytes, "baseline_memory_bytes": mem.baseline_bytes}
    if cfg.precision != "fp32":
        out["speedup_vs_fp32"] = interleaved_speedup(forward, x, device, cfg.precision, cfg.warmup, cfg.repeats)
        out["agreement_with_fp32"] = prediction_agreement(model, device, cfg.precision, cfg.size,
                                                          cfg.agreement_images, cfg.agreement_root)
        out["agreement_with_fp32"]["images"] = cfg.agreement_root or "toy scenes (render_scene)"
    return out


def interleaved_speedup(forward: Callable, x: torch.Tensor, device: torch.device, precision: str, warmup: int,
                        repeats: int) -> dict[str, float]:
    """Median fp32 and `precision` latencies timed alternately in one process, and their ratio (``speedup``)."""
    for _ in range(warmup):
        _infer(forward, x, device, "fp32")
        _infer(forward, x, device, precision)
    times: dict[str, list[float]] = {"fp32": [], precision: []}
    for _ in range(repeats):
        for p in ("fp32", precision):
            synchronize(device)
            start = time.perf_counter()
            _infer(forward, x, device, p)
            synchronize(device)
            times[p].append(time.perf_counter() - start)
    fp32, low = statistics.median(times["fp32"]), statistics.median(times[precision])
    return {"fp32_median_s": fp32, f"{precision}_median_s": low, "speedup": fp32 / low}


def _agreement_scenes(size: tuple[int, int], images: int, root: Optional[str]) -> list[np.ndarray]:
    """The (H, W, 3) uint8 images `prediction_agreement` compares on."""
    if root is None:
        from semask.data.toy import render_scene

        rng = np.random.default_rng(0)
        return [render_scene(rng, size=max(size))[0][: size[0], : size[1]] for _ in range(images)]
    from semask.data.images import read_rgb

    files = sorted((Path(root) / "images" / "validation").glob("*.jpg"))[:images]
    if not files:
        raise UsageError(f"--agreement-root {root}: no images/validation/*.jpg there (ADE20K or toy layout)")
    return [read_rgb(f) for f in files]  # each validation image at its own size (the toy set's test scale)


def prediction_agreement(model: torch.nn.Module, device: torch.device, precision: str, size: tuple[int, int],
                         images: int, root: Optional[str] = None) -> dict[str, float]:
    """How far `precision` autocast changes the predictions of `model`, on built-in toy scenes at `size`, or on the
    first `images` validation images of the dataset at `root` (``images/validation/*.jpg``, e.g. the toy set that
    a trained toy model saw; each at its own size).

    Returns:
        `pixel_agreement`: fraction of pixels with the same predicted class as in fp32;
        `mean_abs_logit_error`: mean |logit difference| from fp32;
        `near_tie_fraction`: fraction of pixels whose fp32 top-2 logit margin is below 4x that error (where a
        prediction can flip by rounding alone); `disagreement_in_near_ties`: the share of all disagreeing
        pixels that are near-ties.

    Raises:
        UsageError: `root` holds no ``images/validation/*.jpg``.
    """
    from semask.engine.inference import normalize

    scenes = _agreement_scenes(size, images, root)
    same = total = near = disagree = disagree_near = 0
    err_sum = 0.0
    for scene in scenes:
        x = normalize(torch.from_numpy(scene).permute(2, 0, 1)[None].float().to(device))
        ref = _infer(model, x, device, "fp32").logits.float()
        low = _infer(model, x, device, precision).logits.float()
        err = (ref - low).abs().mean()
        top2 = ref.topk(2, dim=1).values
        tie = (top2[:, 0] - top2[:, 1]) < 4 * err
        diff = ref.argmax(1) != low.argmax(1)
        same += (~diff).sum().item()
        total += diff.numel()
        near += tie.sum().item()
        disagree += diff.sum().item()
        disagree_near += (diff & tie).sum().item()
        err_sum += err.item()
    return {"pixel_agreement": same / total, "mean_abs_logit_error": err_sum / len(scenes),
            "near_tie_fraction": near / total,
            "disagreement_in_near_ties": disagree_near / disagree if disagree else 1.0}


def bench_train(cfg: BenchmarkConfig, model: torch.nn.Module, device: torch.device,
                forward: Callable) -> dict[str, Any]:
    """Training-step time (zero_grad, forward, SeMask loss, backward, AdamW step), FLOPs and peak memory at
    `cfg.train_batch_size`."""
    model.train()
    x = random_images(cfg, cfg.train_batch_size, device)
    y = torch.randint(0, cfg.num_classes, (cfg.train_batch_size, *cfg.size), device=device)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4, fused=fused, foreach=not fused)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(device, autocast_dtype(cfg.precision, device)):
            loss = semask_loss(forward(x), y).total
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def fwd_bwd() -> None:
        with autocast(device, autocast_dtype(cfg.precision, device)):
            loss = semask_loss(model(x), y).total
        loss.backward()

    with PeakMemory(device) as mem:
        stats = time_it(step, cfg.warmup, cfg.repeats, device)
    opt.zero_grad(set_to_none=True)
    flops = count_flops(fwd_bwd) / cfg.train_batch_size  # after timing: its memory is not the model's
    return {"batch_size": cfg.train_batch_size, "step": stats,
            "images_per_s": cfg.train_batch_size / stats["median_s"], "flops_per_image": flops,
            "achieved_flops": flops * cfg.train_batch_size / stats["median_s"], "peak_memory_bytes": mem.peak_bytes,
            "baseline_memory_bytes": mem.baseline_bytes,
            "optimizer": "AdamW (fused)" if fused else "AdamW (foreach)",
            "grad_checkpointing": cfg.grad_checkpointing}


def bench_protocols(cfg: BenchmarkConfig, model: torch.nn.Module, device: torch.device) -> dict[str, Any]:
    """Whole-image and multi-scale + flip inference (`semask.Predictor`) on one random `cfg.protocol_size` image,
    each also relative to the bare forward pass on the image as the single-scale protocol rescales it."""
    from semask.data.transforms import rescale_size, resize_image
    from semask.engine.inference import Predictor, normalize

    model.eval()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(*cfg.protocol_size, 3), dtype=np.uint8)
    amp = autocast_dtype(cfg.precision, device)
    out: dict[str, Any] = {"image_size": list(cfg.protocol_size)}
    # the model's forward pass alone on the image as the single-scale protocol rescales it: the protocol's cost
    # beyond it (resizing, normalising, argmax back at the original size) is what `semask test` adds
    whole = Predictor(model, mode="whole", device=device, amp_dtype=amp)
    size = rescale_size(*cfg.protocol_size, whole.scale)
    img = torch.from_numpy(image).permute(2, 0, 1)[None].to(device)  # 1, 3, H, W uint8
    x = normalize(resize_image(img, size).float() if size != tuple(cfg.protocol_size) else img.float())
    x = x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x
    forward_stats = time_it(lambda: _infer(model, x, device, cfg.precision), warmup=1,
                            repeats=cfg.protocol_repeats, device=device)
    out["forward"] = {"latency": forward_stats, "input_size": list(size)}
    for mode in ("whole", "msflip"):
        predictor = whole if mode == "whole" else Predictor(model, mode=mode, device=device, amp_dtype=amp)
        with PeakMemory(device) as mem:
            stats = time_it(lambda: predictor.predict_labels(image), warmup=1, repeats=cfg.protocol_repeats,
                            device=device)
        out[mode] = {"latency": stats, "images_per_s": 1.0 / stats["median_s"], "peak_memory_bytes": mem.peak_bytes,
                     "baseline_memory_bytes": mem.baseline_bytes,
                     "relative_to_forward": stats["median_s"] / forward_stats["median_s"]}
    return out


def bench_eval_memory(cfg: BenchmarkConfig, model: torch.nn.Module, device: torch.device,
                      count: int) -> dict[str, Any]:
    """Peak memory of whole-image inference + metric accumulation over `count` random images."""
    from semask.engine.inference import Predictor
    from semask.engine.metrics import SegmentationMetric

    model.eval()
    predictor = Predictor(model, mode="whole", device=device, scale=(2048, min(cfg.size)))
    rng = np.random.default_rng(0)
    metric = SegmentationMetric(cfg.num_classes, device=device)
    with PeakMemory(device) as mem:
        for _ in range(count):
            image = rng.integers(0, 256, size=(*cfg.size, 3), dtype=np.uint8)
            label = rng.integers(0, cfg.num_classes, size=cfg.size)
            metric.update(torch.from_numpy(predictor(image)), torch.from_numpy(label))
        metric.compute()
    return {"images": count, "peak_memory_bytes": mem.peak_bytes, "baseline_memory_bytes": mem.baseline_bytes}


def bench_data(cfg: BenchmarkConfig) -> dict[str, Any]:
    """Images per second per worker core through the training pipeline (`measure_pipeline_throughput`)."""
    from semask.data.loader import measure_pipeline_throughput

    return measure_pipeline_throughput(num_images=cfg.data_images, size=cfg.protocol_size)


def bench_onnxruntime(cfg: BenchmarkConfig, model: torch.nn.Module, device: torch.device) -> dict[str, Any]:
    """Inference of the same model, input size, batch and thread count through onnxruntime (CPU, fp32).

    The model is exported with `semask.apps.export.export_onnx` (a static graph at `cfg.size`) to a temporary file;
    the session gets as many intra-op threads as PyTorch uses. Timing and peak memory cover `session.run`
    only; the export time and the agreement with PyTorch's logits are reported beside them.
    """
    import tempfile

    import onnxruntime

    from semask.apps.export import export_onnx, onnx_parity, onnxruntime_session

    model.eval()
    threads = torch.get_num_threads()  # what PyTorch runs with here (cfg.threads when given)
    x = random_images(cfg, cfg.batch_size, device).contiguous()
    feed = {"image": x.numpy()}
    with tempfile.TemporaryDirectory(prefix="semask-bench-") as tmp:
        start = time.perf_counter()
        exported = export_onnx(model, Path(tmp) / "model.onnx", size=cfg.size, batch_size=cfg.batch_size,
                               check=False)
        export_s = time.perf_counter() - start
        session = onnxruntime_session(exported.path, threads=threads)
        with PeakMemory(device) as mem:
            stats = time_it(lambda: session.run(None, feed), cfg.warmup, cfg.repeats, device)
        parity = onnx_parity(model, session, x)
    return {"batch_size": cfg.batch_size, "latency": stats, "images_per_s": cfg.batch_size / stats["median_s"],
            "threads": threads, "precision": "fp32", "onnxruntime": onnxruntime.__version__,
            "opset": exported.opset, "export_s": export_s, "max_abs_diff_vs_pytorch": parity["max_abs_diff"],
            "argmax_agreement_vs_pytorch": parity["argmax_agreement"], "peak_memory_bytes": mem.peak_bytes,
            "baseline_memory_bytes": mem.baseline_bytes}


def run_task(task: str, cfg: BenchmarkConfig, count: Optional[int] = None) -> dict[str, Any]:
    """One measurement (a name of `TASKS` but ``data``) on a freshly built model, in the calling process.

    Args:
        count: images for ``eval_memory``.

    Raises:
        UnknownNameError: `task` is not one of them.
    """
    device = torch.device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # evaluation memory is about growth with the number of images: measured with the default allocator,
    # whose resident size follows the live tensors (a heap that keeps freed memory also keeps fragmentation)
    if device.type == "cpu" and cfg.keep_freed_memory and task != "eval_memory":
        keep_freed_memory()
    model = build_model(cfg, device)
    forward = torch.compile(model) if cfg.compile else model
    if task == "inference":
        return bench_inference(cfg, model, device, forward)
    if task == "train":
        return bench_train(cfg, model, device, forward)
    if task == "protocols":
        return bench_protocols(cfg, model, device)
    if task == "eval_memory":
        return bench_eval_memory(cfg, model, device, count or 1)
    if task == "onnxruntime":
        return bench_onnxruntime(cfg, model, device)
    raise UnknownNameError(f"unknown task {task!r}")
