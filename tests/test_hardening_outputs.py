"""Issue 14, classes 1 and 6: outputs never land on inputs and are checked before the work; a failed write says why.

Class 1 is tested as a table: every writing command x {output is an input, output inside an input folder, existing
file without --overwrite, unwritable destination (under a regular file; on a read-only mount where mounting is
permitted)}. The rows run through the real command line (`semask.apps.cli.main`) in one fresh Python process
(`RUNNER`), where the function that starts each command's work is replaced by a stub that stops the command: a
refused row must exit 2 (1 for an existing training run, as before) naming the output and the input, change nothing
under the test folder (every file hashed before and after), and never reach its stub; a control row with a good
output must reach it. The two instances of the issue also run as plain ``python -m semask`` commands.

Class 6: `semask.io.atomic_path` turns a refused write into `WriteError` (file name, the OS's reason, previous file
kept, no temporary file). Simulated in-process for each writer (ENOSPC from the writer itself, EACCES creating the
temporary file, EROFS at the rename), and for real on a 1 MiB tmpfs filled up, where mounting is permitted.
"""
from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import semask
from helpers import tiny_overrides
from semask.checkpoint import convert_to_safetensors, save_checkpoint, to_official_checkpoint
from semask.data import TOY_CLASSES, TOY_PALETTE, ToyDataset, make_toy_dataset
from semask.engine.config import apply_overrides, get_preset, to_dict
from semask.errors import OutputError, OutputExistsError, WriteError
from semask.io import atomic_path, check_output_file, check_output_files, check_output_folder, plan_outputs

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

# ------------------------------------------------------------------------------------------------ the world
RUNNER = r'''
import contextlib, hashlib, importlib, io, json, os, sys, time

rows, base = json.loads(sys.argv[1]), sys.argv[2]


class WorkStarted(BaseException):  # not an Exception: the command line's error handler does not catch it
    pass


def work(*args, **kwargs):
    raise WorkStarted()


def snapshot():
    state = {}
    for folder, dirs, files in os.walk(base):
        for name in dirs + files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                state[path] = "link:" + os.readlink(path)
            elif os.path.isdir(path):
                state[path] = "dir"
            else:
                with open(path, "rb") as f:
                    state[path] = hashlib.sha256(f.read()).hexdigest()
    return state


from semask.apps.cli import main

results = []
for row in rows:
    patches = []
    for target in row["stubs"]:
        module, _, attr = target.partition(":")
        owner = importlib.import_module(module)
        *parents, name = attr.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        patches.append((owner, name, getattr(owner, name)))
        setattr(owner, name, work)
    before = snapshot()
    err, out = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            status = main(row["argv"])
    except WorkStarted:
        status = "work"
    finally:
        for owner, name, original in patches:
            setattr(owner, name, original)
    after = snapshot()
    results.append({"id": row["id"], "status": status, "stderr": err.getvalue(),
                    "seconds": time.perf_counter() - start,
                    "changed": sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p)),
                    "changed_inputs": sorted(p for p in before if before[p] != after.get(p))})
print("RESULTS:" + json.dumps(results))
'''

TRAIN = ["semask.engine.train:build_datasets"]
EVALUATE = ["semask.engine.inference:Predictor.predict_labels"]
EXPORT = ["semask.apps.export:_trace"]
READ = ["semask.checkpoint.files:read_checkpoint_file"]
BENCH = ["semask.apps.benchmark.runner:run_benchmark"]
DEMO = ["semask.apps.demo:train", "semask.apps.demo:make_toy_dataset"]
TOY = ["semask.data.toy:render_scene"]
CONVERT = ["semask.data.convert:read_label"]
SET = ["--no-progress", "--set", "{overrides}"]  # "{overrides}" expands to the tiny toy overrides

