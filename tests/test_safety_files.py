"""Safety of what semask writes (issue 9 §1) and of how the command line reports errors (§4).

- outputs never replace an input, never collide, and replace existing files only when asked;
- destructive flags delete only what semask made;
- writes killed with SIGKILL leave the old file or none, and the next run removes their leftovers;
- files get the user's permissions; one bad image does not drop the others;
- every error a user can trigger on the command line is one line with exit status 2 (usage) or 1 (failure).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import semask
from semask.checkpoint import save_checkpoint, to_official_checkpoint
from semask.apps.cli import main
from semask.data import ToyDataset, make_toy_dataset
from semask.errors import BatchError, OutputError, OutputExistsError, UsageError, error_lines, exit_status
from semask.io import atomic_path, plan_outputs, remove_stale_temp_files

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _semask(*args: str, cwd: Path | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run the real `semask` command in a fresh process."""
    return subprocess.run([sys.executable, "-m", "semask", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=300, **kwargs)


def _image(path: Path, size: tuple[int, int] = (20, 30), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def _checkpoint(path: Path, palette: bool = True) -> Path:
    torch.manual_seed(0)
    model = semask.create_model("semask_toy_fpn", num_classes=3, class_names=("a", "b", "c"),
                                palette=[[255, 0, 0], [0, 255, 0], [0, 0, 255]] if palette else None)
    torch.save(to_official_checkpoint(model), path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("cli")
    return {"base": base, "ckpt": _checkpoint(base / "toy.pth"), "plain": _checkpoint(base / "plain.pth", False),
            "img": _image(base / "in" / "a.jpg"), "img2": _image(base / "in" / "b.png", (17, 9), 1)}


# --------------------------------------------------------------------------------------------- output planning
@pytest.mark.parametrize("case", ["flat", "same_stem_in_two_folders", "same_stem_two_suffixes", "output_is_input",
                                  "output_exists", "output_exists_overwrite", "out_dir_is_a_file",
                                  "output_is_a_folder", "protected_checkpoint"])
def test_plan_outputs(tmp_path: Path, case: str) -> None:
    inp = tmp_path / "in"
    if case == "flat":
        outs = plan_outputs([_image(inp / "x.jpg"), _image(inp / "y.jpg")], tmp_path / "out", ".png")
        assert outs == [tmp_path / "out" / "x.png", tmp_path / "out" / "y.png"]
    elif case == "same_stem_in_two_folders":
        outs = plan_outputs([_image(inp / "a" / "x.jpg"), _image(inp / "b" / "x.jpg")], tmp_path / "out", ".png")
        assert outs == [tmp_path / "out" / "a" / "x.png", tmp_path / "out" / "b" / "x.png"]
    elif case == "same_stem_two_suffixes":
        with pytest.raises(OutputError, match=r"written by more than one input .*x\.jpg and .*x\.png"):
            plan_outputs([_image(inp / "x.jpg"), _image(inp / "x.png")], tmp_path / "out", ".png")
    elif case == "output_is_input":
        with pytest.raises(OutputError, match="would replace input files"):
            plan_outputs([_image(inp / "x.png")], inp, ".png", overwrite=True)
    elif case in ("output_exists", "output_exists_overwrite"):
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "x.png").write_bytes(b"mine")
        if case == "output_exists":
            with pytest.raises(OutputExistsError, match=r"1 output\(s\) already exist.*--overwrite"):
                plan_outputs([_image(inp / "x.jpg")], tmp_path / "out", ".png")
        else:
            assert plan_outputs([_image(inp / "x.jpg")], tmp_path / "out", ".png", overwrite=True)
    elif case == "out_dir_is_a_file":
        (tmp_path / "out").write_text("a file")
        with pytest.raises(OutputError, match="is a file"):
            plan_outputs([_image(inp / "x.jpg")], tmp_path / "out" / "sub", ".png")
    elif case == "output_is_a_folder":
        (tmp_path / "out" / "x.png").mkdir(parents=True)
        with pytest.raises(OutputError, match="exist as folders"):
            plan_outputs([_image(inp / "x.jpg")], tmp_path / "out", ".png", overwrite=True)
    else:
        ckpt = tmp_path / "out" / "x.png"
        ckpt.parent.mkdir()
        ckpt.write_bytes(b"weights")
        with pytest.raises(OutputError, match="would replace input files"):
            plan_outputs([_image(inp / "x.jpg")], tmp_path / "out", ".png", overwrite=True, protected=[ckpt])


def test_predict_never_overwrites_an_input_even_with_overwrite(files, tmp_path: Path, capsys) -> None:
    image = _image(tmp_path / "photo.png")
    before = image.read_bytes()
    assert main(["predict", str(files["ckpt"]), str(image), "--out", str(tmp_path), "--overwrite"]) == 2
    assert "would replace input files" in capsys.readouterr().err
    assert image.read_bytes() == before


def test_predict_keeps_relative_paths_and_replaces_only_when_asked(files, tmp_path: Path, capsys) -> None:
    a, b = _image(tmp_path / "in" / "day" / "x.jpg"), _image(tmp_path / "in" / "night" / "x.jpg", seed=3)
    out = tmp_path / "out"
    assert main(["predict", str(files["ckpt"]), str(a), str(b), "--out", str(out)]) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["day/x.png", "night/x.png"]
    (out / "day" / "x.png").write_bytes(b"keep me")
    assert main(["predict", str(files["ckpt"]), str(a), str(b), "--out", str(out)]) == 2
    assert "already exist" in capsys.readouterr().err and (out / "day" / "x.png").read_bytes() == b"keep me"
    assert main(["predict", str(files["ckpt"]), str(a), str(b), "--out", str(out), "--overwrite"]) == 0
    with Image.open(out / "day" / "x.png") as im:
        assert im.size == (30, 20)


def test_one_bad_image_does_not_drop_the_others(files, tmp_path: Path, capsys) -> None:
    good1, good2 = _image(tmp_path / "1.jpg"), _image(tmp_path / "3.jpg", seed=2)
    bad = tmp_path / "2.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    out = tmp_path / "out"
    code = main(["predict", str(files["ckpt"]), str(good1), str(bad), str(good2), "--out", str(out)])
    err = capsys.readouterr().err.splitlines()
    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == ["1.png", "3.png"]
    assert any("2.jpg" in line and "cannot be read" in line for line in err)
    assert err[-1] == f"semask predict: error: 1 of 3 images failed: {bad}"


def test_color_without_a_palette_uses_the_default_and_says_so(files, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["predict", str(files["plain"]), str(files["img"]), "--out", str(out), "--color"]) == 0
    assert "has no palette: using semask's default palette for 3 classes" in capsys.readouterr().err
    with Image.open(out / "a.png") as im:
        assert im.mode == "P" and im.getpalette()[:9] == [c for rgb in semask.viz.default_palette(3)
                                                          for c in rgb]


# --------------------------------------------------------------------------------------------- toy-data --overwrite
def _foreign_in_images(root: Path) -> None:
    (root / "images" / "training" / "my_photo.jpg").write_bytes(b"precious")


def _modified(root: Path) -> None:
    path = next((root / "annotations" / "validation").iterdir())
    path.write_bytes(path.read_bytes() + b"edited")


def _images_is_a_link(root: Path) -> None:
    shutil.rmtree(root / "images")
    (root.parent / "elsewhere").mkdir()
    (root.parent / "elsewhere" / "photo.jpg").write_bytes(b"precious")
    (root / "images").symlink_to(root.parent / "elsewhere")


def _no_manifest(root: Path) -> None:
    (root / "toy_meta.json").unlink()


def _not_a_toy_manifest(root: Path) -> None:
    (root / "toy_meta.json").write_text(json.dumps({"name": "my-dataset"}))


@pytest.mark.parametrize("damage", [_foreign_in_images, _modified, _images_is_a_link, _no_manifest,
                                    _not_a_toy_manifest])
def test_toy_overwrite_refuses_what_semask_did_not_write(tmp_path: Path, damage) -> None:
    root = make_toy_dataset(tmp_path / "toy", num_train=2, num_val=1, size=64)
    damage(root)
    before = {p: (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}
    with pytest.raises(OutputError, match="nothing was changed"):
        make_toy_dataset(root, num_train=3, num_val=1, size=64, overwrite=True)
    assert {p: (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")} == before
    assert not list(root.glob(".toy-partial-*"))


def test_toy_overwrite_replaces_its_own_files_and_keeps_the_rest(tmp_path: Path) -> None:
    root = make_toy_dataset(tmp_path / "toy", num_train=3, num_val=1, size=64)
    (root / "notes.txt").write_text("mine")
    meta = json.loads((root / "toy_meta.json").read_text())
    assert meta["version"] == 2 and len(meta["files"]) == 8
    make_toy_dataset(root, seed=1, num_train=2, num_val=2, size=64, overwrite=True)
    assert len(ToyDataset(root, "training")) == 2 and len(ToyDataset(root, "validation")) == 2
    assert (root / "notes.txt").read_text() == "mine"
    # a dataset written before manifests existed (version 1: names follow from the counts) is still recognised
    meta = json.loads((root / "toy_meta.json").read_text())
    del meta["files"]
    meta["version"] = 1
    (root / "toy_meta.json").write_text(json.dumps(meta))
    make_toy_dataset(root, num_train=1, num_val=1, size=64, overwrite=True)
    assert len(ToyDataset(root, "training")) == 1


def test_a_failing_toy_run_leaves_no_staging_and_the_old_dataset(tmp_path: Path, monkeypatch) -> None:
    root = make_toy_dataset(tmp_path / "toy", num_train=2, num_val=1, size=64)
    before = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    calls = []

    def failing(rng, size):
        calls.append(size)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return render(rng, size)

    from semask.data import toy
    render = toy.render_scene
    monkeypatch.setattr(toy, "render_scene", failing)
    with pytest.raises(OSError, match="No space left"):
        make_toy_dataset(root, seed=5, num_train=3, num_val=1, size=64, overwrite=True)
    assert {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


# --------------------------------------------------------------------------------------------- killed writes
def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the writer exited early: {proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            raise AssertionError("the writer never reached the point to kill it at")
        time.sleep(0.005)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


SAVE_FOREVER = """
import sys, torch, semask
from semask.checkpoint import save_checkpoint
model = semask.create_model("semask_toy_fpn", num_classes=3)
blob = torch.ones(16 * 2**20)  # 64 MB, so that each write takes a while
while True:
    save_checkpoint(sys.argv[1], model, extra={"blob": blob})
"""


@pytest.mark.slow
def test_checkpoint_save_killed_midway_leaves_no_torn_file(tmp_path: Path) -> None:
    target = tmp_path / "run" / "latest.pth"
    target.parent.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", SAVE_FOREVER, str(target)], env=ENV, stderr=subprocess.PIPE,
                            text=True)
    try:
        # kill it while a write is under way (its temporary file exists) and a complete file is already there
        _wait_for(lambda: target.exists() and any(p.suffix == ".tmp" for p in target.parent.iterdir()), proc)
        _kill(proc)
    finally:
        _kill(proc)
    stale = [p for p in target.parent.iterdir() if p.suffix == ".tmp"]
    assert len(stale) == 1 and stale[0].name.startswith(".latest.pth.") and f".{proc.pid}-" in stale[0].name
    assert semask.load_checkpoint(target).num_classes == 3  # the last complete checkpoint, intact
    model = semask.create_model("semask_toy_fpn", num_classes=3)
    save_checkpoint(target, model)  # the next write into the folder removes the dead process's leftover
    assert sorted(p.name for p in target.parent.iterdir()) == ["latest.pth"]


def test_stale_temp_files_of_live_processes_are_kept(tmp_path: Path) -> None:
    host = __import__("socket").gethostname()
    live = tmp_path / f".x.pth.{host}.{os.getpid()}-0123abcd.tmp"  # a write in progress in this process
    live.write_bytes(b"partial")
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout.strip()
    dead = tmp_path / f".x.pth.{host}.{dead_pid}-0123abcd.tmp"
    dead.write_bytes(b"partial")
    other_host = tmp_path / f".x.pth.otherhost.{dead_pid}-0123abcd.tmp"  # maybe alive on a machine sharing the disk
    other_host.write_bytes(b"partial")
    users = tmp_path / "x.pth.tmp"  # not named by semask
    users.write_bytes(b"mine")
    assert remove_stale_temp_files(tmp_path) == [dead]
    assert live.exists() and other_host.exists() and users.exists() and not dead.exists()


TOY_SLOWLY = """
import sys
from semask.data.toy import make_toy_dataset
make_toy_dataset(sys.argv[1], num_train=2000, num_val=1, size=64)
"""


@pytest.mark.slow
def test_toy_data_killed_midway_leaves_no_dataset_and_is_cleaned_next_time(tmp_path: Path) -> None:
    root = tmp_path / "toy"
    proc = subprocess.Popen([sys.executable, "-c", TOY_SLOWLY, str(root)], env=ENV, stderr=subprocess.PIPE,
                            text=True)
    try:
        _wait_for(lambda: any(len(list((p / "images" / "training").glob("*.jpg"))) > 5
                              for p in root.glob(".toy-partial-*")) if root.exists() else False, proc)
        _kill(proc)
    finally:
        _kill(proc)
    assert [p.name for p in root.iterdir()] == [f".toy-partial-{__import__('socket').gethostname()}.{proc.pid}"]
    make_toy_dataset(root, num_train=2, num_val=1, size=64)
    assert sorted(p.name for p in root.iterdir()) == ["annotations", "images", "toy_meta.json"]


def test_atomic_writes_fsync_the_file_before_the_rename_and_the_folder_after(tmp_path: Path, monkeypatch) -> None:
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(dst).name))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with atomic_path(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"data")
    assert events == [("fsync", "file"), ("replace", "out.bin"), ("fsync", "folder")]


UMASK_WRITES = """
import os, sys, numpy as np, torch, semask
from semask.checkpoint import save_checkpoint
from semask.viz import save_label_map
os.umask(0o027)
out = sys.argv[1]
save_checkpoint(os.path.join(out, "ckpt.pth"), semask.create_model("semask_toy_fpn", num_classes=3))
save_label_map(np.zeros((4, 4), dtype=np.int64), os.path.join(out, "label.png"))
semask.data.make_toy_dataset(os.path.join(out, "toy"), num_train=1, num_val=1, size=64)
keep = os.path.join(out, "private.png")
open(keep, "wb").close()
os.chmod(keep, 0o600)
save_label_map(np.zeros((4, 4), dtype=np.int64), keep)
"""


def test_files_get_the_users_permissions(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-c", UMASK_WRITES, str(tmp_path)], env=ENV, check=True, timeout=300)
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in tmp_path.rglob("*") if p.is_file()}
    assert modes.pop("private.png") == 0o600  # a replaced file keeps its own permissions
    assert modes and set(modes.values()) == {0o640}, modes  # 0666 less the umask, never mkstemp's 0600


# --------------------------------------------------------------------------------------------- command-line errors
CLI_CASES = [
    # (name, arguments (with {placeholders}), exit status, text expected on stderr)
    ("output_replaces_input", ["predict", "{ckpt}", "{img2}", "--out", "{in}", "--overwrite"], 2,
     "would replace input files"),
    ("colliding_outputs", ["predict", "{ckpt}", "{img}", "{img_same_stem}", "--out", "{out}"], 2,
     "written by more than one input"),
    ("out_is_a_file", ["predict", "{ckpt}", "{img}", "--out", "{ckpt}"], 2, "is a file"),
    ("image_is_a_folder", ["predict", "{ckpt}", "{in}", "--out", "{out}"], 2, "are folders, not files"),
    ("image_missing", ["predict", "{ckpt}", "{base}/nope.jpg", "--out", "{out}"], 2, "do not exist"),
    ("scale_zero", ["predict", "{ckpt}", "{img}", "--out", "{out}", "--scale", "0", "0"], 2,
     "scale[0] must be a positive int, got 0"),
    ("stride_above_crop", ["predict", "{ckpt}", "{img}", "--out", "{out}", "--mode", "slide", "--crop-size", "32",
                           "--stride", "64"], 2, "would leave pixels uncovered"),
    ("bad_device", ["predict", "{ckpt}", "{img}", "--out", "{out}", "--device", "gpu0"], 2, "not a device name"),
    ("argparse_type", ["predict", "{ckpt}", "{img}", "--out", "{out}", "--scale", "a", "b"], 2, "invalid int value"),
    ("checkpoint_missing", ["info", "{base}/absent.pth"], 2, "does not exist"),
    ("crafted_checkpoint", ["info", "{crafted}"], 1, "max_classes"),
    ("toy_root_is_a_file", ["toy-data", "{ckpt}"], 2, "is a file"),
    ("benchmark_batch_zero", ["benchmark", "--batch-size", "0", "--tasks", "inference"], 2,
     "must be at least 1: batch_size=0"),
]


@pytest.fixture(scope="module")
def cli_paths(files) -> dict[str, str]:
    base = files["base"]
    crafted = base / "crafted.pth"
    sd = to_official_checkpoint(semask.create_model("semask_toy_fpn", num_classes=3))["state_dict"]
    sd["decode_head.conv_seg.weight"] = torch.zeros(20_000, 64, 1, 1)  # 5 MB, claiming 20000 classes
    sd["decode_head.conv_seg.bias"] = torch.zeros(20_000)
    torch.save({"state_dict": sd}, crafted)
    same_stem = _image(base / "in" / "a.png", seed=4)
    return {"base": str(base), "ckpt": str(files["ckpt"]), "img": str(files["img"]), "img2": str(files["img2"]),
            "img_same_stem": str(same_stem), "in": str(base / "in"), "out": str(base / "out"),
            "crafted": str(crafted)}


@pytest.mark.slow
@pytest.mark.parametrize("name, argv, status, expected", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_command_line_errors_are_one_line_with_the_right_status(cli_paths, name, argv, status, expected) -> None:
    before = {p: p.stat().st_mtime_ns for p in Path(cli_paths["base"]).rglob("*")}
    result = _semask(*[a.format(**cli_paths) for a in argv])
    assert result.returncode == status, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if ": error:" in line]
    assert len(errors) == 1, result.stderr
    assert {p: p.stat().st_mtime_ns for p in Path(cli_paths["base"]).rglob("*")} == before  # nothing written


@pytest.mark.slow
def test_debug_shows_the_traceback(cli_paths) -> None:
    result = _semask("info", cli_paths["crafted"], "--debug")
    assert result.returncode == 1 and "Traceback" in result.stderr and "CheckpointLimitError" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA; the error is for machines without")
def test_cuda_without_cuda_is_a_usage_error(files, tmp_path: Path, capsys) -> None:
    assert main(["predict", str(files["ckpt"]), str(files["img"]), "--out", str(tmp_path), "--device",
                 "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["read_only_folder", "sysfs"])
def test_unwritable_output_folder_is_a_usage_error(files, tmp_path: Path, capsys, where: str) -> None:
    if where == "sysfs":
        out = Path("/sys/semask-test-output")  # no one may create files here, root included
        if not Path("/sys").is_dir():
            pytest.skip("no /sys on this system")
    else:
        out = tmp_path / "ro"
        out.mkdir()
        out.chmod(0o555)
        if os.geteuid() == 0:  # root ignores permission bits; an immutable folder stops it too
            if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
                pytest.skip("running as root without chattr: cannot make a folder root may not write")
    try:
        assert main(["predict", str(files["ckpt"]), str(files["img"]), "--out", str(out / "sub")]) == 2
        err = capsys.readouterr().err
        assert "cannot be written: no write permission" in err and len(err.splitlines()) == 1
        assert not (out / "sub").exists()
    finally:
        if where != "sysfs" and os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(out)], check=True)


@pytest.mark.parametrize("error, status", [
    (UsageError("x"), 2), (OutputExistsError("x"), 2), (FileNotFoundError("x"), 2), (PermissionError("x"), 2),
    (semask.checkpoint.CheckpointError("x"), 1), (OSError(28, "No space left on device"), 1),
    (RuntimeError("x"), 1), (BatchError([("a", ValueError("x"))], 2), 1), (ValueError("x"), 2), (KeyError("x"), 2),
    (semask.data.DatasetError("x"), 1), (MemoryError(), 1),
])
def test_exit_status_policy(error, status) -> None:
    assert exit_status(error) == status


def test_error_lines() -> None:
    assert list(error_lines(KeyError("unknown model 'x'"))) == ["unknown model 'x'"]
    assert list(error_lines(UsageError("two\n  lines"))) == ["two lines"]
    assert list(error_lines(RuntimeError("boom"))) == ["RuntimeError: boom (unexpected; run with --debug for the "
                                                       "traceback)"]
    batch = BatchError([("a.jpg", ValueError("bad")), ("b.jpg", ValueError("b.jpg is broken"))], 3, "images")
    assert list(error_lines(batch)) == ["a.jpg: bad", "b.jpg is broken", "2 of 3 images failed: a.jpg, b.jpg"]


def test_predict_refuses_models_whose_labels_do_not_fit_a_png(tmp_path: Path, capsys) -> None:
    model = semask.create_model("semask_toy_fpn", num_classes=300)
    torch.save(to_official_checkpoint(model), tmp_path / "wide.pth")
    image = _image(tmp_path / "x.jpg")
    assert main(["predict", str(tmp_path / "wide.pth"), str(image), "--out", str(tmp_path / "out")]) == 2
    assert "PNG label maps hold at most 256" in capsys.readouterr().err and not (tmp_path / "out").exists()
