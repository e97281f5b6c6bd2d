"""`semask benchmark` (SeMask FPN, arXiv 2112.12782): run the measurements, summarise them, the command line.

    semask benchmark --model semask_tiny_fpn --size 512 --precision bf16 --tasks inference train
    semask benchmark --tasks data protocols --json results.json
    semask benchmark --model semask_tiny_fpn --size 512 --tasks inference onnxruntime --threads 2
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import warnings
from typing import Any, Callable, Optional, Sequence

import torch

import semask
from semask.apps.benchmark.config import PRECISIONS, TASKS, BenchmarkConfig, resolve_config
from semask.apps.benchmark.tasks import bench_data, run_task
from semask.apps.benchmark.timing import environment, matmul_peak
from semask.apps.export import EXPORT_PACKAGES
from semask.device import EmulatedPrecisionWarning, autocast_dtype, check_device, precision_record, precision_text
from semask.errors import UsageError
from semask.io import atomic_path, check_output_file

__all__ = ["run_benchmark", "summary", "build_parser", "main"]

DESCRIPTION = "Speed and memory of SeMask FPN (arXiv 2112.12782): `semask benchmark`."


# ----------------------------------------------------------------------------------------------- running
def _isolated(task: str, cfg: BenchmarkConfig, count: Optional[int] = None) -> dict[str, Any]:
    """`run_task` in a fresh spawned process, so that its peak memory and timing are its own."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1, initializer=_quiet_child) as pool:
        return pool.apply(run_task, (task, cfg, count))


def _quiet_child() -> None:
    warnings.simplefilter("ignore", EmulatedPrecisionWarning)  # the parent has given it once (resolve_config)


def _check_onnxruntime_task(cfg: BenchmarkConfig, device: torch.device) -> None:
    if device.type != "cpu":
        raise UsageError(f"the onnxruntime task runs onnxruntime's CPU session beside PyTorch on the CPU; "
                         f"use --device cpu (got {cfg.device!r})")
    missing = [m for m in EXPORT_PACKAGES if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"the onnxruntime task needs {missing}; install the export extra: "
                         "pip install 'semask[export]'")


def _header(cfg: BenchmarkConfig, device: torch.device, precision: str) -> dict[str, Any]:
    """The config, the machine, the precision (as asked, e.g. ``auto``, and as it runs) and the model's parameter
    count."""
    allocator = ("glibc malloc, freed memory kept (timings); default (evaluation memory)"
                 if device.type == "cpu" and cfg.keep_freed_memory else "default")
    result: dict[str, Any] = {"config": dataclasses.asdict(cfg),
                              "environment": {**environment(device), "cpu_allocator": allocator},
                              "precision": precision_record(precision, device)}
    with torch.device("meta"):
        result["parameters"] = sum(p.numel() for p in
                                   semask.create_model(cfg.model, num_classes=cfg.num_classes).parameters())
    return result


def _model_row(task: str, cfg: BenchmarkConfig, peak: dict[str, float]) -> dict[str, Any]:
    """The ``inference`` or ``train`` measurement with its fractions of the matrix-multiply peak."""
    r = _isolated(task, cfg)
    # conservative: median model time against the best matmul; and best against best, which on a
    # shared machine filters the interference that both measurements suffer
    r["fraction_of_matmul_peak"] = r["achieved_flops"] / peak["best_flops"]
    fastest = r["latency" if task == "inference" else "step"]["min_s"]
    r["best_fraction_of_matmul_peak"] = r["flops_per_image"] * r["batch_size"] / fastest / peak["best_flops"]
    return r


def _measure(cfg: BenchmarkConfig, device: torch.device, result: dict[str, Any], log: Callable[[str], None]) -> None:
    """Run the tasks of `cfg` into `result`, in the order their figures depend on each other."""
    if {"inference", "train"} & set(cfg.tasks):
        n = cfg.matmul_size if device.type == "cpu" else 8192
        log(f"matmul peak ({cfg.precision}, {n}^3) ...")
        result["matmul_peak"] = peak = matmul_peak(autocast_dtype(cfg.precision, device) or torch.float32, device, n)
        if peak["n"] != n:
            log(f"  measured at {peak['n']}^3: one {n}^3 product would take more than a few seconds here")
    for task in ("inference", "train"):
        if task in cfg.tasks:
            log(f"{task} ...")
            result[task] = _model_row(task, cfg, result["matmul_peak"])
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