# id, argv, stubs, exit status ("work": the command got to its work), substrings of the one error line
ROWS = [
    # semask train --work-dir
    ("train/is_dataset_root", ["train", "toy", "--work-dir", "{toy}", *SET], TRAIN, 2,
     ["work_dir (--work-dir) '{toy}' is the dataset root '{toy}'"]),
    ("train/replaces_config_file", ["train", "{cfg}", "--work-dir", "{cfgdir}", "--no-progress"], TRAIN, 2,
     ["'{cfgdir}/config.json' is the config file '{cfg}'"]),
    ("train/inside_dataset", ["train", "toy", "--work-dir", "{toy}/annotations/run", *SET], TRAIN, 2,
     ["'{toy}/annotations/run' is inside the dataset root '{toy}'"]),
    ("train/existing_run", ["train", "toy", "--work-dir", "{base}/old_run", *SET], TRAIN, 1,
     ["already holds a run"]),  # exit status 1 as before (tests/test_evaluate.py asserts it); --resume continues it
    ("train/under_a_file", ["train", "toy", "--work-dir", "{blocker}/run", *SET], TRAIN, 2,
     ["'{blocker}/run'", "'{blocker}' is a file"]),
    ("train/read_only", ["train", "toy", "--work-dir", "{ro}/run", *SET], TRAIN, 2,
     ["'{ro}/run' cannot be written", "Read-only file system"]),
    ("train/control", ["train", "toy", "--work-dir", "{base}/new_run", *SET], TRAIN, "work", []),
    # semask test --json
    ("test_json/is_checkpoint", ["test", "toy", "{ckpt}", "--json", "{ckpt}", *SET], EVALUATE, 2,
     ["--json '{ckpt}' is the checkpoint '{ckpt}'"]),
    ("test_json/is_config_file", ["test", "{cfg}", "{ckpt}", "--json", "{cfg}", "--no-progress"], EVALUATE, 2,
     ["--json '{cfg}' is the config file '{cfg}'"]),
    ("test_json/inside_dataset", ["test", "toy", "{ckpt}", "--json", "{toy}/m.json", *SET], EVALUATE, 2,
     ["--json '{toy}/m.json' is inside the dataset root '{toy}'"]),
    ("test_json/existing", ["test", "toy", "{ckpt}", "--json", "{base}/mine.json", *SET], EVALUATE, 2,
     ["--json '{base}/mine.json' already exists", "--overwrite"]),
    ("test_json/under_a_file", ["test", "toy", "{ckpt}", "--json", "{blocker}/m.json", *SET], EVALUATE, 2,
     ["--json '{blocker}/m.json' cannot be created: '{blocker}' is a file"]),
    ("test_json/read_only", ["test", "toy", "{ckpt}", "--json", "{ro}/m.json", *SET], EVALUATE, 2,
     ["--json '{ro}/m.json' cannot be written", "Read-only file system"]),
    ("test_json/control", ["test", "toy", "{ckpt}", "--json", "{base}/new.json", *SET], EVALUATE, "work", []),
    ("test_json/existing_overwrite", ["test", "toy", "{ckpt}", "--json", "{base}/mine.json", "--overwrite", *SET],
     EVALUATE, "work", []),
    # semask test --show-dir
    ("test_show_dir/annotations", ["test", "toy", "{ckpt}", "--show-dir", "{toy}/annotations/validation", *SET],
     EVALUATE, 2, ["--show-dir '{toy}/annotations/validation' is inside the dataset root '{toy}'"]),
    ("test_show_dir/is_dataset_root", ["test", "toy", "{ckpt}", "--show-dir", "{toy}", *SET], EVALUATE, 2,
     ["--show-dir '{toy}' is the dataset root '{toy}'"]),
    ("test_show_dir/existing_panel", ["test", "toy", "{ckpt}", "--show-dir", "{base}/panels", *SET], EVALUATE, 2,
     ["'{base}/panels' already holds 1 of the outputs: '{base}/panels/{stem}.png'", "--overwrite"]),
    ("test_show_dir/under_a_file", ["test", "toy", "{ckpt}", "--show-dir", "{blocker}/p", *SET], EVALUATE, 2,
     ["--show-dir '{blocker}/p' cannot be used: '{blocker}' is a file"]),
    ("test_show_dir/read_only", ["test", "toy", "{ckpt}", "--show-dir", "{ro}/p", *SET], EVALUATE, 2,
     ["--show-dir '{ro}/p' cannot be written", "Read-only file system"]),
    ("test_show_dir/control", ["test", "toy", "{ckpt}", "--show-dir", "{base}/new_panels", *SET], EVALUATE,
     "work", []),
    ("test_show_dir/existing_overwrite", ["test", "toy", "{ckpt}", "--show-dir", "{base}/panels", "--overwrite",
                                          *SET], EVALUATE, "work", []),
    # semask export (its only input is a file: no output can be inside it)
    ("export/is_checkpoint", ["export", "{ckpt}", "{ckpt}", "--size", "64"], EXPORT, 2,
     ["output '{ckpt}' is the checkpoint '{ckpt}'"]),
    ("export/existing", ["export", "{ckpt}", "{base}/mine.onnx", "--size", "64"], EXPORT, 2,
     ["output '{base}/mine.onnx' already exists"]),
    ("export/under_a_file", ["export", "{ckpt}", "{blocker}/x.onnx", "--size", "64"], EXPORT, 2,
     ["output '{blocker}/x.onnx' cannot be created: '{blocker}' is a file"]),
    ("export/read_only", ["export", "{ckpt}", "{ro}/x.onnx", "--size", "64"], EXPORT, 2,
     ["output '{ro}/x.onnx' cannot be written", "Read-only file system"]),
    ("export/control", ["export", "{ckpt}", "{base}/new.onnx", "--size", "64"], EXPORT, "work", []),
    # semask convert-weights (its only input is a file)
    ("convert_weights/is_input", ["convert-weights", "{st}", "{st}", "--overwrite"], READ, 2,
     ["output '{st}' is the input '{st}'"]),
    ("convert_weights/existing", ["convert-weights", "{ckpt}", "{base}/mine.safetensors"], READ, 2,
     ["output '{base}/mine.safetensors' already exists"]),
    ("convert_weights/under_a_file", ["convert-weights", "{ckpt}", "{blocker}/x.safetensors"], READ, 2,
     ["'{blocker}' is a file"]),
    ("convert_weights/read_only", ["convert-weights", "{ckpt}", "{ro}/x.safetensors"], READ, 2,
     ["Read-only file system"]),
    ("convert_weights/control", ["convert-weights", "{ckpt}", "{base}/new.safetensors"], READ, "work", []),
    # semask benchmark --json
    ("benchmark/is_checkpoint", ["benchmark", "--checkpoint", "{ckpt}", "--json", "{ckpt}"], BENCH, 2,
     ["--json '{ckpt}' is the checkpoint '{ckpt}'"]),
    ("benchmark/inside_dataset", ["benchmark", "--agreement-root", "{toy}", "--json", "{toy}/b.json"], BENCH, 2,
     ["--json '{toy}/b.json' is inside the dataset (--agreement-root) '{toy}'"]),
    ("benchmark/existing", ["benchmark", "--json", "{base}/mine.json"], BENCH, 2,
     ["--json '{base}/mine.json' already exists", "--overwrite"]),
    ("benchmark/under_a_file", ["benchmark", "--json", "{blocker}/b.json"], BENCH, 2, ["'{blocker}' is a file"]),
    ("benchmark/read_only", ["benchmark", "--json", "{ro}/b.json"], BENCH, 2, ["Read-only file system"]),
    ("benchmark/control", ["benchmark", "--json", "{base}/b.json"], BENCH, "work", []),
    # semask demo
    ("demo/is_dataset", ["demo", "--work-dir", "{toy}", "--data-root", "{toy}", "--no-progress"], DEMO, 2,
     ["work_dir (--work-dir) '{toy}' is the toy dataset (--data-root) '{toy}'"]),
    ("demo/inside_dataset", ["demo", "--work-dir", "{toy}/run", "--data-root", "{toy}", "--no-progress"], DEMO, 2,
     ["'{toy}/run' is inside the toy dataset (--data-root) '{toy}'"]),
    ("demo/existing", ["demo", "--work-dir", "{base}/old_demo", "--data-root", "{toy}", "--no-progress"], DEMO, 2,
     ["'{base}/old_demo' already holds 1 of the outputs: '{base}/old_demo/demo.json'"]),
    ("demo/under_a_file", ["demo", "--work-dir", "{blocker}/d", "--data-root", "{toy}", "--no-progress"], DEMO, 2,
     ["'{blocker}' is a file"]),
    ("demo/read_only", ["demo", "--work-dir", "{ro}/d", "--data-root", "{toy}", "--no-progress"], DEMO, 2,
     ["Read-only file system"]),
    ("demo/data_root_read_only", ["demo", "--work-dir", "{base}/d", "--data-root", "{ro}/toy", "--no-progress"],
     DEMO, 2, ["data_root (--data-root) '{ro}/toy' cannot be written", "Read-only file system"]),
    ("demo/control", ["demo", "--work-dir", "{base}/new_demo", "--data-root", "{toy}", "--no-progress"], DEMO,
     "work", []),
    # semask predict (its inputs are files)
    ("predict/is_input", ["predict", "{ckpt}", "{photo}", "--out", "{base}/photos", "--overwrite"], EVALUATE, 2,
     ["would replace input files: '{photo}' is the input '{photo}'"]),
    ("predict/is_checkpoint", ["predict", "{base}/lookalike/x.png", "{photo}", "--out", "{base}/lookalike",
                               "--overwrite"], EVALUATE, 2,
     ["'{base}/lookalike/x.png' is the checkpoint '{base}/lookalike/x.png'"]),
    ("predict/existing", ["predict", "{ckpt}", "{photo}", "--out", "{base}/preds"], EVALUATE, 2,
     ["1 output(s) already exist: {base}/preds/x.png", "--overwrite"]),
    ("predict/under_a_file", ["predict", "{ckpt}", "{photo}", "--out", "{blocker}/o"], EVALUATE, 2,
     ["'{blocker}' is a file"]),
    ("predict/read_only", ["predict", "{ckpt}", "{photo}", "--out", "{ro}/o"], EVALUATE, 2,
     ["Read-only file system"]),
    ("predict/control", ["predict", "{ckpt}", "{photo}", "--out", "{base}/new_preds"], EVALUATE, "work", []),
    # semask toy-data (no inputs; --overwrite deletes only what its manifest lists: tests/test_safety_files.py)
    ("toy_data/existing", ["toy-data", "{toy}"], TOY, 2, ["{toy} already holds", "overwrite"]),
    ("toy_data/under_a_file", ["toy-data", "{blocker}/t"], TOY, 2,
     ["make_toy_dataset: root '{blocker}/t' cannot be used: '{blocker}' is a file"]),
    ("toy_data/read_only", ["toy-data", "{ro}/t"], TOY, 2, ["Read-only file system"]),
    ("toy_data/control", ["toy-data", "{base}/new_toy", "--num-train", "1", "--num-val", "1", "--size", "64"], TOY,
     "work", []),
    # semask convert (outputs go beside the downloaded files by design; existing outputs are kept, as documented)
    ("convert/output_is_a_source", ["convert", "cityscapes", "{base}/city_linked", "--overwrite"], CONVERT, 2,
     ["convert_cityscapes: output '{linked_target}' is a downloaded file '{linked_source}'"]),
    ("convert/read_only", ["convert", "cityscapes", "{ro}/city"], CONVERT, 2,
     ["cannot be written: no write permission in '{ro}/city/gtFine/val/aachen' (Read-only file system)"]),
    ("convert/control", ["convert", "cityscapes", "{base}/city"], CONVERT, "work", []),
]


