"""Checkpoints named by URL, and SHA-256 checks of checkpoint files (SeMask FPN, arXiv 2112.12782).

Wherever semask reads a checkpoint, an ``https://`` (or ``http://``, ``file://``) URL may stand for the file: it is
downloaded once into torch.hub's cache (``torch.hub.get_dir()/checkpoints``) with a progress bar, and checked
against an optional SHA-256 (or a prefix of one, as in torch.hub's file names).

A server is untrusted input like a file: every download is bounded by `DOWNLOAD_LIMITS` (connect and read
time-outs, a size limit, a time limit for the whole download), a failed or refused download keeps nothing in the
cache, and the cache entry of a URL is named by a hash of the whole URL, so two URLs that end in the same file
name never share one.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.client
import math
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Optional, Union

import torch
from tqdm import tqdm

from semask.checkpoint.errors import (CheckpointError, DownloadError, DownloadLimitError, DownloadNotFoundError)
from semask.errors import UsageError
from semask.io import atomic_path

__all__ = ["URL_SCHEMES", "DownloadLimits", "DOWNLOAD_LIMITS", "is_url", "cache_path", "download_checkpoint",
           "resolve_checkpoint_path"]

URL_SCHEMES = ("https://", "http://", "file://")
_CHUNK = 1 << 20
_PROBE_SECONDS = 1.0  # how long to wait, after the declared body, for bytes a server should not send


@dataclass
class DownloadLimits:
    """Bounds on every download (`download_checkpoint`); a server is as untrusted as a file.

    Change a field for all later downloads, e.g. ``semask.checkpoint.DOWNLOAD_LIMITS.max_bytes = 16 * 2**30``; on
    the command line (or for one run) set the environment variable in brackets, which wins over the field.
    """

    max_bytes: int = 4 * 2**30  # the largest file (SEMASK_DOWNLOAD_MAX_BYTES); the released ones are below 1 GiB
    connect_timeout: float = 30.0  # seconds to connect (SEMASK_DOWNLOAD_CONNECT_TIMEOUT)
    read_timeout: float = 60.0  # seconds without a byte from the server (SEMASK_DOWNLOAD_READ_TIMEOUT)
    max_seconds: float = 4 * 3600.0  # seconds for the whole download (SEMASK_DOWNLOAD_MAX_SECONDS)


DOWNLOAD_LIMITS = DownloadLimits()

# field of DownloadLimits -> the environment variable that overrides it
_ENVIRONMENT = {"max_bytes": "SEMASK_DOWNLOAD_MAX_BYTES", "connect_timeout": "SEMASK_DOWNLOAD_CONNECT_TIMEOUT",
                "read_timeout": "SEMASK_DOWNLOAD_READ_TIMEOUT", "max_seconds": "SEMASK_DOWNLOAD_MAX_SECONDS"}


def _limits(limits: Optional[DownloadLimits]) -> DownloadLimits:
    """`limits` (default `DOWNLOAD_LIMITS`) with the environment's overrides, each checked to be a positive number.

    Raises:
        UsageError: naming the variable or field whose value is not a positive (finite) number.
    """
    chosen = dataclasses.replace(limits if limits is not None else DOWNLOAD_LIMITS)
    for field in dataclasses.fields(DownloadLimits):
        variable = _ENVIRONMENT[field.name]
        raw = os.environ.get(variable, "").strip()
        value: Any = getattr(chosen, field.name)
        what = f"semask.checkpoint.DOWNLOAD_LIMITS.{field.name}"
        if raw:
            what = f"${variable}"
            try:
                value = int(raw) if field.name == "max_bytes" else float(raw)
            except ValueError:
                value = raw
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value <= 0 or (field.name == "max_bytes" and value != int(value)):
            kind = "a positive whole number of bytes" if field.name == "max_bytes" else "a positive number of seconds"
            raise UsageError(f"{what} must be {kind}, got {value!r}")
        setattr(chosen, field.name, int(value) if field.name == "max_bytes" else float(value))
    return chosen


def is_url(path: Any) -> bool:
    """Whether `path` is a URL that `resolve_checkpoint_path` downloads (https, http or file)."""
    return isinstance(path, str) and path.lower().startswith(URL_SCHEMES)


def _expected_sha256(sha256: str, source: str) -> str:
    """`sha256` in lower case, checked to be 8 to 64 hex digits (a prefix is enough)."""
    expected = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{8,64}", expected):
        raise UsageError(f"sha256 for {source} must be 8 to 64 hexadecimal characters, got {sha256!r}")
    return expected


def _sha256_message(digest: str, expected: str) -> str:
    return f"SHA-256 is {digest}, expected {expected}{'...' if len(expected) < 64 else ''}"


def _check_sha256(path: Path, expected: str, source: str) -> None:
    """Refuse `path` unless its SHA-256 starts with `expected` (from `_expected_sha256`)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(expected):
        raise CheckpointError(f"{source}: SHA-256 of {str(path)!r} is {digest.hexdigest()}, expected {expected}"
                              + ("..." if len(expected) < 64 else "")
                              + ". The file is corrupt or not the one meant; delete it and download it again.")


