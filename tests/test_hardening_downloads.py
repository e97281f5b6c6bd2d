"""Issue 14, class 3: downloads are bounded.

Every way a server can misbehave -- never answer, stop in the middle, send forever, declare a huge body, send more
or less than it declared, drip slowly, redirect elsewhere -- is played by a loopback server (127.0.0.1, in a thread
of this process, stopped by itself after two minutes), against every entry point that downloads: the download
itself, `load_checkpoint`, `load_pretrained_backbone`, `convert_to_safetensors`, training's `model.pretrained`, and
the `semask` command (`info`, `convert-weights`, `predict`, `train`) in subprocesses. Each must fail in bounded time
with an error naming the URL and the reason, and leave nothing in the cache. The limits are made small here (0.5 s
time-outs, 64 KiB) through `DOWNLOAD_LIMITS` or, for the command line, the ``SEMASK_DOWNLOAD_*`` variables.
"""
from __future__ import annotations

import hashlib
import http.server
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

import semask
from semask.checkpoint import (DOWNLOAD_LIMITS, CheckpointError, DownloadError, DownloadLimitError, DownloadLimits,
                               DownloadNotFoundError, cache_path, convert_to_safetensors, download_checkpoint)
from semask.checkpoint import remote
from semask.errors import LimitError, UsageError

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 64 * 1024
SMALL = {"max_bytes": MAX_BYTES, "connect_timeout": 0.5, "read_timeout": 0.5, "max_seconds": 2.0}
ENV_NAMES = {"max_bytes": "SEMASK_DOWNLOAD_MAX_BYTES", "connect_timeout": "SEMASK_DOWNLOAD_CONNECT_TIMEOUT",
             "read_timeout": "SEMASK_DOWNLOAD_READ_TIMEOUT", "max_seconds": "SEMASK_DOWNLOAD_MAX_SECONDS"}