def _image(path: Path, size: int = 24, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def _cityscapes(root: Path) -> Path:
    label = root / "gtFine" / "val" / "aachen" / "aachen_000000_000019_gtFine_labelIds.png"
    label.parent.mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(label)
    return label


@contextlib.contextmanager
def _tmpfs(path: Path, size: str = "1m") -> "contextlib.AbstractContextManager[bool]":
    """Mount a tmpfs of `size` at `path` (yields False where mounting is not permitted); unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True).returncode == 0 if shutil.which("mount") else False
    try:
        yield mounted
    finally:
        if mounted and subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            gc.collect()  # a failed torch.save keeps its file open until its writer is collected
            if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs and outputs of every row, and a read-only tmpfs at ``ro`` where mounting is permitted."""
    base = tmp_path_factory.mktemp("outputs")
    toy = make_toy_dataset(base / "toy", num_train=2, num_val=2, size=64)
    model = semask.create_model("semask_toy_fpn", class_names=TOY_CLASSES, palette=TOY_PALETTE)
    ckpt = save_checkpoint(base / "ckpt.pth", model)
    st = save_checkpoint(base / "ckpt.safetensors", model)
    overrides = tiny_overrides(toy)
    cfg = base / "cfgdir" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps(to_dict(apply_overrides(get_preset("toy"), overrides)), indent=2))
    (base / "blocker").write_text("a regular file: nothing can be created under it, not even by root")
    for name in ("mine.json", "mine.onnx", "mine.safetensors"):
        (base / name).write_text("mine")
    stem = Path(ToyDataset(toy, "validation").pairs[0][0]).stem
    (base / "panels").mkdir()
    (base / "panels" / f"{stem}.png").write_text("my panel")
    (base / "old_run").mkdir()
    (base / "old_run" / "log.jsonl").write_text("{}\n")
    (base / "old_run" / "latest.pth").write_bytes(ckpt.read_bytes())
    (base / "old_demo").mkdir()
    (base / "old_demo" / "demo.json").write_text("{}")
    photo = _image(base / "photos" / "x.png")
    (base / "preds").mkdir()
    (base / "preds" / "x.png").write_text("my labels")
    (base / "lookalike").mkdir()
    (base / "lookalike" / "x.png").write_bytes(ckpt.read_bytes())  # a checkpoint named like predict's output
    _cityscapes(base / "city")
    source = _cityscapes(base / "city_linked")
    target = source.with_name(source.name.replace("_labelIds", "_labelTrainIds"))
    target.symlink_to(source.name)
    paths = {"base": base, "toy": toy, "ckpt": ckpt, "st": st, "cfg": cfg, "cfgdir": cfg.parent,
             "blocker": base / "blocker", "stem": stem, "photo": photo, "ro": base / "ro",
             "linked_target": target, "linked_source": source}
    with _tmpfs(base / "ro", "4m") as mounted:
        if mounted:
            _cityscapes(base / "ro" / "city")
            mounted = subprocess.run(["mount", "-o", "remount,ro", str(base / "ro")],
                                     capture_output=True).returncode == 0
        yield {"paths": {k: str(v) for k, v in paths.items()}, "overrides": overrides, "read_only": mounted}


