"""Speed and memory of SeMask FPN (arXiv 2112.12782): `semask benchmark`.

Inference and training-step time, FLOPs and peak memory, the test protocols, evaluation memory, the data
pipeline and onnxruntime beside PyTorch; what each figure means and why it is measured so: docs/design.md
("Apps"); measured figures: docs/benchmarks.md.

    semask benchmark --model semask_tiny_fpn --size 512 --precision bf16 --tasks inference train
    semask benchmark --tasks data protocols --json results.json

Modules: `config` (what to measure), `timing` (timing, FLOPs, matmul peak), `tasks` (the measurements),
`runner` (running them, the summary, the command line).
"""
from semask.apps.benchmark.config import PRECISIONS, TASKS, BenchmarkConfig, preset_config, resolve_config
from semask.apps.benchmark.runner import build_parser, main, run_benchmark, summary
from semask.apps.benchmark.tasks import interleaved_speedup, prediction_agreement
from semask.apps.benchmark.timing import count_flops, environment, matmul_peak, time_it

__all__ = ["BenchmarkConfig", "run_benchmark", "summary", "matmul_peak", "count_flops", "time_it", "environment",
           "main", "build_parser", "preset_config", "resolve_config", "interleaved_speedup", "prediction_agreement",
           "TASKS", "PRECISIONS"]
