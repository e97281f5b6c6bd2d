"""Reading any checkpoint file, and semask's own files: ``.pth`` with training state, and ``.safetensors``
(SeMask FPN, arXiv 2112.12782).

`load_checkpoint` reads an official file (see `semask.checkpoint.official`) or one of semask's own and returns
a ready model carrying its class names and palette. `save_checkpoint` writes semask's own file atomically, with
the model's config and, for training, the optimizer/scheduler/scaler/iteration/RNG states that
`load_training_state` restores. ``.safetensors`` files (semask's own, with the config, classes and palette as
JSON strings in the metadata, or bare state dicts in the official or ImageNet key layouts) are read and written
with `safetensors` and never touch pickle; `convert_to_safetensors` converts a ``.pth``. Every ``.pth`` is read
with ``torch.load(..., weights_only=True)``, and every file is checked (`semask.checkpoint.checks`) before a model
is built from it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch
import torch.nn as nn

from semask.checkpoint.checks import check_architecture, check_config_limits, check_tensors, load_model_weights
from semask.checkpoint.errors import CheckpointError
from semask.checkpoint.official import (check_metadata, is_segmentor_state_dict, read_official, strip_prefix,
                                        unwrap_checkpoint)
from semask.checkpoint.remote import is_url, resolve_checkpoint_path
from semask.device import check_device
from semask.errors import UsageError
from semask.io import atomic_path, check_output_file
from semask.model.config import ModelConfig, check_class_metadata
from semask.model.registry import build_model
from semask.model.segmentor import ExternalSegmentor, SeMaskFPN

__all__ = [
    "FORMAT",
    "SAFETENSORS_SUFFIX",
    "read_checkpoint_file",
    "load_checkpoint",
    "save_checkpoint",
    "load_training_state",
    "read_safetensors_checkpoint",
    "save_safetensors",
    "convert_to_safetensors",
]

PathLike = Union[str, os.PathLike]
FORMAT = "semask-checkpoint-v1"  # the "format" entry of semask's own files
SAFETENSORS_SUFFIX = ".safetensors"


def _check_file(path: Path, source: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{source} does not exist" if not path.exists() else f"{source} is not a file")


def _is_own(obj: Any) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == FORMAT


def _plain(train_config: Any) -> Any:
    """A training config as plain data (a dataclass becomes a dict)."""
    return dataclasses.asdict(train_config) if dataclasses.is_dataclass(train_config) else train_config


# ----------------------------------------------------------------------------------------------- reading
def read_checkpoint_file(path: PathLike, map_location: Any = "cpu", sha256: Optional[str] = None) -> Any:
    """`torch.load` with `weights_only=True` and errors that name the file.

    A URL is downloaded first (`resolve_checkpoint_path`, checked against `sha256` when given); a
    `.safetensors` file is read with `read_safetensors_checkpoint` instead of `torch.load`.

    Raises:
        FileNotFoundError: no such file. CheckpointError: a file `torch.load` cannot read safely.
    """
    path = resolve_checkpoint_path(path, sha256=sha256)
    if path.suffix == SAFETENSORS_SUFFIX:
        return read_safetensors_checkpoint(path, map_location)
    _check_file(path, f"checkpoint {str(path)!r}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # re-raised with the file named and the safe-loading policy explained
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r} safely (torch.load weights_only=True): {exc}. "
            "semask only loads tensors and plain Python containers; if the file holds other objects, "
            "re-save its state_dict from a trusted environment.") from exc


def _read_own(obj: Mapping[str, Any], source: str) -> tuple[str, ModelConfig, Mapping[str, torch.Tensor]]:
    """Name, config and weights of a checkpoint written by `save_checkpoint`, checked field by field."""
    missing = [k for k in ("model_name", "config", "state_dict") if k not in obj]
    if missing:
        raise CheckpointError(f"{source}: a {FORMAT} file without {missing}; it is damaged or not from semask")
    name, raw, sd = obj["model_name"], obj["config"], obj["state_dict"]
    if raw is None and isinstance(name, str):
        raise CheckpointError(f"{source} holds the weights of an external network ({name!r}, trained through "
                              "semask.model.segmentor.ExternalSegmentor), which semask cannot build from the file: "
                              "build the network again and restore them with semask.checkpoint.load_training_state")
    if not isinstance(name, str) or not isinstance(raw, Mapping) or not isinstance(sd, Mapping):
        raise CheckpointError(f"{source}: model_name, config and state_dict must be a str and two dicts, got "
                              f"{type(name).__name__}, {type(raw).__name__}, {type(sd).__name__}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(map(str, set(raw) - fields))
    if unknown:
        raise CheckpointError(f"{source}: its config has unknown key(s) {unknown} (written by a newer semask, or "
                              f"edited); valid keys: {', '.join(sorted(fields))}")
    try:
        config = ModelConfig(**raw)
    except UsageError as exc:
        raise CheckpointError(f"{source}: its config is invalid: {exc}") from exc
    check_config_limits(config, f"{source}: its config has")
    check_tensors(sd, source)
    check_metadata(name, config, sd, source)  # the name and config are claims; the tensors are the model
    return name, config, sd


def load_checkpoint(path: PathLike, map_location: Any = "cpu",
                    semantic_global_stages: Optional[tuple[int, ...]] = None, *,
                    sha256: Optional[str] = None) -> SeMaskFPN:
    """Load an official SeMask FPN checkpoint or one of semask's own, and return the model in eval mode.

    Args:
        path: a `.pth` or `.safetensors` file, or an ``https://`` URL of one (downloaded once into torch.hub's
            cache, see `download_checkpoint`).
        map_location: device for the tensors (and the returned model).
        semantic_global_stages: override which stages use global semantic attention for an official file
            (by default the released models' rule; semask's own checkpoints store it).
        sha256: expected SHA-256 of the file (hex, or a prefix of at least 8 characters); checked for local
            files and downloads alike.

    Returns:
        A `SeMaskFPN` with `.class_names` and `.palette` from the checkpoint's metadata (None when absent).

    Raises:
        UsageError: a bad `map_location`, `sha256` or `semantic_global_stages`. FileNotFoundError: no such file.
        CheckpointError: a file that cannot be read, or does not describe and match one model (missing,
            unexpected and mis-shaped keys are all listed). CheckpointLimitError: an architecture beyond
            `LIMITS`. CheckpointNonFiniteError: NaN or infinite weights.
    """
    source = f"checkpoint {str(path)!r}"
    if isinstance(map_location, (str, torch.device)):
        check_device(map_location)
    obj = read_checkpoint_file(path, map_location, sha256=sha256)
    if _is_own(obj):
        name, config, sd = _read_own(obj, source)
        class_names, palette = obj.get("class_names"), obj.get("palette")
    else:
        name, config, sd, class_names, palette = read_official(obj, source)
    if semantic_global_stages is not None:
        try:
            config = dataclasses.replace(config, semantic_global_stages=tuple(semantic_global_stages))
        except UsageError as exc:
            raise UsageError(f"semantic_global_stages for {source}: {exc}") from exc
    if isinstance(class_names, (list, tuple)) and len(class_names) != config.num_classes:
        raise CheckpointError(f"{source}: meta lists {len(class_names)} class names but the decoder has "
                              f"{config.num_classes} classes")
    try:
        class_names, palette = check_class_metadata(config.num_classes, class_names or None, palette, source)
    except UsageError as exc:
        raise CheckpointError(str(exc)) from exc
    check_architecture(config, sd, name, source)  # limits and shapes, before anything is allocated
    model = build_model(config, name=name, class_names=class_names, palette=palette)
    load_model_weights(model, sd, source)
    return model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu").eval()


# ----------------------------------------------------------------------------------------------- training state
def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: Mapping) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _model_record(model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    """The model (out of a DDP wrapper) and the entries of semask's own format that describe it.

    ``config`` is None for an `ExternalSegmentor`, whose network semask cannot rebuild.
    """
    model = getattr(model, "module", model)
    if getattr(model, "config", None) is None and not isinstance(model, ExternalSegmentor):
        raise UsageError("save_checkpoint: the model has no ModelConfig (build it with semask.create_model or "
                         "semask.model.registry.build_model)")
    return model, {
        "format": FORMAT,
        "model_name": model.name,
        "config": dataclasses.asdict(model.config) if model.config is not None else None,
        "class_names": tuple(model.class_names) if model.class_names else None,
        "palette": model.palette,
    }


def save_checkpoint(path: PathLike, model: SeMaskFPN, *, optimizer: Optional[torch.optim.Optimizer] = None,
                    scheduler: Any = None, scaler: Any = None, iteration: Optional[int] = None,
                    train_config: Any = None, extra: Optional[dict] = None, format: Optional[str] = None) -> Path:
    """Write semask's own checkpoint atomically (temp file + rename).

    Args:
        path: destination `.pth`, or `.safetensors` (see `format`).
        model: the model (a DDP wrapper's `.module` is taken automatically).
        optimizer, scheduler, scaler: training states to resume from (optional).
        iteration: training iteration reached (optional).
        train_config: the resolved training config (a dataclass), stored as a dict.
        extra: further plain data (metrics, ...).
        format: ``"pth"`` (torch.save) or ``"safetensors"`` (weights, with the config, classes, palette,
            `train_config` and `extra` as JSON metadata; no optimizer/scheduler/scaler/RNG states). None: from
            the suffix of `path`.

    Returns:
        The written path.

    Raises:
        UsageError: an unknown `format`, training states for a safetensors file, metadata that is not JSON (for
            safetensors), or a model without a `ModelConfig`.
    """
    fmt = format or ("safetensors" if Path(path).suffix == SAFETENSORS_SUFFIX else "pth")
    if fmt == "safetensors":
        states = [n for n, v in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler),
                                 ("iteration", iteration)) if v is not None]
        if states:
            raise UsageError(f"save_checkpoint({str(path)!r}): safetensors files hold weights and metadata only, "
                             f"not {', '.join(states)}; write training checkpoints to a .pth file")
        return save_safetensors(path, model, train_config=train_config, extra=extra)
    if fmt != "pth":
        raise UsageError(f"save_checkpoint: format must be 'pth' or 'safetensors', got {format!r}")
    model, obj = _model_record(model)
    obj["state_dict"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if train_config is not None:
        obj["train_config"] = _plain(train_config)
    for name, state in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if state is not None:
            obj[name] = state.state_dict()
    if iteration is not None:
        obj["iteration"] = int(iteration)
        obj["rng"] = _rng_state()
    if extra:
        obj["extra"] = extra
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def load_training_state(path: PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                        scheduler: Any = None, scaler: Any = None, map_location: Any = "cpu",
                        restore_rng: bool = True) -> dict:
    """Restore a training run from a checkpoint written by `save_checkpoint`.

    Returns:
        The checkpoint's dict (with `iteration`, `train_config`, `extra` when present).

    Raises:
        CheckpointError: not semask's own file, weights that do not fit `model`, or a state asked for that the
            file does not hold.
    """
    source = f"checkpoint {str(path)!r}"
    obj = read_checkpoint_file(path, map_location)
    if not _is_own(obj):
        raise CheckpointError(f"{source} is not a semask training checkpoint "
                              "(to start from official weights use load_checkpoint)")
    load_model_weights(getattr(model, "module", model), obj["state_dict"], source)
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if target is not None:
            if name not in obj:
                raise CheckpointError(f"{source} holds no {name} state to resume from")
            target.load_state_dict(obj[name])
    if restore_rng and "rng" in obj:
        _set_rng_state(obj["rng"])
    return obj


# ----------------------------------------------------------------------------------------------- safetensors
def _json_meta(meta: Mapping[str, str], key: str, source: str) -> Any:
    try:
        return json.loads(meta[key]) if key in meta else None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{source}: metadata {key!r} is not valid JSON ({exc}): {meta[key][:80]!r}") from exc


def read_safetensors_checkpoint(path: PathLike, map_location: Any = "cpu") -> dict:
    """Read a `.safetensors` file (never unpickling) into the dict layout `load_checkpoint` reads.

    Args:
        path: a file written by `save_safetensors` (metadata ``format`` = semask's format tag, with
            ``model_name``, and ``config``, ``class_names``, ``palette`` as JSON), or any safetensors file of a
            state dict (the official layout; ``CLASSES``/``PALETTE`` metadata as JSON are used when present).
        map_location: device for the tensors.

    Returns:
        semask's checkpoint dict (``format``, ``model_name``, ``config``, ``class_names``, ``palette``,
        ``state_dict``) or ``{"state_dict": ..., "meta": {"CLASSES", "PALETTE"}}`` for other files.

    Raises:
        FileNotFoundError: no such file. CheckpointError: not a safetensors file, or damaged semask metadata.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    source = f"checkpoint {str(path)!r}"
    _check_file(path, source)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {source} as safetensors: {exc}") from exc
    if map_location not in (None, "cpu") and isinstance(map_location, (str, torch.device)):
        tensors = {k: v.to(map_location) for k, v in tensors.items()}
    if not _is_own(meta):
        return {"state_dict": tensors, "meta": {"CLASSES": _json_meta(meta, "CLASSES", source),
                                                "PALETTE": _json_meta(meta, "PALETTE", source)}}
    config = _json_meta(meta, "config", source)
    if not isinstance(config, dict) or "model_name" not in meta:
        raise CheckpointError(f"{source}: semask safetensors metadata without a 'config' object or 'model_name'")
    return {"format": FORMAT, "model_name": meta["model_name"],
            "config": {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()},
            **{key: _json_meta(meta, key, source) for key in ("class_names", "palette", "train_config", "extra")},
            "state_dict": tensors}