def _argv(argv: list[str], world: dict) -> list[str]:
    out = []
    for arg in argv:
        out += world["overrides"] if arg == "{overrides}" else [arg.format(**world["paths"])]
    return out


@pytest.fixture(scope="module")
def outcomes(world) -> dict[str, dict]:
    """Every row, run in one fresh Python process through `semask.apps.cli.main` (see `RUNNER`)."""
    rows = [{"id": i, "argv": _argv(argv, world), "stubs": stubs} for i, argv, stubs, _, _ in ROWS
            if world["read_only"] or "{ro}" not in " ".join(argv)]
    run = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(rows), world["paths"]["base"]],
                         capture_output=True, text=True, env=ENV, timeout=900)
    line = next((x for x in run.stdout.splitlines() if x.startswith("RESULTS:")), None)
    assert run.returncode == 0 and line, run.stderr[-3000:]
    return {r["id"]: r for r in json.loads(line[len("RESULTS:"):])}


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_outputs_are_planned_before_any_work(row, world, outcomes) -> None:
    name, argv, _, status, expected = row
    if name not in outcomes:
        pytest.skip("mounting a read-only tmpfs is not permitted here (needs root and mount)")
    result = outcomes[name]
    assert result["status"] == status, result["stderr"]
    assert not result["changed_inputs"], result["changed_inputs"]  # no file that was there changed or vanished
    if status == "work":
        return  # the control: the checks passed and the command started its work
    errors = [line for line in result["stderr"].splitlines() if ": error:" in line]
    assert len(errors) == 1 and "Traceback" not in result["stderr"], result["stderr"]
    for text in expected:
        assert text.format(**world["paths"]) in errors[0], errors[0]
    assert not result["changed"], result["changed"]  # nothing written, nothing created