def cache_path(url: str, file_name: Optional[str] = None) -> Path:
    """Where `download_checkpoint` keeps `url`: ``<torch hub dir>/checkpoints/<stem>.<url hash><suffix>``.

    The hash (12 hex digits of the SHA-256 of the whole URL) keeps ``http://h/a/model.pth`` and
    ``http://h/b/model.pth`` apart; the suffix is kept, since it tells a ``.safetensors`` file.

    Raises:
        UsageError: not a URL, or no file name in it (then pass `file_name`).
    """
    if not is_url(url):
        raise UsageError(f"expected a URL starting with one of {URL_SCHEMES}, got {url!r}")
    name = file_name if file_name is not None else Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise UsageError(f"cannot tell a file name from the URL {url!r}; pass file_name= (a name without folders)")
    name = re.sub(r"[^\w.+-]", "_", name).lstrip(".") or "checkpoint"  # no control characters or hidden files
    stem, suffix = os.path.splitext(name)
    key = hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return Path(torch.hub.get_dir()) / "checkpoints" / f"{stem[:80]}.{key}{suffix[:20]}"


# ----------------------------------------------------------------------------------------------- HTTP
class _Watchdog:
    """Shuts the download's sockets down once its time is up, which ends any read that waits on them."""

    def __init__(self, seconds: float):
        self.sockets: list[socket.socket] = []
        self.fired = False
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self.sockets.append(sock)
            if self.fired:
                self._shut(sock)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            for sock in self.sockets:
                self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # already closed
            pass

    def __enter__(self) -> "_Watchdog":
        self._timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._timer.cancel()


class _Response(http.client.HTTPResponse):
    """An HTTP response that keeps its socket, so that the download can shorten the time-out for the probe past
    the declared body."""

    def __init__(self, sock: socket.socket, *args: Any, **kwargs: Any):
        super().__init__(sock, *args, **kwargs)
        self.socket = sock


def _bounded(base: type) -> type:
    """`base` (HTTPConnection or HTTPSConnection) connecting under the connect time-out (the one urllib passes),
    then reading under the read time-out, and showing its socket to the watchdog."""

    class Connection(base):
        response_class = _Response

        def __init__(self, *args: Any, read_timeout: float, watchdog: _Watchdog, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.read_timeout, self.watchdog = read_timeout, watchdog

        def connect(self) -> None:
            super().connect()  # TCP (and TLS) under the connect time-out
            self.sock.settimeout(self.read_timeout)
            self.watchdog.watch(self.sock)

    return Connection


_HTTPConnection = _bounded(http.client.HTTPConnection)
_HTTPSConnection = _bounded(http.client.HTTPSConnection)


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, **bounds: Any):
        super().__init__()
        self.bounds = bounds

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_HTTPConnection, **self.bounds), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, **bounds: Any):
        super().__init__()
        self.bounds = bounds

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_HTTPSConnection, **self.bounds), req, context=self._context)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http(s) only (urllib also follows ftp), without reading the redirect's body (urllib
    reads it whole, which an endless body turns into unbounded memory)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib's signature
        if urllib.parse.urlparse(newurl).scheme.lower() not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, f"redirect to {newurl!r} refused: only http and https are "
                                         "followed", headers, fp)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        fp.close()
        return new


