"""Precision chosen by what the CPU can do: the capability class, ``auto``, the once-per-process warning about emulated
bf16, and that training, `Predictor` / `predict`, the command line and the benchmark all resolve it the same way.

The CPU is simulated by patching PyTorch's probes (`torch.backends.cpu.get_cpu_capability`,
`torch.cpu._is_avx512_bf16_supported`, `torch.cpu._is_amx_tile_supported`; tests/conftest.py's `simulate_cpu`), so
every host class is tested on any machine. (The kernels that run are this machine's: only the choice is simulated.)
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import semask
from semask.apps.benchmark import BenchmarkConfig, resolve_config
from semask.apps.cli import build_parser
from semask.apps.cli import main as cli_main
from semask.device import (EmulatedPrecisionWarning, autocast_dtype, check_precision, cpu_capability, native_bf16,
                           precision_record, precision_text)
from semask.engine.config import apply_overrides, get_preset
from semask.engine.inference import Predictor
from semask.errors import UsageError
from helpers import tiny_overrides

CPU = torch.device("cpu")
HOSTS = ("AVX2", "AVX512", "AVX512_BF16", "AMX")  # the classes tests/conftest.py's simulate_cpu knows
NATIVE = {"AVX2": False, "AVX512": False, "AVX512_BF16": True, "AMX": True}


def _emulated(caught: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [w for w in caught if issubclass(w.category, EmulatedPrecisionWarning)]


# --------------------------------------------------------------------------------------------- the choice
@pytest.mark.parametrize("name", HOSTS)
def test_auto_is_bf16_exactly_where_the_cpu_has_it_natively(simulate_cpu, name: str) -> None:
    simulate_cpu(name)
    assert cpu_capability() == name and native_bf16("cpu") is NATIVE[name]
    assert autocast_dtype("auto", CPU) is (torch.bfloat16 if NATIVE[name] else None)
    assert autocast_dtype("fp32", CPU) is None and autocast_dtype(None, CPU) is None
    assert autocast_dtype("fp16", CPU) is torch.float16 and autocast_dtype(torch.float16, CPU) is torch.float16
    record = precision_record("auto", CPU)
    assert record == {"setting": "auto", "autocast": "bf16" if NATIVE[name] else "fp32",
                      "native_bf16": NATIVE[name], "cpu_capability": name}
    assert precision_text(record) == (f"auto -> {record['autocast']} ({name} CPU, bf16 "
                                      f"{'native' if NATIVE[name] else 'emulated'})")
    assert precision_text(precision_record("fp32", CPU), machine=False) == "fp32"


def test_missing_or_failing_probes_count_as_absent(monkeypatch) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "ZVECTOR")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)

    def broken() -> bool:
        raise RuntimeError("cpuinfo failed")

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", broken, raising=False)
    assert cpu_capability() == "ZVECTOR" and not native_bf16(CPU) and autocast_dtype("auto", CPU) is None


def test_gpus_keep_their_rule(monkeypatch) -> None:
    cuda = torch.device("cuda")
    for supported, expected in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
        assert autocast_dtype("auto", cuda) is expected and native_bf16(cuda) is supported
    assert autocast_dtype("auto", torch.device("mps")) is None and not native_bf16("mps")


def test_anything_else_is_a_usage_error() -> None:
    for bad in ("fp8", "BF16", torch.float64, torch.float32, 16):
        with pytest.raises(UsageError, match="amp_dtype must be a precision .*'auto'"):
            check_precision(bad, "amp_dtype")
    with pytest.raises(UsageError, match="precision must be a precision"):
        autocast_dtype("fp8", CPU)


# --------------------------------------------------------------------------------------------- the warning
@pytest.mark.parametrize("name", ["AVX2", "AVX512"])
def test_explicit_bf16_without_native_bf16_runs_and_warns_once(simulate_cpu, name: str, toy_model) -> None:
    simulate_cpu(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the once-only is semask's own, not the filter's
        for precision in ("fp32", "auto", "fp16", None):
            autocast_dtype(precision, CPU)
        assert not _emulated(caught)
        assert autocast_dtype("bf16", CPU) is torch.bfloat16  # it still runs, in bf16
        autocast_dtype(torch.bfloat16, CPU)
        Predictor(toy_model, amp_dtype=torch.bfloat16)
        Predictor(toy_model, amp_dtype="bf16")
        precision_record("bf16", CPU)
    (warning,) = _emulated(caught)
    assert issubclass(warning.category, UserWarning)
    text = str(warning.message)
    assert f"emulated on this CPU (capability {name}" in text and "several times slower than fp32" in text
    assert "use precision fp32, or auto" in text


def test_native_bf16_and_other_devices_do_not_warn(simulate_cpu, toy_model) -> None:
    simulate_cpu("AVX512_BF16")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        autocast_dtype("bf16", CPU)
        Predictor(toy_model, amp_dtype="bf16")
        simulate_cpu("AVX2")
        autocast_dtype("bf16", torch.device("cuda"))  # a GPU's bf16 is the GPU's business
    assert not _emulated(caught)


# --------------------------------------------------------------------------------------------- who resolves it
@pytest.mark.filterwarnings("ignore::semask.device.EmulatedPrecisionWarning")  # its own test is above
@pytest.mark.parametrize("name", ["AVX2", "AMX"])
def test_predictor_and_predict_take_a_precision_name(simulate_cpu, name: str, toy_model) -> None:
    simulate_cpu(name)
    auto = Predictor(toy_model, amp_dtype="auto")
    assert auto.amp_dtype is (torch.bfloat16 if NATIVE[name] else None)
    assert Predictor(toy_model, amp_dtype="fp32").amp_dtype is None
    assert Predictor(toy_model, amp_dtype=torch.bfloat16).amp_dtype is torch.bfloat16
    assert Predictor(toy_model).amp_dtype is None  # the default stays fp32: exact, reproducible numbers
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    expected = Predictor(toy_model, amp_dtype=auto.amp_dtype, test_config="toy")(image)
    labels = semask.predict(toy_model, image, amp_dtype="auto", test_config="toy")
    assert labels.shape == (40, 56) and np.array_equal(labels, expected)
    with pytest.raises(UsageError, match="amp_dtype must be a precision"):
        Predictor(toy_model, amp_dtype=torch.float64)


@pytest.mark.parametrize("name", ["AVX2", "AVX512_BF16"])
def test_training_records_the_precision_it_resolved(simulate_cpu, name: str, tiny_toy_root, tmp_path) -> None:
    simulate_cpu(name)
    config = apply_overrides(get_preset("toy"), tiny_overrides(tiny_toy_root, **{
        "schedule.iters": 1, "train.eval_interval": 0, "eval.max_images": 1}))
    assert config.train.precision == "auto"  # the training default
    result = semask.train(config, tmp_path / "run", progress=False)
    used = "bf16" if NATIVE[name] else "fp32"
    run = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()][0]
    assert run == result.history[0] and run["kind"] == "run" and run["iter"] == 0 and "budget" not in run
    assert run["precision"] == {"setting": "auto", "autocast": used, "native_bf16": NATIVE[name],
                                "cpu_capability": name}
    header = f"precision auto -> {used} ({name} CPU, bf16 {'native' if NATIVE[name] else 'emulated'})"
    assert header in (tmp_path / "run" / "train.log").read_text()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["precision"] == "auto"


@pytest.mark.parametrize("name", ["AVX2", "AVX512_BF16"])
def test_the_benchmark_resolves_auto(simulate_cpu, name: str) -> None:
    simulate_cpu(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_config(BenchmarkConfig(precision="auto")).precision == ("bf16" if NATIVE[name] else "fp32")
        assert resolve_config(BenchmarkConfig(precision="bf16")).precision == "bf16"
        assert resolve_config(BenchmarkConfig(precision="bf16")).precision == "bf16"
    assert len(_emulated(caught)) == (0 if NATIVE[name] else 1)


def test_the_command_line_takes_auto_and_notes_emulated_bf16_once(simulate_cpu, toy_model, tmp_path, capsys) -> None:
    parser = build_parser()
    for command in (["predict", "m.pth", "a.png", "--out", "o"], ["test", "toy", "m.pth"],
                    ["analyze", "toy", "m.pth"]):
        assert parser.parse_args([*command, "--precision", "auto"]).precision == "auto"
        assert parser.parse_args(command).precision == "fp32"
    simulate_cpu("AVX2")
    semask.save_checkpoint(tmp_path / "m.pth", toy_model)
    image = tmp_path / "a.png"
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(tmp_path / name)
    assert cli_main(["predict", str(tmp_path / "m.pth"), str(image), str(image.with_name("b.png")), "--out",
                     str(tmp_path / "out"), "--precision", "bf16"]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "bf16 autocast is emulated" in line]
    assert len(notes) == 1 and notes[0].startswith("semask predict: note: ") and "AVX2" in notes[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png"]  # both images, in bf16