# ------------------------------------------------------------------------------------------------ the two instances
def _digest(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("option, target", [("--show-dir", "{toy}/annotations/validation"), ("--json", "{ckpt}")])
def test_the_issue_instances_through_python_m_semask(world, option, target) -> None:
    """`semask test --show-dir ANNOTATIONS` replaced every label with a panel; `--json CHECKPOINT` replaced the
    checkpoint. Both are refused now, before the checkpoint is read, and nothing changes."""
    paths = world["paths"]
    base = Path(paths["base"])
    before = _digest(base)
    target = target.format(**paths)
    run = subprocess.run([sys.executable, "-m", "semask", "test", "toy", paths["ckpt"], option, target,
                          "--no-progress", "--set", *world["overrides"]], capture_output=True, text=True, env=ENV,
                         timeout=300)
    assert run.returncode == 2, run.stderr
    assert run.stderr.count(": error:") == 1 and repr(target) in run.stderr
    assert "is inside the dataset root" in run.stderr or "is the checkpoint" in run.stderr
    assert _digest(base) == before


# ------------------------------------------------------------------------------------------------ the Python API
def _no_work(*args, **kwargs):
    raise AssertionError("the work started before the outputs were checked")


def test_evaluate_plans_its_panels(world, tmp_path, monkeypatch) -> None:
    from semask.engine.inference import Predictor

    paths = world["paths"]
    toy = Path(paths["toy"])
    model = semask.load_checkpoint(paths["ckpt"])
    val = ToyDataset(toy, "validation")
    labels = _digest(toy / "annotations")
    with monkeypatch.context() as patch:
        patch.setattr(Predictor, "predict_labels", _no_work)
        with pytest.raises(OutputError, match=r"is a dataset folder '.*validation'"):
            semask.evaluate(model, val, show_dir=toy / "annotations" / "validation", progress=False)
        with pytest.raises(OutputError, match=r"is inside the dataset root"):
            semask.evaluate(model, val, show_dir=toy / "annotations" / "new", progress=False)
        with pytest.raises(OutputError, match=r"is the dataset's label folder"):  # a dataset without a root
            semask.evaluate(model, semask.data.FolderDataset(toy / "images" / "validation",
                                                             toy / "annotations" / "validation", TOY_CLASSES,
                                                             reduce_zero_label=True),
                            show_dir=toy / "annotations" / "validation", progress=False)
        shutil.copytree(Path(paths["base"]) / "panels", tmp_path / "panels")
        with pytest.raises(OutputExistsError, match=r"already holds 1 of the outputs.*overwrite=True"):
            semask.evaluate(model, val, show_dir=tmp_path / "panels", progress=False)
        with pytest.raises(OutputError, match=r"cannot be used: .*blocker' is a file"):
            semask.evaluate(model, val, show_dir=Path(paths["blocker"]) / "p", progress=False)
    assert _digest(toy / "annotations") == labels
    assert (tmp_path / "panels" / f"{paths['stem']}.png").read_text() == "my panel"
    semask.evaluate(model, val, show_dir=tmp_path / "panels", overwrite=True, progress=False, max_images=1)
    assert (tmp_path / "panels" / f"{paths['stem']}.png").read_bytes()[:4] == b"\x89PNG"


def test_panels_that_would_share_a_name_are_refused_before_any_work(tmp_path, monkeypatch) -> None:
    from semask.engine.evaluate import plan_panels

    dataset = semask.data.SegmentationDataset([(tmp_path / "a" / "x.jpg", tmp_path / "a" / "x.png"),
                                               (tmp_path / "b" / "x.jpg", tmp_path / "b" / "x.png")], ["c"])
    with pytest.raises(OutputError, match=r"1 panel name\(s\) would be written by two images"):
        plan_panels(dataset, tmp_path / "show", 2, range(2))


def test_python_entry_points_check_their_outputs_first(world, tmp_path, monkeypatch) -> None:
    import semask.apps.demo as demo
    import semask.apps.export as export
    import semask.engine.train as train_module
    from semask.data.convert import convert_cityscapes

    paths = world["paths"]
    model = semask.load_checkpoint(paths["ckpt"])
    monkeypatch.setattr(export, "_trace", _no_work)
    monkeypatch.setattr(demo, "train", _no_work)
    monkeypatch.setattr(demo, "make_toy_dataset", _no_work)
    monkeypatch.setattr(train_module, "build_datasets", _no_work)
    monkeypatch.setattr(semask.checkpoint.files, "read_checkpoint_file", _no_work)
    blocked = Path(paths["blocker"]) / "x"
    with pytest.raises(OutputError, match="is a file"):
        semask.export_onnx(model, blocked.with_suffix(".onnx"), size=(64, 64))
    (tmp_path / "old.onnx").write_text("mine")
    with pytest.raises(OutputExistsError, match="already exists"):
        semask.export_onnx(model, tmp_path / "old.onnx", size=(64, 64), overwrite=False)
    with pytest.raises(OutputError, match="is the toy dataset"):
        demo.run_demo(paths["toy"], paths["toy"], progress=False)
    config = apply_overrides(get_preset("toy"), world["overrides"])
    with pytest.raises(OutputError, match="is inside the dataset root"):
        semask.train(config, Path(paths["toy"]) / "images" / "run", progress=False)
    with pytest.raises(OutputError, match="is the input"):
        convert_to_safetensors(paths["st"], paths["st"], overwrite=True)
    with pytest.raises(OutputError, match="is a file"):
        make_toy_dataset(blocked, num_train=1, num_val=1, size=64)
    with pytest.raises(OutputError, match="is a downloaded file"):
        convert_cityscapes(Path(paths["base"]) / "city_linked", overwrite=True)
    assert (tmp_path / "old.onnx").read_text() == "mine"


@pytest.mark.parametrize("case", ["hard_link", "symlinked_folder", "url_input_is_skipped", "unwritable_many",
                                  "device", "fifo", "name_too_long", "symlink_is_followed"])
def test_the_planner(tmp_path, case) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "label.png").write_text("truth")
    if case == "hard_link":  # another name of an input is still the input
        os.link(data / "label.png", tmp_path / "alias.png")
        with pytest.raises(OutputError, match=r"'.*alias.png' is the labels '.*label.png'"):
            check_output_file(tmp_path / "alias.png", inputs=[("the labels", data / "label.png")])
    elif case == "symlinked_folder":  # a link into an input folder leads inside it
        (tmp_path / "link").symlink_to(data)
        with pytest.raises(OutputError, match=r"is inside the data '.*data'"):
            check_output_folder(tmp_path / "link" / "show", inputs=[("the data", data)])
    elif case == "url_input_is_skipped":
        assert check_output_file(tmp_path / "x.json", inputs=["https://host/x.json", None, ""], probe=True)
    elif case == "unwritable_many":
        (tmp_path / "file").write_text("x")
        with pytest.raises(OutputError, match=r"'.*file/b.png' cannot be created: '.*file' is a file"):
            check_output_files([tmp_path / "a.png", tmp_path / "file" / "b.png"], probe=True)
    elif case == "device":  # replacing it atomically would put a regular file in place of the device, as root
        with pytest.raises(OutputError, match=r"'/dev/null' is a character device, not a file"):
            check_output_file("/dev/null", overwrite=True, probe=True)
    elif case == "fifo":
        os.mkfifo(tmp_path / "pipe")
        with pytest.raises(OutputError, match=r"is a named pipe, not a file"):
            with atomic_path(tmp_path / "pipe"):
                pass
    elif case == "name_too_long":  # found before the work, not when the file is opened after it
        with pytest.raises(OutputError, match=r"cannot be created: a name of 300 bytes .*allows 255"):
            check_output_file(tmp_path / "new" / ("a" * 296 + ".png"), probe=True)
    else:
        (tmp_path / "link.json").symlink_to("real.json")
        (tmp_path / "real.json").write_text("old")
        with atomic_path(tmp_path / "link.json") as tmp:
            tmp.write_text("new")
        assert (tmp_path / "link.json").is_symlink() and (tmp_path / "real.json").read_text() == "new"
    assert (data / "label.png").read_text() == "truth"