def run_benchmark(cfg: BenchmarkConfig, progress: bool = True) -> dict[str, Any]:
    """Run the configured measurements and return them as a JSON-ready dict.

    Each model measurement runs in its own spawned process; the matrix-multiply peak is measured first, in this
    process, with the same thread count. Because of the spawned processes, a script that calls this must do so
    under ``if __name__ == "__main__":`` (notebooks and the command line need nothing).

    Args:
        cfg: what to measure.
        progress: say on stderr which measurement runs.

    Returns:
        ``config`` (its ``precision`` the one that ran), ``environment`` (versions; the CPU's model, capability
        class and native bf16; the thread count), ``precision`` (`semask.device.precision_record`: as asked and
        as it ran), ``parameters`` and one entry per task (``matmul_peak`` with the model tasks).

    Raises:
        UsageError: a bad setting (see `resolve_config`), a device this machine lacks, or an onnxruntime task
            off the CPU or without the export extra.
    """
    asked = cfg.precision
    cfg = resolve_config(cfg)
    device = check_device(cfg.device)
    if "onnxruntime" in cfg.tasks:
        _check_onnxruntime_task(cfg, device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    result = _header(cfg, device, asked)
    _measure(cfg, device, result, log)
    return result


# ----------------------------------------------------------------------------------------------- summary
def _mib(b: Optional[int]) -> str:
    return f"{b / 2**20:.0f} MiB" if b is not None else "n/a"


def _timing(r: dict[str, Any], key: str) -> str:
    """``batch B, T ms (IQR I), N img/s`` of a row timed under `key` (``latency`` or ``step``)."""
    return (f"batch {r['batch_size']}, {r[key]['median_s'] * 1e3:.1f} ms (IQR {r[key]['iqr_s'] * 1e3:.1f}), "
            f"{r['images_per_s']:.2f} img/s")


def _model_lines(task: str, key: str, r: dict[str, Any], precision: str) -> list[str]:
    lines = [f"  {task}: {_timing(r, key)}, {r['flops_per_image'] / 1e9:.1f} GFLOP/img, "
             f"{r['fraction_of_matmul_peak']:.1%} of peak (best run {r['best_fraction_of_matmul_peak']:.1%}), "
             f"peak mem {_mib(r['peak_memory_bytes'])} ({_mib(r['baseline_memory_bytes'])} at start)"]
    if "speedup_vs_fp32" in r:
        lines.append(f"  {precision} vs fp32, timed alternately: {r['speedup_vs_fp32']['speedup']:.2f}x faster")
    if "agreement_with_fp32" in r:
        a = r["agreement_with_fp32"]
        lines.append(f"  {precision} vs fp32: pixel agreement {a['pixel_agreement']:.3%}, mean |dlogit| "
                     f"{a['mean_abs_logit_error']:.4f}, near-ties {a['near_tie_fraction']:.2%} of pixels "
                     f"holding {a['disagreement_in_near_ties']:.1%} of the disagreements")
    return lines


def _onnxruntime_line(r: dict[str, Any]) -> str:
    speedup = f", {r['speedup_vs_pytorch']:.2f}x PyTorch's speed" if "speedup_vs_pytorch" in r else ""
    return (f"  onnxruntime {r['onnxruntime']} (fp32 graph, opset {r['opset']}, {r['threads']} threads): "
            f"{_timing(r, 'latency')}{speedup}, max |dlogit| vs PyTorch {r['max_abs_diff_vs_pytorch']:.1e}, "
            f"peak mem {_mib(r['peak_memory_bytes'])}")


def _protocols_line(p: dict[str, Any]) -> str:
    return (f"  protocols on {p['image_size'][0]}x{p['image_size'][1]}: whole {p['whole']['images_per_s']:.2f} "
            f"img/s ({p['whole']['relative_to_forward']:.2f}x the forward pass), msflip "
            f"{p['msflip']['images_per_s']:.3f} img/s (peak mem {_mib(p['msflip']['peak_memory_bytes'])})")


def summary(result: dict[str, Any]) -> str:
    """A few human-readable lines of a `run_benchmark` result."""
    cfg, env = result["config"], result["environment"]
    precision = precision_text(result["precision"], machine=False) if "precision" in result else cfg["precision"]
    lines = [f"{cfg['model']} {cfg['size'][0]}x{cfg['size'][1]} {precision} on {cfg['device']} "
             f"({(env['cpu'] or 'CPU model unknown') if cfg['device'] == 'cpu' else env.get('gpu')}, "
             f"{env['torch_threads']} threads)"]
    if "cpu_capability" in env:  # results recorded before these were measured lack them
        lines.append(f"  CPU capability {env['cpu_capability']}, bf16 "
                     f"{'native' if env['cpu_bf16_native'] else 'emulated (bf16 autocast is slow here)'}")
    if "matmul_peak" in result:
        peak = result["matmul_peak"]
        side = f" ({peak['n']}^3, not the {peak['n_asked']}^3 asked)" if peak.get("n_asked", peak["n"]) != peak["n"] \
            else ""
        lines.append(f"  matmul peak: {peak['best_flops'] / 1e9:.1f} GFLOP/s{side}")
    for task, key in (("inference", "latency"), ("train", "step")):
        if task in result:
            lines += _model_lines(task, key, result[task], cfg["precision"])
    if "onnxruntime" in result:
        lines.append(_onnxruntime_line(result["onnxruntime"]))
    if "protocols" in result:
        lines.append(_protocols_line(result["protocols"]))
    if "eval_memory" in result:
        lines.append("  eval peak memory by images: " + ", ".join(
            f"{k}: {_mib(v)}" for k, v in result["eval_memory"]["peak_memory_bytes_by_images"].items()))
    if "data" in result:
        lines.append(f"  data pipeline: {result['data']['images_per_s_per_core']:.1f} img/s per core")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `semask benchmark`."""
    d = BenchmarkConfig()
    p = argparse.ArgumentParser(prog="semask benchmark", description=DESCRIPTION)
    # --model, --num-classes, --size and --train-batch-size default to None so that main can tell them from a
    # --preset, which sets all four (an explicit one beside it is refused rather than silently replaced)
    p.add_argument("--model", default=None, help=f"registry name (default {d.model})")
    p.add_argument("--checkpoint", default=None, help="load these weights (official or semask checkpoint)")
    p.add_argument("--num-classes", type=int, default=None, help=f"default {d.num_classes}")
    p.add_argument("--size", type=int, nargs="+", default=None, metavar="PX",
                   help="input side, or height and width (default 512)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="inference batch")
    p.add_argument("--train-batch-size", type=int, default=None, help=f"training batch (default {d.train_batch_size})")
    p.add_argument("--precision", choices=list(PRECISIONS), default=d.precision,
                   help="fp32 (default), bf16, fp16 (autocast), or auto: bf16 where the device has it natively "
                        "(GPUs; CPUs with AVX512_BF16 or AMX), else fp32")
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
    p.add_argument("--json", default=None, help="also write the full result to this file (checked before the run)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`semask benchmark ...`: print a summary to stderr and the JSON result to stdout.

    Raises:
        UsageError: a bad argument (see `run_benchmark`); `OutputError` for a --json file that is an input, exists
            (without --overwrite) or cannot be written, before anything is measured.
    """
    args = build_parser().parse_args(argv)
    d = BenchmarkConfig()
    defaults = {"model": d.model, "num_classes": d.num_classes, "size": list(d.size),
                "train_batch_size": d.train_batch_size}
    given = [f"--{name.replace('_', '-')}" for name in defaults if getattr(args, name) is not None]
    if args.preset and given:
        raise UsageError(f"--preset {args.preset} sets the model, classes, size and training batch; leave out "
                         f"{', '.join(given)}, or leave out --preset and give --model and --num-classes")
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if len(args.size) not in (1, 2):
        raise UsageError(f"--size takes one or two numbers, got {args.size}")
    if args.json:  # before minutes of measuring: never an input, replaced only with --overwrite, writable
        check_output_file(args.json, "--json", overwrite=args.overwrite, probe=True,
                          inputs=[("the checkpoint", args.checkpoint), ("the dataset (--agreement-root)",
                                                                         args.agreement_root)])
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
