"""Checkpoints from URLs (torch.hub's download cache, progress bar, SHA-256) and torch.hub entry points.

No test touches the network: URLs are ``file://`` or served by an HTTP server on 127.0.0.1 that the test
starts (and that stops by itself after a minute if a test hangs). torch.hub's directory is a temporary one.
"""
from __future__ import annotations

import functools
import hashlib
import http.server
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import semask
from semask.checkpoint import CheckpointError, cache_path, download_checkpoint, to_official_checkpoint
from semask.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]


class _Server:
    """A static file server on 127.0.0.1 that records the paths it was asked for."""

    def __init__(self, directory: Path):
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
                outer.requests.append(self.path)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                     functools.partial(Handler, directory=str(directory)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.deadline = threading.Timer(60.0, self.httpd.shutdown)  # bounded even if a test hangs

    def __enter__(self) -> "_Server":
        self.thread.start()
        self.deadline.start()
        return self

    def __exit__(self, *exc) -> None:
        self.deadline.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def toy() -> semask.SeMaskFPN:
    torch.manual_seed(0)
    return semask.create_model("semask_toy_fpn", num_classes=3, class_names=("a", "b", "c")).eval()


def _logits(model: semask.SeMaskFPN) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.randn(1, 3, 40, 52, generator=torch.Generator().manual_seed(3))).logits


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_file_url_is_cached_in_torch_hub_dir(toy, tmp_path: Path, hub_dir: Path) -> None:
    src = semask.save_checkpoint(tmp_path / "toy.safetensors", toy)
    url = src.resolve().as_uri()
    loaded = semask.load_checkpoint(url, sha256=_sha256(src))
    cached = cache_path(url)  # named by a hash of the whole URL, beside the file name
    assert cached.parent == hub_dir / "checkpoints" and cached.name.startswith("toy.")
    assert cached.read_bytes() == src.read_bytes()
    assert torch.equal(_logits(loaded), _logits(toy)) and loaded.class_names == ("a", "b", "c")
    src.unlink()  # the second load comes from the cache
    assert torch.equal(_logits(semask.load_checkpoint(url)), _logits(toy))


def test_loopback_http_download_with_progress_and_sha256(toy, tmp_path: Path, hub_dir: Path, capsys) -> None:
    served = tmp_path / "served"
    served.mkdir()
    torch.save(to_official_checkpoint(toy), served / "semask_toy_fpn_official.pth")
    digest = _sha256(served / "semask_toy_fpn_official.pth")
    with _Server(served) as server:
        url = f"{server.url}/semask_toy_fpn_official.pth"
        loaded = semask.load_checkpoint(url, sha256=digest[:12])  # a prefix, as in torch.hub's file names
        assert "100%" in capsys.readouterr().err  # the progress bar
        assert torch.equal(_logits(loaded), _logits(toy)) and loaded.class_names == ("a", "b", "c")
        semask.load_checkpoint(url, sha256=digest)  # cached: checked, not downloaded again
        assert server.requests == ["/semask_toy_fpn_official.pth"]
        with pytest.raises(FileNotFoundError, match="missing.pth"):
            semask.load_checkpoint(f"{server.url}/missing.pth")
    assert not (hub_dir / "checkpoints" / "missing.pth").exists()


def test_sha256_mismatch_keeps_nothing(toy, tmp_path: Path, hub_dir: Path) -> None:
    src = semask.save_checkpoint(tmp_path / "toy.pth", toy)
    with pytest.raises(CheckpointError, match="invalid hash value"):
        semask.load_checkpoint(src.resolve().as_uri(), sha256="0" * 64)
    assert list((hub_dir / "checkpoints").iterdir()) == []  # no partial or wrong file in the cache
    with pytest.raises(CheckpointError, match="SHA-256 of"):  # local files are checked too
        semask.load_checkpoint(src, sha256="0" * 16)
    with pytest.raises(ValueError, match="hexadecimal"):
        semask.load_checkpoint(src, sha256="not-a-hash")
    with pytest.raises(ValueError, match="file name"):
        download_checkpoint("http://127.0.0.1:9/")  # refused before any connection: no file name


def test_bad_urls_and_hashes_are_refused_before_any_connection(hub_dir: Path) -> None:
    with pytest.raises(UsageError, match="expected a URL"):
        download_checkpoint("model.pth")
    with pytest.raises(UsageError, match="hexadecimal"):
        download_checkpoint("http://127.0.0.1:9/model.pth", sha256="not-a-hash")
    assert not (hub_dir / "checkpoints").exists()  # refused before the cache is touched


def test_pretrained_backbone_from_a_url(tmp_path: Path, hub_dir: Path) -> None:
    torch.manual_seed(2)
    donor = semask.create_model("swin_toy_fpn", num_classes=4)
    weights = {k: v for k, v in donor.backbone.state_dict().items() if not k.startswith("norm")}
    served = tmp_path / "served"
    served.mkdir()
    torch.save({"model": weights}, served / "swin_toy_imagenet.pth")
    model = semask.create_model("swin_toy_fpn", num_classes=4)
    with _Server(served) as server:
        report = semask.load_pretrained_backbone(model, f"{server.url}/swin_toy_imagenet.pth")
    assert report.loaded_fraction == 1.0
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in weights.items())