def test_predict_names_the_checkpoint_it_protects(tmp_path) -> None:
    image = _image(tmp_path / "in" / "model.jpg")
    ckpt = tmp_path / "out" / "model.png"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"weights")
    with pytest.raises(OutputError, match=r"would replace input files: '.*model.png' is the checkpoint"):
        plan_outputs([image], tmp_path / "out", ".png", overwrite=True, protected=[("the checkpoint", ckpt)])


# ------------------------------------------------------------------------------------------------ class 6: writes
def _writers(tmp_path: Path) -> dict:
    from semask.engine.evaluate import EvalResult
    from semask.viz import save_label_map

    torch.manual_seed(0)
    model = semask.create_model("semask_toy_fpn", num_classes=3)
    src = tmp_path / "src.pth"
    torch.save(to_official_checkpoint(model), src)
    result = EvalResult(metrics={"aAcc": 1.0, "mIoU": 1.0, "mAcc": 1.0, "IoU": np.ones(1), "Acc": np.ones(1)},
                        class_names=("a",), confusion=np.ones((1, 1), np.int64))
    return {  # name: (file name, write it)
        "save_checkpoint_pth": ("latest.pth", lambda p: save_checkpoint(p, model, iteration=1)),
        "save_checkpoint_safetensors": ("w.safetensors", lambda p: save_checkpoint(p, model)),
        "eval_json": ("metrics.json", lambda p: result.save_json(p)),
        "label_map": ("x.png", lambda p: save_label_map(np.zeros((4, 4), np.int64), p)),
        "convert_weights": ("c.safetensors", lambda p: convert_to_safetensors(src, p, overwrite=True)),
    }