def _save_tensors(path: PathLike, sd: Mapping[str, torch.Tensor], meta: Optional[dict[str, str]] = None) -> Path:
    """Write `sd` (made contiguous, on the CPU) as a `.safetensors` file atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(tmp), metadata=meta)
    return Path(path)


def save_safetensors(path: PathLike, model: SeMaskFPN, train_config: Any = None, extra: Optional[dict] = None) -> Path:
    """Write the model's weights as `.safetensors` atomically, with its config, classes and palette as metadata.

    Args:
        path: destination (normally ending in `.safetensors`).
        model: the model (a DDP wrapper's `.module` is taken automatically).
        train_config, extra: optional JSON-serialisable run information, stored as JSON strings.

    Returns:
        The written path. `load_checkpoint` reads it back into an identical model.

    Raises:
        UsageError: a model without a `ModelConfig`, or `train_config` / `extra` that is not JSON.
    """
    if getattr(getattr(model, "module", model), "config", None) is None:
        raise UsageError("the model has no ModelConfig (build it with semask.create_model or build_model)")
    model, record = _model_record(model)
    meta = {k: v if k in ("format", "model_name") else json.dumps(v) for k, v in record.items()}
    try:
        if train_config is not None:
            meta["train_config"] = json.dumps(_plain(train_config))
        if extra:
            meta["extra"] = json.dumps(extra)
    except TypeError as exc:
        raise UsageError(f"save_checkpoint({str(path)!r}): safetensors metadata must be JSON: {exc}") from exc
    return _save_tensors(path, model.state_dict(), meta)


def convert_to_safetensors(src: PathLike, dst: PathLike, *, sha256: Optional[str] = None,
                           overwrite: bool = False) -> Path:
    """Convert a `.pth` checkpoint (read with ``weights_only=True``; a URL is downloaded) to `.safetensors`.

    A SeMask/Swin FPN checkpoint (official or semask's own) is loaded as a model, so that the file gets the
    inferred config, the classes and the palette (`load_checkpoint` reads it back into the same model). Any
    other file of tensors, such as ImageNet Swin weights, is written as its bare state dict (found under
    ``state_dict`` or ``model``), which `load_pretrained_backbone` reads.

    Args:
        src: the `.pth` file or URL.
        dst: the `.safetensors` file to write (atomically).
        sha256: expected SHA-256 of `src`.
        overwrite: replace an existing `dst` (otherwise that is an error).

    Returns:
        The written path.

    Raises:
        UsageError: `dst` without the suffix. OutputError: `dst` is `src` or cannot be written. OutputExistsError
            (a FileExistsError): `dst` exists and `overwrite` is off. WriteError: the OS refused the write.
    """
    dst = Path(dst)
    if dst.suffix != SAFETENSORS_SUFFIX:
        raise UsageError(f"the output {str(dst)!r} must end in {SAFETENSORS_SUFFIX}")
    # before the input is read or downloaded: never the input itself, replaced only when asked, writable
    check_output_file(dst, "output", inputs=[("the input", src)], overwrite=overwrite, probe=True)
    local = resolve_checkpoint_path(src, sha256=sha256)
    obj = read_checkpoint_file(local)
    if _is_own(obj):
        return save_safetensors(dst, load_checkpoint(local))
    sd, _ = unwrap_checkpoint(obj, f"checkpoint {str(src)!r}")
    sd = strip_prefix(sd, "module.")
    if is_segmentor_state_dict(sd):
        return save_safetensors(dst, load_checkpoint(local))
    return _save_tensors(dst, sd)

