"""Checkpoints named by URL, and SHA-256 checks of checkpoint files (SeMask FPN, arXiv 2112.12782).

Wherever semask reads a checkpoint, an ``https://`` (or ``http://``, ``file://``) URL may stand for the file: it is
downloaded once into torch.hub's cache (``torch.hub.get_dir()/checkpoints``) with a progress bar, and checked
against an optional SHA-256 (or a prefix of one, as in torch.hub's file names).
"""
from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.parse
from pathlib import Path
from typing import Any, Optional, Union

import torch

from semask.checkpoint.errors import CheckpointError
from semask.errors import UsageError

__all__ = ["URL_SCHEMES", "is_url", "download_checkpoint", "resolve_checkpoint_path"]

URL_SCHEMES = ("https://", "http://", "file://")


def is_url(path: Any) -> bool:
    """Whether `path` is a URL that `resolve_checkpoint_path` downloads (https, http or file)."""
    return isinstance(path, str) and path.lower().startswith(URL_SCHEMES)


def _expected_sha256(sha256: str, source: str) -> str:
    """`sha256` in lower case, checked to be 8 to 64 hex digits (a prefix is enough)."""
    expected = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{8,64}", expected):
        raise UsageError(f"sha256 for {source} must be 8 to 64 hexadecimal characters, got {sha256!r}")
    return expected


def _check_sha256(path: Path, expected: str, source: str) -> None:
    """Refuse `path` unless its SHA-256 starts with `expected` (from `_expected_sha256`)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(expected):
        raise CheckpointError(f"{source}: SHA-256 of {str(path)!r} is {digest.hexdigest()}, expected {expected}"
                              + ("..." if len(expected) < 64 else "")
                              + ". The file is corrupt or not the one meant; delete it and download it again.")


def download_checkpoint(url: str, sha256: Optional[str] = None, progress: bool = True,
                        file_name: Optional[str] = None) -> Path:
    """Download `url` once into torch.hub's cache and return the local file.

    The file goes to ``torch.hub.get_dir()/checkpoints/<file name>`` (the cache `torch.hub` uses for its own
    weights; `torch.hub.set_dir` or ``$TORCH_HOME`` move it), through a temporary file that is renamed only
    when the download is complete and, with `sha256`, matches. A file already in the cache is not
    downloaded again (but is checked against `sha256` too).

    Args:
        url: ``https://...`` (``http://`` and ``file://`` work the same way).
        sha256: expected SHA-256, hex (a prefix of at least 8 characters is enough, as in torch.hub's names).
        progress: show a progress bar on stderr.
        file_name: name in the cache (default: the last part of the URL's path).

    Returns:
        The path of the cached file.

    Raises:
        UsageError: not a URL, no file name in it, or a `sha256` that is not hex.
        FileNotFoundError: the download failed. CheckpointError: the file does not match `sha256`.
    """
    if not is_url(url):
        raise UsageError(f"expected a URL starting with one of {URL_SCHEMES}, got {url!r}")
    name = file_name or Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    if not name or name in (".", ".."):
        raise UsageError(f"cannot tell a file name from the URL {url!r}; pass file_name=")
    expected = _expected_sha256(sha256, repr(url)) if sha256 is not None else None
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / name
    if target.is_file():
        if expected is not None:
            _check_sha256(target, expected, f"cached download of {url!r}")
        return target
    try:
        torch.hub.download_url_to_file(url, str(target), hash_prefix=expected, progress=progress)
    except RuntimeError as exc:  # torch.hub's hash mismatch; the partial file is already removed
        raise CheckpointError(f"download of {url!r}: {exc}; nothing was written to {str(cache)!r}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise FileNotFoundError(f"cannot download {url!r}: {exc}") from exc
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