def _open(url: str, limits: DownloadLimits, watchdog: _Watchdog) -> Any:
    """The response to GET `url`, or a `DownloadError` saying why there is none."""
    bounds = dict(read_timeout=limits.read_timeout, watchdog=watchdog)
    opener = urllib.request.build_opener(_HTTPHandler(**bounds), _HTTPSHandler(**bounds), _RedirectHandler())
    request = urllib.request.Request(url, headers={"User-Agent": "semask"})
    try:
        return opener.open(request, timeout=limits.connect_timeout)
    except urllib.error.HTTPError as exc:
        exc.close()  # its body is never read
        error = DownloadNotFoundError if exc.code in (404, 410) else DownloadError
        raise error(f"cannot download {url!r}: the server answered {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:  # raised while connecting (or opening a file:// path)
        reason = exc.reason
        if isinstance(reason, (TimeoutError, socket.timeout)):
            raise DownloadError(f"cannot download {url!r}: no connection within {limits.connect_timeout:g} s "
                                "(DOWNLOAD_LIMITS.connect_timeout)") from exc
        error = DownloadNotFoundError if isinstance(reason, FileNotFoundError) else DownloadError
        raise error(f"cannot download {url!r}: {reason}") from exc
    except (TimeoutError, socket.timeout) as exc:
        raise DownloadError(f"cannot download {url!r}: the server sent no answer within {limits.read_timeout:g} s "
                            "(DOWNLOAD_LIMITS.read_timeout)") from exc
    except (http.client.HTTPException, OSError, ValueError) as exc:
        raise DownloadError(f"cannot download {url!r}: {type(exc).__name__}: {exc}") from exc


def _declared_length(response: Any) -> Optional[int]:
    """The body's length as the server declares it (``Content-Length``), or None (chunked, or not declared)."""
    if isinstance(response, http.client.HTTPResponse):
        return response.length  # http.client's parse: None for chunked bodies or a missing/invalid header
    raw = response.headers.get("Content-Length")
    return int(raw) if raw is not None and raw.strip().isdigit() else None


def _nothing_more(response: Any, limits: DownloadLimits) -> bool:
    """Whether the server sent no bytes past the body it declared (it closed, or stayed silent for a moment)."""
    if not isinstance(response, _Response) or response.chunked:
        return True  # a file:// body is read to its end instead; a chunked body ends with its last chunk
    response.socket.settimeout(min(_PROBE_SECONDS, limits.read_timeout))
    try:
        return not response.peek(1)
    except (TimeoutError, socket.timeout):  # a server that keeps the connection open
        return True


def _progress_bar(total: Optional[int], enabled: bool) -> tqdm:
    return tqdm(total=total, disable=not enabled, unit="B", unit_scale=True, unit_divisor=1024)


def _read_body(url: str, response: Any, out: BinaryIO, limits: DownloadLimits, progress: bool) -> str:
    """Copy the body to `out` within `limits`; return its SHA-256 (hex).

    Raises:
        DownloadLimitError: a declared or actual size above ``limits.max_bytes`` (nothing is read past it).
        DownloadError: a time-out, a body shorter or longer than declared, a broken connection.
    """
    declared = _declared_length(response)
    if declared is not None and declared > limits.max_bytes:
        raise DownloadLimitError(f"cannot download {url!r}: the server declares {declared:,} bytes, above "
                                 f"semask.checkpoint.DOWNLOAD_LIMITS.max_bytes = {limits.max_bytes:,} (nothing was "
                                 "read); raise that limit only for a file you trust")
    digest, got = hashlib.sha256(), 0
    deadline = time.monotonic() + limits.max_seconds
    with _progress_bar(declared, progress) as bar:
        while True:
            try:
                chunk = response.read1(_CHUNK)
            except (TimeoutError, socket.timeout) as exc:
                raise DownloadError(f"cannot download {url!r}: the server sent nothing for {limits.read_timeout:g} s "
                                    f"after {got:,} bytes (DOWNLOAD_LIMITS.read_timeout)") from exc
            except (http.client.HTTPException, OSError) as exc:
                raise DownloadError(f"cannot download {url!r}: the connection failed after {got:,} bytes "
                                    f"({type(exc).__name__}: {exc})") from exc
            if time.monotonic() > deadline:  # the watchdog's job for sockets; this also bounds file:// reads
                raise _too_slow(url, limits)
            if not chunk:
                break
            got += len(chunk)
            if declared is not None and got > declared:  # only a file:// body gets here (http.client stops)
                break
            if got > limits.max_bytes:
                raise DownloadLimitError(f"cannot download {url!r}: the body is longer than semask.checkpoint."
                                         f"DOWNLOAD_LIMITS.max_bytes = {limits.max_bytes:,} bytes; the download was "
                                         "cut there; raise that limit only for a file you trust")
            out.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))
    if declared is not None and (got > declared or (got == declared and not _nothing_more(response, limits))):
        raise DownloadError(f"cannot download {url!r}: the body is longer than the {declared:,} bytes declared "
                            "(Content-Length); the response is malformed")
    if declared is not None and got < declared:
        raise DownloadError(f"cannot download {url!r}: the server closed the connection after {got:,} of the "
                            f"{declared:,} bytes it declared")
    return digest.hexdigest()