# ----------------------------------------------------------------------------------------------- torch.hub
def _clone(tmp_path: Path) -> Path:
    """What a clone of the repository holds for torch.hub: hubconf.py and the package."""
    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copy2(ROOT / "hubconf.py", clone / "hubconf.py")
    shutil.copytree(ROOT / "semask", clone / "semask", ignore=shutil.ignore_patterns("__pycache__"))
    return clone


_HUB_SCRIPT = """
import importlib.util, json, sys
import torch

clone, hub, ckpt_url, out = sys.argv[1:5]
torch.hub.set_dir(hub)
fresh = torch.hub.load(clone, "semask_tiny_fpn", source="local", num_classes=19)
spec = importlib.util.spec_from_file_location("hubconf_listing", clone + "/hubconf.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
entries = sorted(f for f in dir(module) if callable(getattr(module, f)) and not f.startswith("_"))  # torch.hub.list's rule
loaded = torch.hub.load(clone, "semask_toy_fpn", source="local", pretrained=ckpt_url,
                        palette=[[1, 1, 1], [2, 2, 2], [3, 3, 3]])
with torch.no_grad():
    logits = loaded(torch.randn(1, 3, 40, 52, generator=torch.Generator().manual_seed(3))).logits
torch.save(logits, out)
import semask
print(json.dumps({"entries": entries, "semask_file": semask.__file__, "fresh": [fresh.name, fresh.num_classes,
                  fresh.training], "loaded": [loaded.name, list(loaded.class_names), loaded.palette, loaded.training]}))
"""


def test_torch_hub_load_from_a_local_clone(toy, tmp_path: Path) -> None:
    clone = _clone(tmp_path)
    ckpt = semask.save_checkpoint(tmp_path / "toy.safetensors", toy)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the clone's package, not ours
    out = tmp_path / "logits.pt"
    result = subprocess.run([sys.executable, "-c", _HUB_SCRIPT, str(clone), str(tmp_path / "hub"),
                             ckpt.resolve().as_uri(), str(out)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["entries"] == semask.list_models()
    assert Path(report["semask_file"]).is_relative_to(clone)
    assert report["fresh"] == ["semask_tiny_fpn", 19, True]
    assert report["loaded"] == ["semask_toy_fpn", ["a", "b", "c"], [[1, 1, 1], [2, 2, 2], [3, 3, 3]], False]
    assert torch.equal(torch.load(out, weights_only=True), _logits(toy))
    assert len(list((tmp_path / "hub" / "checkpoints").glob("toy.*.safetensors"))) == 1  # through the hub cache


def test_hub_entry_points_check_their_arguments(toy, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("hubconf_under_test", ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    ckpt = semask.save_checkpoint(tmp_path / "toy.pth", toy)
    with pytest.raises(ValueError, match="holds a 'semask_toy_fpn' model"):
        hubconf.semask_tiny_fpn(pretrained=str(ckpt))
    with pytest.raises(ValueError, match="has 3 classes"):
        hubconf.semask_toy_fpn(pretrained=str(ckpt), num_classes=5)
    with pytest.raises(ValueError, match="drop"):
        hubconf.semask_toy_fpn(pretrained=str(ckpt), drop_path_rate=0.2)
    with pytest.raises(ValueError, match="2 entries for 3 classes"):
        hubconf.semask_toy_fpn(pretrained=str(ckpt), class_names=["x", "y"])
    model = hubconf.swin_toy_fpn(num_classes=2, drop_path_rate=0.0)
    assert model.name == "swin_toy_fpn" and model.config.drop_path_rate == 0.0
    assert hubconf.semask_toy_fpn.__doc__.startswith("`semask_toy_fpn`")


def test_training_starts_from_imagenet_weights_at_a_url(tiny_toy_root, tmp_path: Path, hub_dir: Path) -> None:
    from semask.engine.config import apply_overrides, get_preset
    from semask.engine.train import train
    from helpers import tiny_overrides

    donor = semask.create_model("swin_toy_fpn").backbone.state_dict()
    served = tmp_path / "served"
    served.mkdir()
    torch.save({"model": {k: v for k, v in donor.items() if not k.startswith("norm")}}, served / "swin_toy.pth")
    with _Server(served) as server:
        url = f"{server.url}/swin_toy.pth"
        config = apply_overrides(get_preset("toy"), tiny_overrides(tiny_toy_root, **{
            "model.pretrained": url, "schedule.iters": 1, "train.eval_interval": 0}))
        result = train(config, tmp_path / "run", progress=False)
    report = next(r for r in result.history if r["kind"] == "pretrained")
    assert report["source"] == url and report["loaded_fraction"] == 1.0
    assert cache_path(url).is_file() and cache_path(url).parent == hub_dir / "checkpoints"