def _fail_in_writer(monkeypatch, name: str) -> None:
    """Make the writer's own write run out of space, the way each library reports it."""
    import pathlib

    import safetensors.torch
    import PIL.Image

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # file.write names no file

    if name == "save_checkpoint_pth":
        def torch_save(obj, f, *args, **kwargs):  # torch reports a full disk without the OS's error
            Path(f).write_bytes(b"PK partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        monkeypatch.setattr(torch, "save", torch_save)
        monkeypatch.setattr(os, "write", full)  # ... and the disk is full: the probe's write fails too
    elif name in ("save_checkpoint_safetensors", "convert_weights"):
        class SafetensorError(Exception):
            pass

        def save_file(*args, **kwargs):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
        monkeypatch.setattr(os, "write", full)
    elif name == "eval_json":
        monkeypatch.setattr(pathlib.Path, "write_text", full)
    else:
        monkeypatch.setattr(PIL.Image.Image, "save", full)


@pytest.mark.parametrize("stage, code", [("writer", errno.ENOSPC), ("create_temp", errno.EACCES),
                                         ("rename", errno.EROFS)])
@pytest.mark.parametrize("writer", ["save_checkpoint_pth", "save_checkpoint_safetensors", "eval_json", "label_map",
                                    "convert_weights"])
def test_a_refused_write_says_why_and_keeps_the_previous_file(tmp_path, monkeypatch, writer, stage, code) -> None:
    name, write = _writers(tmp_path)[writer]
    out = tmp_path / "out"
    out.mkdir()
    target = out / name
    target.write_bytes(b"the previous file")
    if stage == "writer":
        _fail_in_writer(monkeypatch, writer)
    elif stage == "create_temp":
        real_open = os.open

        def refuse(path, *args, **kwargs):
            if str(path).endswith(".tmp"):
                raise OSError(code, os.strerror(code), str(path))
            return real_open(path, *args, **kwargs)
        monkeypatch.setattr(os, "open", refuse)
    else:
        def refuse_rename(a, b, *args, **kwargs):
            raise OSError(code, os.strerror(code), str(a), str(b))
        monkeypatch.setattr(os, "replace", refuse_rename)
    with pytest.raises(WriteError) as caught:
        write(target)
    monkeypatch.undo()
    message = str(caught.value)
    assert caught.value.errno == code and caught.value.filename == str(target)
    assert repr(str(target)) in message and os.strerror(code) in message
    assert "the previous file is kept" in message
    assert isinstance(caught.value, OSError) and semask.errors.exit_status(caught.value) == 1
    assert target.read_bytes() == b"the previous file"
    assert sorted(p.name for p in out.iterdir()) == [name]  # no temporary file left


def test_errors_that_are_not_refused_writes_pass_unchanged(tmp_path) -> None:
    with pytest.raises(ValueError, match="not a write problem"):
        with atomic_path(tmp_path / "x.json"):
            raise ValueError("not a write problem")
    with pytest.raises(FileNotFoundError):  # reading another file inside the block is not the write
        with atomic_path(tmp_path / "y.json"):
            open(tmp_path / "missing.txt")
    with pytest.raises(RuntimeError, match="torch failed for another reason"):  # the disk has space: unchanged
        with atomic_path(tmp_path / "z.pth"):
            raise RuntimeError("torch failed for another reason")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ a real full disk
@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs holding a previous file of every name, then filled up (skipped where mounting is refused)."""
    disk = tmp_path / "disk"
    with _tmpfs(disk) as mounted:
        if not mounted:
            pytest.skip("mounting a tmpfs is not permitted here (needs root and mount): the full disk is simulated "
                        "in test_a_refused_write_says_why_and_keeps_the_previous_file")
        yield disk


def _fill(disk: Path) -> None:
    with open(disk / "filler", "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(bytes(1 << 16))
    assert os.statvfs(disk).f_bfree == 0


@pytest.mark.parametrize("writer", ["save_checkpoint_pth", "save_checkpoint_safetensors", "eval_json", "label_map",
                                    "convert_weights"])
def test_a_full_disk_names_the_file_and_keeps_the_previous_one(tmp_path, full_disk, writer) -> None:
    name, write = _writers(tmp_path)[writer]
    target = full_disk / name
    target.write_bytes(b"the previous file")
    _fill(full_disk)
    with pytest.raises(WriteError, match=re.escape(f"cannot write '{target}': No space left on device, 0 bytes free "
                                                   "there; the previous file is kept; free some space or write "
                                                   "elsewhere")):
        write(target)
    assert target.read_bytes() == b"the previous file"
    assert sorted(p.name for p in full_disk.iterdir()) == sorted(["filler", name])


def test_a_full_disk_on_the_command_line_and_in_toy_data(tmp_path, full_disk) -> None:
    torch.manual_seed(0)
    src = tmp_path / "src.pth"
    torch.save(to_official_checkpoint(semask.create_model("semask_toy_fpn", num_classes=3)), src)
    _fill(full_disk)
    run = subprocess.run([sys.executable, "-m", "semask", "convert-weights", str(src), str(full_disk / "w.safetensors")],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode == 1, run.stderr
    assert run.stderr == (f"semask convert-weights: error: cannot write '{full_disk}/w.safetensors': No space left "
                          "on device, 0 bytes free there; nothing was written; free some space or write elsewhere\n")
    with pytest.raises(WriteError, match=re.escape(f"cannot write '{full_disk}/toy': No space left on device, 0 "
                                                   "bytes free there; nothing was written")):
        make_toy_dataset(full_disk / "toy", num_train=2, num_val=1, size=64)
    assert sorted(p.name for p in full_disk.rglob("*")) == ["filler", "toy"]  # no staging folder left


def test_the_dataset_root_is_an_input_only_where_a_dataset_is(tmp_path) -> None:
    from semask.engine.evaluate import data_inputs

    config = apply_overrides(get_preset("semask_tiny_ade20k"), [f"data.root={tmp_path}", "model.pretrained=none"])
    assert data_inputs(config.data) == []  # nothing to protect: a parent folder where runs may go
    (tmp_path / "ADEChallengeData2016" / "images").mkdir(parents=True)
    assert data_inputs(config.data) == [("the dataset root", tmp_path / "ADEChallengeData2016")]
    with pytest.raises(OutputError, match="is inside the dataset root"):
        semask.train(config, tmp_path / "ADEChallengeData2016" / "run", progress=False)