def _too_slow(url: str, limits: DownloadLimits) -> DownloadError:
    return DownloadError(f"cannot download {url!r}: it took longer than {limits.max_seconds:g} s "
                         "(DOWNLOAD_LIMITS.max_seconds) and was stopped")


def download_checkpoint(url: str, sha256: Optional[str] = None, progress: bool = True,
                        file_name: Optional[str] = None, limits: Optional[DownloadLimits] = None) -> Path:
    """Download `url` once into torch.hub's cache and return the local file.

    The file goes to ``torch.hub.get_dir()/checkpoints/<stem>.<hash of the URL><suffix>`` (`cache_path`; the cache
    `torch.hub` uses for its own weights, moved by `torch.hub.set_dir` or ``$TORCH_HOME``), through a temporary
    file that is renamed only when the download is complete and, with `sha256`, matches. A file already in the
    cache is not downloaded again (but is checked against `sha256` too). The download is bounded by `limits`
    (connect and read time-outs, size, total time); whatever fails or is refused -- a time-out, the size, a body
    shorter or longer than declared, the hash, an interruption (KeyboardInterrupt) -- nothing is kept.

    Args:
        url: ``https://...`` (``http://`` and ``file://`` work the same way).
        sha256: expected SHA-256, hex (a prefix of at least 8 characters is enough, as in torch.hub's names).
        progress: show a progress bar on stderr.
        file_name: name in the cache, before the URL's hash (default: the last part of the URL's path).
        limits: bounds for this download (default `DOWNLOAD_LIMITS`; the ``SEMASK_DOWNLOAD_*`` environment
            variables override either).

    Returns:
        The path of the cached file.

    Raises:
        UsageError: not a URL, no file name in it, a `sha256` that is not hex, or a limit that is not a positive
            number. DownloadNotFoundError (a FileNotFoundError): no such file on the server (404, 410) or on disk.
        DownloadLimitError: a file above ``max_bytes``. DownloadError (an OSError): a time-out, a refused
            connection, another HTTP error, a body that is shorter or longer than the server declared.
        CheckpointError: the file does not match `sha256`.
    """
    target = cache_path(url, file_name)
    expected = _expected_sha256(sha256, repr(url)) if sha256 is not None else None
    limits = _limits(limits)
    if target.is_file():
        if expected is not None:
            _check_sha256(target, expected, f"cached download of {url!r}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _Watchdog(limits.max_seconds) as watchdog, atomic_path(target) as tmp:
        try:
            with _open(url, limits, watchdog) as response, open(tmp, "wb") as out:
                digest = _read_body(url, response, out, limits, progress)
        except DownloadError as exc:
            if watchdog.fired and not isinstance(exc, DownloadLimitError):  # the watchdog's shutdown, not the server
                raise _too_slow(url, limits) from exc
            raise
        if watchdog.fired:  # a body of undeclared length ends where the watchdog shut the socket down
            raise _too_slow(url, limits)
        if expected is not None and not digest.startswith(expected):
            raise CheckpointError(f"download of {url!r}: invalid hash value ({_sha256_message(digest, expected)}); "
                                  f"nothing was kept in {str(target.parent)!r}")
    return target


def resolve_checkpoint_path(path: Union[str, os.PathLike], sha256: Optional[str] = None,
                            progress: bool = True) -> Path:
    """The local file for a path or URL: URLs are downloaded (`download_checkpoint`); `sha256` is checked."""
    if is_url(path):
        return download_checkpoint(str(path), sha256=sha256, progress=progress)
    path = Path(path)
    if sha256 is not None and path.is_file():
        source = f"checkpoint {str(path)!r}"
        _check_sha256(path, _expected_sha256(sha256, source), source)
    return path
