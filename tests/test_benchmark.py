"""The benchmark command: every task runs and reports consistent figures (no timing is asserted)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from semask.apps.benchmark import BenchmarkConfig, count_flops, main, matmul_peak, run_benchmark, summary, time_it
from semask.apps.cli import main as cli_main


def test_count_flops_counts_matmuls_convs_and_cpu_attention() -> None:
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4
    conv = torch.nn.Conv2d(3, 5, 3, bias=False)
    x = torch.randn(1, 3, 10, 10)
    assert count_flops(lambda: conv(x)) == 2 * 5 * 3 * 9 * 8 * 8
    q = torch.randn(2, 3, 49, 32)
    with torch.no_grad():
        flops = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert flops == 2 * (2 * 2 * 3 * 49 * 49 * 32)  # q k^T and a v


def test_time_it_and_matmul_peak() -> None:
    calls = []
    stats = time_it(lambda: calls.append(1), warmup=2, repeats=5, device=torch.device("cpu"))
    assert len(calls) == 7 and len(stats["times_s"]) == 5
    assert stats["min_s"] <= stats["median_s"] <= stats["max_s"]
    peak = matmul_peak(torch.float32, torch.device("cpu"), n=256, repeats=2)
    assert peak["best_flops"] >= peak["median_flops"] > 0 and peak["n"] == peak["n_asked"] == 256


def test_matmul_peak_shrinks_a_product_that_would_take_too_long() -> None:
    # emulated bf16 on an AVX2 CPU runs a 4096^3 product in minutes; the side is halved until the 512^3 probe's
    # extrapolation fits the limit, never below the probe's own side
    cpu = torch.device("cpu")
    kept = matmul_peak(torch.float32, cpu, n=1024, repeats=1, max_seconds=float("inf"))
    assert kept["n"] == kept["n_asked"] == 1024
    shrunk = matmul_peak(torch.float32, cpu, n=2048, repeats=1, max_seconds=0.0)
    assert shrunk["n"] == 512 and shrunk["n_asked"] == 2048 and shrunk["best_flops"] > 0
    assert shrunk["layout"] in ("a @ b", "a @ b.T")
    result = {"config": {"model": "m", "size": [64, 64], "device": "cpu", "precision": "bf16"},
              "environment": {"cpu": "x", "torch_threads": 2}, "matmul_peak": shrunk}
    assert "(512^3, not the 2048^3 asked)" in summary(result)


@pytest.mark.slow
def test_every_task_on_the_toy_model(tmp_path: Path) -> None:
    cfg = BenchmarkConfig(model="semask_toy_fpn", num_classes=6, size=(64, 64), tasks=(
        "inference", "train", "protocols", "eval_memory", "data"), warmup=1, repeats=2, matmul_size=256,
        protocol_size=(48, 64), protocol_repeats=1, data_images=4, eval_images=(1, 3), precision="bf16",
        agreement_images=1)
    result = run_benchmark(cfg, progress=False)
    json.dumps(result)  # JSON-ready
    for task in ("inference", "train"):
        r = result[task]
        assert r["flops_per_image"] > 0 and r["images_per_s"] > 0 and r["peak_memory_bytes"] > 0
        assert r["fraction_of_matmul_peak"] == pytest.approx(r["achieved_flops"] / result["matmul_peak"]["best_flops"])
        assert r["best_fraction_of_matmul_peak"] >= r["fraction_of_matmul_peak"]
    assert result["train"]["flops_per_image"] > 2 * result["inference"]["flops_per_image"]  # backward ~ 2x forward
    assert 0.0 <= result["inference"]["agreement_with_fp32"]["pixel_agreement"] <= 1.0
    assert set(result["protocols"]) == {"image_size", "forward", "whole", "msflip"}
    for mode in ("whole", "msflip"):
        p = result["protocols"][mode]
        assert p["relative_to_forward"] == pytest.approx(p["latency"]["median_s"]
                                                         / result["protocols"]["forward"]["latency"]["median_s"])
        assert p["peak_memory_bytes"] > 0
    assert set(result["eval_memory"]["peak_memory_bytes_by_images"]) == {"1", "3"}
    assert result["data"]["images_per_s_per_core"] > 0
    assert "semask_toy_fpn 64x64 bf16" in summary(result)


def test_command_line_writes_json(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    assert cli_main(["benchmark", "--model", "semask_toy_fpn", "--num-classes", "4", "--size", "64", "48",
                     "--tasks", "inference", "--warmup", "1", "--repeats", "2", "--matmul-size", "128",
                     "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["size"] == [64, 48] and result["inference"]["latency"]["median_s"] > 0
    assert json.loads(capsys.readouterr().out) == result


def test_the_record_says_which_cpu_and_precision(simulate_cpu, tmp_path: Path, capsys) -> None:
    from semask.apps.benchmark.timing import cpu_model

    simulate_cpu("AVX2")
    out = tmp_path / "bench.json"
    assert cli_main(["benchmark", "--model", "semask_toy_fpn", "--num-classes", "4", "--size", "64", "48",
                     "--tasks", "inference", "--warmup", "1", "--repeats", "2", "--matmul-size", "128",
                     "--precision", "auto", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    env = result["environment"]
    threads = torch.get_num_threads()
    assert env["cpu_capability"] == "AVX2" and env["cpu_bf16_native"] is False and env["torch_threads"] == threads
    assert env["cpu"] == cpu_model() and "best_flops" in result["matmul_peak"]
    # auto on a CPU without native bf16 runs fp32; the record keeps what was asked
    assert result["config"]["precision"] == "fp32" and "speedup_vs_fp32" not in result["inference"]
    assert result["precision"] == {"setting": "auto", "autocast": "fp32", "native_bf16": False,
                                   "cpu_capability": "AVX2"}
    first, second = capsys.readouterr().err.split("semask_toy_fpn 64x48 ", 1)[1].splitlines()[:2]
    assert first.startswith("auto -> fp32 on cpu (") and first.endswith(f", {threads} threads)")
    assert second == "  CPU capability AVX2, bf16 emulated (bf16 autocast is slow here)"


def test_cpu_model_is_none_where_unreadable(monkeypatch) -> None:
    from semask.apps.benchmark import timing

    class Unreadable:
        def __init__(self, path: str) -> None:
            pass

        def read_text(self) -> str:
            raise OSError("no /proc here")

    monkeypatch.setattr(timing, "Path", Unreadable)
    assert timing.cpu_model() is None and timing.environment(torch.device("cpu"))["cpu"] is None


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="unknown benchmark task"):
        run_benchmark(BenchmarkConfig(tasks=("speed",)), progress=False)
    with pytest.raises(ValueError, match="unknown model 'semask_huge'"):
        run_benchmark(BenchmarkConfig(model="semask_huge"), progress=False)
    with pytest.raises(SystemExit):
        main(["--precision", "fp8"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA; the error is for machines without")
def test_cuda_requested_without_cuda() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        run_benchmark(BenchmarkConfig(device="cuda"), progress=False)


def test_a_training_preset_sets_model_classes_crop_and_batch(tiny_toy_root) -> None:
    from semask.apps.benchmark import preset_config

    cfg = preset_config(BenchmarkConfig(preset="toy"))
    assert (cfg.model, cfg.num_classes, cfg.size, cfg.train_batch_size) == ("semask_toy_fpn", 11, (128, 128), 8)
    cfg = preset_config(BenchmarkConfig(preset="semask_large_coco_stuff10k"))
    assert (cfg.model, cfg.num_classes, cfg.size, cfg.train_batch_size) == ("semask_large_fpn", 171, (640, 640), 2)
    result = run_benchmark(BenchmarkConfig(preset="swin_toy", tasks=("inference",), precision="bf16", warmup=1,
                                           repeats=1, matmul_size=128, agreement_images=2,
                                           agreement_root=str(tiny_toy_root)), progress=False)
    assert result["config"]["model"] == "swin_toy_fpn" and tuple(result["config"]["size"]) == (128, 128)
    agreement = result["inference"]["agreement_with_fp32"]
    assert agreement["images"] == str(tiny_toy_root) and 0 <= agreement["pixel_agreement"] <= 1


def test_summary_formats_the_recorded_runs() -> None:
    """The PyTorch and onnxruntime rows share one timing format (batch, median, IQR, images/s)."""
    result = json.loads((Path(__file__).resolve().parents[1] / "docs" / "benchmarks" /
                         "cpu_tiny_onnxruntime.json").read_text())
    lines = summary(result).splitlines()
    inference = next(line for line in lines if line.startswith("  inference: "))
    onnx = next(line for line in lines if line.startswith("  onnxruntime "))
    r, o = result["inference"], result["onnxruntime"]
    assert f"batch 1, {r['latency']['median_s'] * 1e3:.1f} ms (IQR {r['latency']['iqr_s'] * 1e3:.1f}), " \
           f"{r['images_per_s']:.2f} img/s, " in inference
    assert f"batch 1, {o['latency']['median_s'] * 1e3:.1f} ms (IQR {o['latency']['iqr_s'] * 1e3:.1f}), " \
           f"{o['images_per_s']:.2f} img/s, {o['speedup_vs_pytorch']:.2f}x PyTorch's speed" in onnx


@pytest.mark.parametrize("flag, value", [("--size", "256"), ("--model", "swin_toy_fpn"), ("--num-classes", "4"),
                                         ("--train-batch-size", "2")])
def test_an_explicit_setting_beside_a_preset_is_refused_not_replaced(flag, value, capsys) -> None:
    """--preset sets the model, classes, crop and batch: an explicit one of those beside it would be silently
    replaced by the preset's (a 256-pixel benchmark that measured 128), so it is refused before any work."""
    with pytest.raises(ValueError, match=f"--preset toy sets the model, classes, size and training batch; leave "
                                         f"out {flag}"):
        main(["--preset", "toy", flag, value, "--tasks", "train"])
