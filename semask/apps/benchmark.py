"""Speed and memory of SeMask FPN (arXiv 2112.12782): `semask benchmark`.

Measures, for a variant, resolution, batch size, precision and device:
  - inference latency / throughput of the model's forward pass (eval, no autograd);
  - training-step time / throughput (forward + loss + backward + optimizer step);
  - peak memory of each (CUDA max allocated on a GPU, peak RSS on the CPU);
  - FLOPs per image from PyTorch's own FLOP counter (`torch.utils.flop_counter`) and the achieved FLOP/s as
    a fraction of the machine's matrix-multiply peak in the same precision, measured in the same run;
  - optionally the data pipeline (images/s per worker core), the test protocols (images/s through
    whole-image and multi-scale + flip inference on ADE20K-sized images), evaluation memory for a
    growing number of images, and the onnxruntime row: the same model, size, batch and thread count
    exported to ONNX (`semask.apps.export`, fp32) and run by onnxruntime's CPU session, beside PyTorch.
Every timing has warm-up runs and repeated measurements; the report gives median, min, max and IQR.

    semask benchmark --model semask_tiny_fpn --size 512 --precision bf16 --tasks inference train
    semask benchmark --tasks data protocols --json results.json
    semask benchmark --model semask_tiny_fpn --size 512 --tasks inference onnxruntime --threads 2
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import semask
from semask.engine.losses import semask_loss
from semask.errors import UnknownNameError, UsageError
from semask.device import PeakMemory, autocast, autocast_dtype, check_device, keep_freed_memory
from semask.io import atomic_path

__all__ = ["BenchmarkConfig", "run_benchmark", "matmul_peak", "count_flops", "time_it", "main", "TASKS"]

TASKS = ("inference", "train", "data", "protocols", "eval_memory", "onnxruntime")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class BenchmarkConfig:
    """What to measure."""

    model: str = "semask_tiny_fpn"  # registry name
    checkpoint: Optional[str] = None  # weights to load (official or semask); overrides model/num_classes
    num_classes: int = 150  # decoder classes (150 = ADE20K)
    size: tuple[int, int] = (512, 512)  # input height, width of the model benchmarks
    batch_size: int = 1  # images per inference batch
    train_batch_size: int = 2  # images per training step
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast for the last two)
    device: str = "cpu"  # cpu | cuda | cuda:N
    tasks: tuple[str, ...] = ("inference", "train")  # any of TASKS
    warmup: int = 2  # untimed runs before measuring
    repeats: int = 5  # timed runs
    compile: bool = False  # torch.compile the model
    grad_checkpointing: bool = False  # recompute backbone blocks in backward (training)
    channels_last: bool = True  # channels-last memory for the images (and the conv head)
    threads: Optional[int] = None  # torch.set_num_threads (CPU); None = PyTorch's default
    keep_freed_memory: bool = True  # CPU timings: reuse freed heap memory instead of fresh mmaps (semask.io)
    matmul_size: int = 4096  # side of the square matmul that measures the peak (CPU; GPU uses 8192)
    protocol_size: tuple[int, int] = (512, 683)  # ADE20K-sized image for the inference protocols
    protocol_repeats: int = 2  # images timed per protocol
    data_images: int = 64  # JPEGs through the training pipeline
    eval_images: tuple[int, ...] = (4, 32)  # image counts for the evaluation-memory check
    agreement_images: int = 4  # toy scenes on which bf16/fp16 predictions are compared with fp32
    agreement_root: Optional[str] = None  # compare on this dataset's validation images instead (ADE20K layout)
    preset: Optional[str] = None  # a training preset: its model, classes, crop (size) and images per GPU (train)


# ----------------------------------------------------------------------------------------------- helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn: Callable[[], Any], warmup: int, repeats: int, device: torch.device) -> dict[str, Any]:
    """Run `fn` `warmup` times untimed, then `repeats` times timed (seconds): median, min, max, IQR, all."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "iqr_s": q[2] - q[0], "times_s": times}


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                             **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _flop_counter() -> FlopCounterMode:
    # PyTorch's counter knows the CUDA attention kernels; give the CPU flash-attention kernel the same formula
    mapping = {}
    for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", _cpu_sdpa_flops),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_sdpa_backward_flops)):
        if hasattr(torch.ops.aten, name):
            mapping[getattr(torch.ops.aten, name)] = fn
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn`, from PyTorch's FLOP counter (matrix products, convolutions, attention)."""
    counter = _flop_counter()
    with counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int, repeats: int = 5) -> dict[str, float]:
    """The machine's matrix-multiply throughput in `dtype`: best and median FLOP/s of an n x n x n product."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    stats = time_it(lambda: torch.mm(a, b), warmup=2, repeats=repeats, device=device)
    flops = 2.0 * n ** 3
    return {"n": n, "best_flops": flops / stats["min_s"], "median_flops": flops / stats["median_s"]}


def environment(device: torch.device) -> dict[str, Any]:
    """Machine and versions, for the record."""
    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "semask": semask.__version__,
        "platform": platform.platform(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


DATASET_CLASSES = {"ade20k": 150, "cityscapes": 19, "coco_stuff10k": 171, "toy": 11}


def preset_config(cfg: BenchmarkConfig) -> BenchmarkConfig:
    """`cfg` with the model, class count, input size (the crop) and training batch (images per GPU) of the
    training preset `cfg.preset` (`semask configs` lists them)."""
    from semask.engine.config import get_preset

    recipe = get_preset(cfg.preset)
    if recipe.data.dataset not in DATASET_CLASSES:
        raise UsageError(f"--preset {cfg.preset}: a {recipe.data.dataset} dataset has no fixed class count; give "
                         "--model and --num-classes instead")
    return dataclasses.replace(cfg, model=recipe.model.name, num_classes=DATASET_CLASSES[recipe.data.dataset],
                               size=tuple(recipe.data.train_pipeline.crop_size),
                               train_batch_size=recipe.train.batch_size)


# ----------------------------------------------------------------------------------------------- tasks
def _build(cfg: BenchmarkConfig, device: torch.device) -> torch.nn.Module:
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


def _images(cfg: BenchmarkConfig, batch: int, device: torch.device) -> torch.Tensor:
    x = torch.randn(batch, 3, *cfg.size, generator=torch.Generator().manual_seed(0)).to(device)
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x


def bench_inference(cfg: BenchmarkConfig, model: torch.nn.Module, device: torch.device,
                    forward: Callable) -> dict[str, Any]:
    model.eval()
    x = _images(cfg, cfg.batch_size, device)

    def step() -> None:
        with torch.inference_mode(), autocast(device, autocast_dtype(cfg.precision, device)):
            forward(x)

    with PeakMemory(device) as mem:
        stats = time_it(step, cfg.warmup, cfg.repeats, device)
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
    """Median fp32 and `precision` latencies timed alternately in one process, and their ratio.

    Alternating the two cancels the slow drifts of a shared machine that separate runs would fold into
    the ratio.
    """
    def run(p: str) -> None:
        with torch.inference_mode(), autocast(device, autocast_dtype(p, device)):
            forward(x)

    for _ in range(warmup):
        run("fp32")
        run(precision)
    times: dict[str, list[float]] = {"fp32": [], precision: []}
    for _ in range(repeats):
        for p in ("fp32", precision):
            _sync(device)
            start = time.perf_counter()
            run(p)
            _sync(device)
            times[p].append(time.perf_counter() - start)
    fp32, low = statistics.median(times["fp32"]), statistics.median(times[precision])
    return {"fp32_median_s": fp32, f"{precision}_median_s": low, "speedup": fp32 / low}


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
        pixels that are near-ties. Untrained or synthetic weights have many near-ties; trained ones few.
    """
    from semask.data.toy import render_scene
    from semask.engine.inference import normalize

    rng = np.random.default_rng(0)
    same = total = near = disagree = disagree_near = 0
    err_sum = 0.0
    files = []
    if root is not None:
        from semask.data.images import read_rgb

        files = sorted((Path(root) / "images" / "validation").glob("*.jpg"))[:images]
        if not files:
            raise UsageError(f"--agreement-root {root}: no images/validation/*.jpg there (ADE20K or toy layout)")
        images = len(files)
    for i in range(images):
        if files:
            scene = read_rgb(files[i])  # the validation image at its own size (the toy set's test scale)
        else:
            scene = render_scene(rng, size=max(size))[0][: size[0], : size[1]]
        x = normalize(torch.from_numpy(scene).permute(2, 0, 1)[None].float().to(device))
        with torch.inference_mode():
            ref = model(x).logits.float()
            with autocast(device, autocast_dtype(precision, device)):
                low = model(x).logits.float()
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
    return {"pixel_agreement": same / total, "mean_abs_logit_error": err_sum / images,
            "near_tie_fraction": near / total,
            "disagreement_in_near_ties": disagree_near / disagree if disagree else 1.0}


def bench_train(cfg: BenchmarkConfig, model: torch.nn.Module, device: torch.device,
                forward: Callable) -> dict[str, Any]:
    model.train()
    x = _images(cfg, cfg.train_batch_size, device)
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
    from semask.data.transforms import rescale_size, resize_image
    from semask.engine.inference import Predictor, normalize

    model.eval()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(*cfg.protocol_size, 3), dtype=np.uint8)
    amp = DTYPES[cfg.precision] if cfg.precision != "fp32" else None
    out: dict[str, Any] = {"image_size": list(cfg.protocol_size)}
    # the model's forward pass alone on the image as the single-scale protocol rescales it: the protocol's cost
    # beyond it (resizing, normalising, argmax back at the original size) is what `semask test` adds
    whole = Predictor(model, mode="whole", device=device, amp_dtype=amp)
    size = rescale_size(*cfg.protocol_size, whole.scale)
    img = torch.from_numpy(image).permute(2, 0, 1)[None].to(device)  # 1, 3, H, W uint8
    x = normalize(resize_image(img, size).float() if size != tuple(cfg.protocol_size) else img.float())
    x = x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x

    def forward() -> None:
        with torch.inference_mode(), autocast(device, autocast_dtype(cfg.precision, device)):
            model(x)

    forward_stats = time_it(forward, warmup=1, repeats=cfg.protocol_repeats, device=device)
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
    """Peak memory of whole-image inference + metric accumulation over `count` images (run once per count
    in a fresh process: equal peaks for different counts show memory independent of the split size)."""
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
    x = _images(cfg, cfg.batch_size, device).contiguous()
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


def _run_task(task: str, cfg: BenchmarkConfig, count: Optional[int] = None) -> dict[str, Any]:
    """One measurement, in the calling process (used inside the spawned child of `_isolated`)."""
    device = torch.device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # evaluation memory is about growth with the number of images: measured with the default allocator,
    # whose resident size follows the live tensors (a heap that keeps freed memory also keeps fragmentation)
    if device.type == "cpu" and cfg.keep_freed_memory and task != "eval_memory":
        keep_freed_memory()
    model = _build(cfg, device)
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
    raise ValueError(f"unknown task {task!r}")


def _isolated(task: str, cfg: BenchmarkConfig, count: Optional[int] = None) -> dict[str, Any]:
    """Run a measurement in a fresh process, so that its peak memory is its own and no earlier task's
    allocations, caches or threads affect its timing."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_run_task, (task, cfg, count))


def run_benchmark(cfg: BenchmarkConfig, progress: bool = True) -> dict[str, Any]:
    """Run the configured measurements and return them as a JSON-ready dict.

    Each model measurement runs in its own spawned process (see `_isolated`); the matrix-multiply peak
    is measured first, in this process, with the same thread count. Because of the spawned processes, a
    script that calls this must do so under ``if __name__ == "__main__":`` (notebooks and the command
    line need nothing).
    """
    unknown = sorted(set(cfg.tasks) - set(TASKS))
    if unknown:
        raise UsageError(f"unknown benchmark task(s) {unknown}; choose from {list(TASKS)}")
    if cfg.precision not in DTYPES:
        raise UsageError(f"precision must be one of {list(DTYPES)}, got {cfg.precision!r}")
    small = [f"{k}={v}" for k, v in (("size", min(cfg.size)), ("batch_size", cfg.batch_size),
                                      ("train_batch_size", cfg.train_batch_size), ("repeats", cfg.repeats))
             if v < 1]
    if small:
        raise UsageError(f"these must be at least 1: {', '.join(small)}")
    if cfg.preset:  # the recipe decides the model, its classes, the crop and the per-GPU batch
        cfg = preset_config(cfg)
    if cfg.checkpoint:  # the file decides the architecture and the class count
        loaded = semask.load_checkpoint(cfg.checkpoint)
        cfg = dataclasses.replace(cfg, model=loaded.name, num_classes=loaded.num_classes)
        del loaded
    if cfg.model not in semask.list_models():
        raise UnknownNameError(f"unknown model {cfg.model!r}; valid names: {', '.join(semask.list_models())}")
    device = check_device(cfg.device)
    if "onnxruntime" in cfg.tasks:
        if device.type != "cpu":
            raise UsageError(f"the onnxruntime task runs onnxruntime's CPU session beside PyTorch on the CPU; "
                             f"use --device cpu (got {cfg.device!r})")
        import importlib.util

        missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            raise UsageError(f"the onnxruntime task needs {missing}; install the export extra: "
                             "pip install 'semask[export]'")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    allocator = ("glibc malloc, freed memory kept (timings); default (evaluation memory)"
                 if device.type == "cpu" and cfg.keep_freed_memory else "default")
    result: dict[str, Any] = {"config": dataclasses.asdict(cfg),
                              "environment": {**environment(device), "cpu_allocator": allocator}}
    with torch.device("meta"):
        result["parameters"] = sum(p.numel() for p in
                                   semask.create_model(cfg.model, num_classes=cfg.num_classes).parameters())
    if {"inference", "train"} & set(cfg.tasks):
        n = cfg.matmul_size if device.type == "cpu" else 8192
        log(f"matmul peak ({cfg.precision}, {n}^3) ...")
        result["matmul_peak"] = matmul_peak(DTYPES[cfg.precision], device, n)
    for task in ("inference", "train"):
        if task in cfg.tasks:
            log(f"{task} ...")
            r = _isolated(task, cfg)
            peak = result["matmul_peak"]
            # conservative: median model time against the best matmul; and best against best, which on a
            # shared machine filters the interference that both measurements suffer
            r["fraction_of_matmul_peak"] = r["achieved_flops"] / peak["best_flops"]
            fastest = r["latency" if task == "inference" else "step"]["min_s"]
            r["best_fraction_of_matmul_peak"] = r["flops_per_image"] * r["batch_size"] / fastest / peak["best_flops"]
            result[task] = r
    if "protocols" in cfg.tasks:
        log("protocols (whole, msflip) ...")
        result["protocols"] = _isolated("protocols", cfg)
    if "eval_memory" in cfg.tasks:
        log("evaluation memory ...")
        result["eval_memory"] = {"peak_memory_bytes_by_images": {
            str(n): _isolated("eval_memory", cfg, n)["peak_memory_bytes"] for n in cfg.eval_images}}
    if "onnxruntime" in cfg.tasks:
        log("onnxruntime (export, then inference) ...")
        r = _isolated("onnxruntime", cfg)
        if "inference" in result and cfg.precision == "fp32":  # PyTorch's row of the same run
            r["speedup_vs_pytorch"] = result["inference"]["latency"]["median_s"] / r["latency"]["median_s"]
        result["onnxruntime"] = r
    if "data" in cfg.tasks:
        log("data pipeline ...")
        result["data"] = bench_data(cfg)
    return result


def summary(result: dict[str, Any]) -> str:
    """A few human-readable lines of a `run_benchmark` result."""
    cfg, env = result["config"], result["environment"]
    lines = [f"{cfg['model']} {cfg['size'][0]}x{cfg['size'][1]} {cfg['precision']} on {cfg['device']} "
             f"({env['cpu'] if cfg['device'] == 'cpu' else env.get('gpu')}, {env['torch_threads']} threads)"]
    if "matmul_peak" in result:
        lines.append(f"  matmul peak: {result['matmul_peak']['best_flops'] / 1e9:.1f} GFLOP/s")
    mib = lambda b: f"{b / 2**20:.0f} MiB" if b is not None else "n/a"  # noqa: E731
    for task, key in (("inference", "latency"), ("train", "step")):
        if task in result:
            r = result[task]
            lines.append(f"  {task}: batch {r['batch_size']}, {r[key]['median_s'] * 1e3:.1f} ms "
                         f"(IQR {r[key]['iqr_s'] * 1e3:.1f}), {r['images_per_s']:.2f} img/s, "
                         f"{r['flops_per_image'] / 1e9:.1f} GFLOP/img, {r['fraction_of_matmul_peak']:.1%} of peak "
                         f"(best run {r['best_fraction_of_matmul_peak']:.1%}), "
                         f"peak mem {mib(r['peak_memory_bytes'])} ({mib(r['baseline_memory_bytes'])} at start)")
            if "speedup_vs_fp32" in r:
                lines.append(f"  {cfg['precision']} vs fp32, timed alternately: {r['speedup_vs_fp32']['speedup']:.2f}x faster")
            if "agreement_with_fp32" in r:
                a = r["agreement_with_fp32"]
                lines.append(f"  {cfg['precision']} vs fp32: pixel agreement {a['pixel_agreement']:.3%}, mean |dlogit| "
                             f"{a['mean_abs_logit_error']:.4f}, near-ties {a['near_tie_fraction']:.2%} of pixels "
                             f"holding {a['disagreement_in_near_ties']:.1%} of the disagreements")
    if "onnxruntime" in result:
        r = result["onnxruntime"]
        lines.append(f"  onnxruntime {r['onnxruntime']} (fp32 graph, opset {r['opset']}, {r['threads']} threads): "
                     f"batch {r['batch_size']}, {r['latency']['median_s'] * 1e3:.1f} ms "
                     f"(IQR {r['latency']['iqr_s'] * 1e3:.1f}), {r['images_per_s']:.2f} img/s"
                     + (f", {r['speedup_vs_pytorch']:.2f}x PyTorch's speed" if "speedup_vs_pytorch" in r else "")
                     + f", max |dlogit| vs PyTorch {r['max_abs_diff_vs_pytorch']:.1e}, "
                     f"peak mem {mib(r['peak_memory_bytes'])}")
    if "protocols" in result:
        p = result["protocols"]
        lines.append(f"  protocols on {p['image_size'][0]}x{p['image_size'][1]}: whole {p['whole']['images_per_s']:.2f} "
                     f"img/s ({p['whole']['relative_to_forward']:.2f}x the forward pass), msflip "
                     f"{p['msflip']['images_per_s']:.3f} img/s (peak mem {mib(p['msflip']['peak_memory_bytes'])})")
    if "eval_memory" in result:
        lines.append("  eval peak memory by images: " + ", ".join(
            f"{k}: {mib(v)}" for k, v in result["eval_memory"]["peak_memory_bytes_by_images"].items()))
    if "data" in result:
        lines.append(f"  data pipeline: {result['data']['images_per_s_per_core']:.1f} img/s per core")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    d = BenchmarkConfig()
    p = argparse.ArgumentParser(prog="semask benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=d.model, help=f"registry name (default {d.model})")
    p.add_argument("--checkpoint", default=None, help="load these weights (official or semask checkpoint)")
    p.add_argument("--num-classes", type=int, default=d.num_classes)
    p.add_argument("--size", type=int, nargs="+", default=list(d.size), metavar="PX",
                   help="input side, or height and width (default 512)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="inference batch")
    p.add_argument("--train-batch-size", type=int, default=d.train_batch_size, help="training batch")
    p.add_argument("--precision", choices=list(DTYPES), default=d.precision)
    p.add_argument("--device", default=d.device)
    p.add_argument("--tasks", nargs="+", choices=list(TASKS) + ["all"], default=list(d.tasks))
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--default-allocator", action="store_true",
                   help="do not call semask.device.keep_freed_memory() (CPU); see docs/benchmarks.md")
    p.add_argument("--matmul-size", type=int, default=d.matmul_size)
    p.add_argument("--protocol-repeats", type=int, default=d.protocol_repeats)
    p.add_argument("--data-images", type=int, default=d.data_images)
    p.add_argument("--eval-images", type=int, nargs="+", default=list(d.eval_images),
                   help="image counts for the evaluation-memory task (default 4 32)")
    p.add_argument("--agreement-images", type=int, default=d.agreement_images,
                   help="toy scenes for the bf16/fp16-vs-fp32 prediction agreement")
    p.add_argument("--agreement-root", default=None,
                   help="compare bf16/fp16 with fp32 on this dataset's validation images (images/validation/*.jpg)")
    p.add_argument("--preset", default=None,
                   help="take the model, classes, crop (--size) and images per GPU (--train-batch-size) from a "
                        "training preset, e.g. toy or semask_tiny_ade20k")
    p.add_argument("--json", default=None, help="also write the full result to this file")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`semask benchmark ...`: print a summary to stderr and the JSON result to stdout."""
    args = build_parser().parse_args(argv)
    if len(args.size) not in (1, 2):
        raise UsageError(f"--size takes one or two numbers, got {args.size}")
    cfg = BenchmarkConfig(
        model=args.model, checkpoint=args.checkpoint, num_classes=args.num_classes, size=(args.size[0], args.size[-1]),
        batch_size=args.batch_size, train_batch_size=args.train_batch_size, precision=args.precision,
        device=args.device, tasks=tuple(TASKS if "all" in args.tasks else args.tasks), warmup=args.warmup,
        repeats=args.repeats, compile=args.compile, grad_checkpointing=args.grad_checkpointing,
        channels_last=not args.no_channels_last, threads=args.threads,
        keep_freed_memory=not args.default_allocator, matmul_size=args.matmul_size,
        protocol_repeats=args.protocol_repeats, data_images=args.data_images,
        agreement_images=args.agreement_images, eval_images=tuple(args.eval_images),
        agreement_root=args.agreement_root, preset=args.preset)
    result = run_benchmark(cfg)
    print(summary(result), file=sys.stderr)
    text = json.dumps(result, indent=2)
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(text)
    print(text)
    return 0