# ----------------------------------------------------------------------------------------------- the server
class HostileServer:
    """A loopback HTTP server whose paths misbehave in one way each (the first part of the path says how)."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests: list[str] = []
        self.stop = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                outer.requests.append(self.path)
                kind = self.path.strip("/").split("/")[0]
                try:
                    getattr(outer, "_" + kind.replace("-", "_"), outer._file)(self)
                except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
                    pass  # the client gave up, as it should

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.deadline = threading.Timer(120.0, self.close)  # bounded even if a test hangs

    def __enter__(self) -> "HostileServer":
        self.thread.start()
        self.deadline.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()

    def __exit__(self, *exc) -> None:
        self.deadline.cancel()
        self.close()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    # --- behaviours (h is the request handler)
    def _head(self, h, length=None, status=200, extra=()) -> None:
        h.send_response(status)
        if length is not None:
            h.send_header("Content-Length", str(length))
        for key, value in extra:
            h.send_header(key, value)
        h.end_headers()
        h.wfile.flush()

    def _forever(self, h, chunk: bytes = b"\0" * 8192) -> None:
        while not self.stop.is_set():
            h.wfile.write(chunk)

    def _file(self, h) -> None:
        body = self.files.get(h.path)
        if body is None:
            self._head(h, 0, status=404)
            return
        self._head(h, len(body))
        h.wfile.write(body)

    def _stall(self, h) -> None:  # accepts the connection, never answers
        self.stop.wait(60)

    def _stall_body(self, h) -> None:  # 100 of 1000 bytes, then silence
        self._head(h, 1000)
        h.wfile.write(b"x" * 100)
        h.wfile.flush()
        self.stop.wait(60)

    def _endless(self, h) -> None:  # no Content-Length: the body ends when the connection does, i.e. never
        self._head(h)
        self._forever(h)

    def _endless_chunked(self, h) -> None:
        self._head(h, extra=[("Transfer-Encoding", "chunked")])
        self._forever(h, b"2000\r\n" + b"\0" * 0x2000 + b"\r\n")

    def _huge(self, h) -> None:  # declares a terabyte, then sends for as long as it is read
        self._head(h, 10**12)
        self._forever(h)

    def _more(self, h) -> None:  # declares 100 bytes, then sends forever
        self._head(h, 100)
        self._forever(h)

    def _more_later(self, h) -> None:  # the declared 100 bytes, a pause, then more
        self._head(h, 100)
        h.wfile.write(b"x" * 100)
        h.wfile.flush()
        time.sleep(0.2)
        h.wfile.write(b"y" * 100)

    def _short(self, h) -> None:  # closes after 100 of the 1000 bytes it declared
        self._head(h, 1000)
        h.wfile.write(b"x" * 100)

    def _drip(self, h) -> None:  # a byte every 50 ms: never silent for a read time-out, never done
        self._head(h, 1000)
        while not self.stop.is_set():
            h.wfile.write(b"x")
            h.wfile.flush()
            time.sleep(0.05)

    def _slow_headers(self, h) -> None:  # headers at a byte every 50 ms, forever
        h.wfile.write(b"HTTP/1.0 200 OK\r\n")
        while not self.stop.is_set():
            h.wfile.write(b"X-Slow: " + b"a" * 1 + b"\r\n")
            h.wfile.flush()
            time.sleep(0.05)

    def _error(self, h) -> None:
        self._head(h, 0, status=500)

    def _redirect_ftp(self, h) -> None:
        self._head(h, 0, status=302, extra=[("Location", "ftp://127.0.0.1/model.pth")])

    def _redirect_endless(self, h) -> None:  # a redirect whose own body never ends: it must not be read
        self._head(h, status=302, extra=[("Location", "/a/model.pth")])
        self._forever(h)

    def _keep_open(self, h) -> None:  # the whole body, then the connection stays open (ignoring "close")
        body = self.files["/a/model.pth"]
        self._head(h, len(body))
        h.wfile.write(body)
        h.wfile.flush()
        self.stop.wait(3)


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    torch.manual_seed(0)
    model = semask.create_model("semask_toy_fpn", num_classes=3, class_names=("a", "b", "c"))
    return semask.save_checkpoint(tmp_path_factory.mktemp("ckpt") / "toy.pth", model).read_bytes()


@pytest.fixture
def server() -> Iterator[HostileServer]:
    with HostileServer({"/a/model.pth": b"A" * 1000, "/b/model.pth": b"B" * 2000}) as s:
        yield s


@pytest.fixture
def small_limits(monkeypatch) -> DownloadLimits:
    for name, value in SMALL.items():
        monkeypatch.setattr(DOWNLOAD_LIMITS, name, value)
    for variable in ENV_NAMES.values():
        monkeypatch.delenv(variable, raising=False)
    return DOWNLOAD_LIMITS


def _cache_files(hub: Path) -> list[str]:
    folder = hub / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture
def refused_port() -> str:
    """A loopback URL where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/refused/model.pth"


@pytest.fixture
def unaccepted_port() -> Iterator[str]:
    """A loopback URL whose listen queue is full, so that connecting hangs (a server that never accepts)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):  # fill the queue; later connections wait
        filler = socket.socket()
        filler.settimeout(0.2)
        try:
            filler.connect(("127.0.0.1", port))
        except OSError:
            pass
        fillers.append(filler)
    try:
        yield f"http://127.0.0.1:{port}/unaccepted/model.pth"
    finally:
        for s in (*fillers, listener):
            s.close()


# ----------------------------------------------------------------------------------------------- the table
# case -> (path on the hostile server, or a fixture name for other URLs; error class; what the message says)
CASES = {
    "never answers": ("/stall/model.pth", DownloadError, r"sent no answer within 0\.5 s"),
    "stops mid-body": ("/stall-body/model.pth", DownloadError, r"sent nothing for 0\.5 s after 100 bytes"),
    "endless body": ("/endless/model.pth", DownloadLimitError, r"longer than .*max_bytes = 65,536 bytes.*cut"),
    "endless chunked body": ("/endless-chunked/model.pth", DownloadLimitError, r"longer than .*max_bytes = 65,536"),
    "huge Content-Length": ("/huge/model.pth", DownloadLimitError,
                            r"declares 1,000,000,000,000 bytes, above .*max_bytes = 65,536 \(nothing was read\)"),
    "more than declared": ("/more/model.pth", DownloadError, r"longer than the 100 bytes declared"),
    "more than declared, later": ("/more-later/model.pth", DownloadError, r"longer than the 100 bytes declared"),
    "closes early": ("/short/model.pth", DownloadError, r"closed the connection after 100 of the 1,000 bytes"),
    "drips the body": ("/drip/model.pth", DownloadError, r"took longer than 2 s"),
    "drips the headers": ("/slow-headers/model.pth", DownloadError, r"took longer than 2 s"),
    "not found": ("/missing/model.pth", DownloadNotFoundError, r"answered 404"),
    "server error": ("/error/model.pth", DownloadError, r"answered 500"),
    "redirect to ftp": ("/redirect-ftp/model.pth", DownloadError, r"only http and https are followed"),
    "connection refused": ("refused_port", DownloadError, r"refused"),
    "never accepts": ("unaccepted_port", DownloadError, r"no connection within 0\.5 s"),
    "device file": ("file:///dev/zero", DownloadError, r"longer than the 0 bytes declared"),
}


def _url(case: str, server: HostileServer, request) -> str:
    where = CASES[case][0]
    if where.startswith("/"):
        return server.url + where
    if where.startswith("file:"):
        if not os.path.exists("/dev/zero"):
            pytest.skip("no /dev/zero here")
        return where
    return request.getfixturevalue(where)


def _toy_model() -> semask.SeMaskFPN:
    return semask.create_model("semask_toy_fpn", num_classes=3)


ENTRY_POINTS: dict[str, Callable[[str, Path], object]] = {
    "download_checkpoint": lambda url, tmp: download_checkpoint(url, progress=False),
    "load_checkpoint": lambda url, tmp: semask.load_checkpoint(url),
    "load_pretrained_backbone": lambda url, tmp: semask.load_pretrained_backbone(_toy_model(), url),
    "convert_to_safetensors": lambda url, tmp: convert_to_safetensors(url, tmp / "out.safetensors"),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("case", CASES)
def test_a_misbehaving_server_fails_in_bounded_time_and_leaves_nothing(
        case, entry, server, hub_dir, small_limits, tmp_path, request) -> None:
    url = _url(case, server, request)
    error, reason = CASES[case][1:]
    started = time.monotonic()
    with pytest.raises(error, match=reason) as caught:
        ENTRY_POINTS[entry](url, tmp_path)
    assert time.monotonic() - started < 15  # bounded: the limits are 0.5 s and 2 s
    assert str(caught.value).startswith(f"cannot download {url!r}: ")  # the URL and the reason
    assert _cache_files(hub_dir) == []  # no partial file, no temporary file
    assert not (tmp_path / "out.safetensors").exists()


def test_error_classes_fit_the_hierarchy() -> None:
    assert issubclass(DownloadError, OSError) and issubclass(DownloadError, semask.errors.SemaskError)
    assert issubclass(DownloadLimitError, LimitError) and issubclass(DownloadNotFoundError, FileNotFoundError)
    assert semask.errors.exit_status(DownloadError("x")) == 1
    assert semask.errors.exit_status(DownloadLimitError("x")) == 1
    assert semask.errors.exit_status(DownloadNotFoundError("x")) == 2


def test_a_huge_declared_body_is_refused_before_it_is_read(server, hub_dir, small_limits) -> None:
    started = time.monotonic()
    with pytest.raises(DownloadLimitError, match="nothing was read"):
        download_checkpoint(server.url + "/huge/model.pth", progress=False)
    assert time.monotonic() - started < 5
    assert _cache_files(hub_dir) == []


def test_the_cache_key_is_the_whole_url(server, hub_dir, small_limits) -> None:
    a, b = server.url + "/a/model.pth", server.url + "/b/model.pth"
    path_a = download_checkpoint(a, progress=False)
    path_b = download_checkpoint(b, progress=False)
    assert path_a != path_b and path_a.read_bytes() == b"A" * 1000 and path_b.read_bytes() == b"B" * 2000
    assert path_a.name.startswith("model.") and path_a.suffix == ".pth"  # the file name and suffix stay readable
    assert download_checkpoint(b, progress=False) == path_b  # cached: not downloaded again
    assert download_checkpoint(a, progress=False) == path_a
    assert server.requests == ["/a/model.pth", "/b/model.pth"]
    assert cache_path(a + "?v=2") != cache_path(a) and cache_path(a + "#x") != cache_path(a)
    assert _cache_files(hub_dir) == sorted([path_a.name, path_b.name])


def test_a_server_that_keeps_the_connection_open_after_the_body_is_fine(server, hub_dir, small_limits) -> None:
    path = download_checkpoint(server.url + "/keep-open/model.pth", progress=False)
    assert path.read_bytes() == b"A" * 1000


def test_a_redirect_with_an_endless_body_is_followed_without_reading_it(server, hub_dir, small_limits) -> None:
    path = download_checkpoint(server.url + "/redirect-endless/model.pth", progress=False)
    assert path.read_bytes() == b"A" * 1000
    assert server.requests == ["/redirect-endless/model.pth", "/a/model.pth"]


def test_a_sha256_mismatch_over_http_keeps_nothing(server, hub_dir, small_limits) -> None:
    url = server.url + "/a/model.pth"
    with pytest.raises(CheckpointError, match=r"invalid hash value \(SHA-256 is [0-9a-f]{64}, expected 0{16}\.\.\.\)"):
        download_checkpoint(url, sha256="0" * 16, progress=False)
    assert _cache_files(hub_dir) == []
    digest = hashlib.sha256(b"A" * 1000).hexdigest()
    assert download_checkpoint(url, sha256=digest, progress=False).read_bytes() == b"A" * 1000


def test_an_interrupted_download_keeps_nothing(server, hub_dir, small_limits, monkeypatch) -> None:
    class Interrupting:  # Ctrl-C arrives while the body is being written
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            assert list((hub_dir / "checkpoints").iterdir())  # the temporary file exists at this point
            raise KeyboardInterrupt

    monkeypatch.setattr(remote, "_progress_bar", Interrupting)
    with pytest.raises(KeyboardInterrupt):
        download_checkpoint(server.url + "/b/model.pth")
    assert _cache_files(hub_dir) == []


@pytest.mark.parametrize("field, value", [("read_timeout", 0), ("connect_timeout", -1.0),
                                          ("max_seconds", float("nan")), ("max_bytes", 0), ("max_bytes", 1.5),
                                          ("read_timeout", "10")])
def test_limits_that_are_not_positive_numbers_are_refused(field, value, server, hub_dir, small_limits,
                                                          monkeypatch) -> None:
    monkeypatch.setattr(DOWNLOAD_LIMITS, field, value)
    with pytest.raises(UsageError, match=rf"DOWNLOAD_LIMITS\.{field} must be a positive"):
        download_checkpoint(server.url + "/a/model.pth", progress=False)
    assert server.requests == [] and _cache_files(hub_dir) == []


def test_per_call_limits_and_environment_overrides(server, hub_dir, small_limits, monkeypatch) -> None:
    url = server.url + "/b/model.pth"  # 2000 bytes
    with pytest.raises(DownloadLimitError, match="max_bytes = 1,000"):
        download_checkpoint(url, progress=False, limits=DownloadLimits(max_bytes=1000))
    monkeypatch.setenv("SEMASK_DOWNLOAD_MAX_BYTES", "1500")  # the environment wins over the field
    with pytest.raises(DownloadLimitError, match="max_bytes = 1,500"):
        download_checkpoint(url, progress=False)
    monkeypatch.setenv("SEMASK_DOWNLOAD_MAX_BYTES", "lots")
    with pytest.raises(UsageError, match=r"\$SEMASK_DOWNLOAD_MAX_BYTES must be a positive whole number.*'lots'"):
        download_checkpoint(url, progress=False)
    monkeypatch.setenv("SEMASK_DOWNLOAD_MAX_BYTES", "2000")
    assert download_checkpoint(url, progress=False).stat().st_size == 2000


@pytest.mark.parametrize("file_name", ["../escape.pth", "a/b.pth", "..", ""])
def test_a_cache_name_never_leaves_the_cache(file_name, hub_dir) -> None:
    with pytest.raises(UsageError, match="file name"):
        download_checkpoint("http://127.0.0.1:9/model.pth", file_name=file_name)
    assert not (hub_dir / "checkpoints").exists()


def test_odd_characters_in_a_url_make_a_plain_cache_name(hub_dir) -> None:
    path = cache_path("http://127.0.0.1:9/dir/%2e%2e%2fx%00y%0a.safetensors")
    assert path.parent == hub_dir / "checkpoints" and path.suffix == ".safetensors"
    assert re.fullmatch(r"[\w.+-]+", path.name)


def test_training_with_pretrained_weights_at_a_hostile_url(tiny_toy_root, server, hub_dir, small_limits,
                                                           tmp_path) -> None:
    from semask.engine.config import apply_overrides, get_preset
    from helpers import tiny_overrides

    for path in ("/stall-body/swin.pth", "/endless/swin.pth"):
        config = apply_overrides(get_preset("toy"), tiny_overrides(tiny_toy_root, **{
            "model.pretrained": server.url + path, "schedule.iters": 1, "train.eval_interval": 0}))
        with pytest.raises(DownloadError, match=re.escape(server.url + path)):
            semask.train(config, tmp_path / "run", progress=False)
        assert _cache_files(hub_dir) == []


# ----------------------------------------------------------------------------------------------- command line
def _env(tmp_path: Path, **limits: object) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TORCH_HOME": str(tmp_path / "torch")}
    for name, value in {**SMALL, **limits}.items():
        env[ENV_NAMES[name]] = str(value)
    return env


def _semask(tmp_path: Path, *args: str, **limits: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "semask", *args], capture_output=True, text=True,
                          env=_env(tmp_path, **limits), cwd=tmp_path, timeout=300)


def _cli_cache(tmp_path: Path) -> list[str]:
    return _cache_files(tmp_path / "torch" / "hub")


CLI_CASES = ["never answers", "stops mid-body", "endless body", "huge Content-Length", "more than declared",
             "closes early", "not found"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_semask_info_on_a_hostile_url(case, server, tmp_path) -> None:
    url = server.url + CASES[case][0]
    result = _semask(tmp_path, "info", url)
    assert result.returncode == (2 if case == "not found" else 1), result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"semask info: error: cannot download {url!r}: "), result.stderr
    assert re.search(CASES[case][2], lines[-1]) and "Traceback" not in result.stderr
    assert _cli_cache(tmp_path) == []


@pytest.mark.parametrize("command", ["convert-weights", "predict", "train"])
def test_other_commands_on_a_hostile_url(command, server, tmp_path, tiny_toy_root) -> None:
    url = server.url + "/endless/model.pth"
    argv = {"convert-weights": ["convert-weights", url, str(tmp_path / "out.safetensors")],
            "predict": ["predict", url, str(next((tiny_toy_root / "images" / "validation").iterdir())),
                        "--out", str(tmp_path / "labels")],
            "train": ["train", "toy", "--work-dir", str(tmp_path / "run"), "--no-progress", "--set",
                      *[o for o in _tiny_set(tiny_toy_root, url)]]}[command]
    result = _semask(tmp_path, *argv)
    assert result.returncode == 1, result.stderr
    assert f"cannot download {url!r}: the body is longer than" in result.stderr
    assert _cli_cache(tmp_path) == [] and not (tmp_path / "out.safetensors").exists()
    assert not (tmp_path / "labels").exists() or not any((tmp_path / "labels").iterdir())


def _tiny_set(root: Path, url: str) -> list[str]:
    from helpers import tiny_overrides

    return tiny_overrides(root, **{"model.pretrained": url, "schedule.iters": 1, "train.eval_interval": 0})


def test_bad_limit_variables_are_a_usage_error(server, tmp_path) -> None:
    result = _semask(tmp_path, "info", server.url + "/a/model.pth", read_timeout="soon")
    assert result.returncode == 2
    assert "$SEMASK_DOWNLOAD_READ_TIMEOUT must be a positive number of seconds, got 'soon'" in result.stderr
    assert server.requests == []


def _wait_for_partial(folder: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not (folder.exists() and any(folder.iterdir())):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the download never started"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_a_killed_download_leaves_nothing_for_long(sig, server, tmp_path, hub_dir) -> None:
    """Ctrl-C removes the partial file at once; after kill -9 the next download into the cache removes it."""
    url = server.url + "/stall-body/model.pth"  # 100 bytes, then silence: the temporary file stays open
    proc = subprocess.Popen([sys.executable, "-m", "semask", "info", url], env=_env(tmp_path, read_timeout=60),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        folder = tmp_path / "torch" / "hub" / "checkpoints"
        _wait_for_partial(folder, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "interrupted" in err
        assert _cli_cache(tmp_path) == []
        return
    assert len(_cli_cache(tmp_path)) == 1  # a temporary file of a dead process ...
    torch.hub.set_dir(str(tmp_path / "torch" / "hub"))  # (hub_dir restores it afterwards)
    good = download_checkpoint(server.url + "/a/model.pth", progress=False)
    assert _cli_cache(tmp_path) == [good.name]  # ... is removed by the next download into the cache
