"""ONNX export of SeMask FPN models (arXiv 2112.12782), checked against PyTorch with onnxruntime.

    semask.export_onnx(model, "semask_tiny.onnx", size=(512, 512))                # fixed input size
    semask.export_onnx(model, "semask_tiny.onnx", size=(512, 512), dynamic=True)  # any batch, height, width
    semask export CHECKPOINT out.onnx --size 512 512 [--dynamic] [--prior]

The graph takes ``image``, a (B, 3, H, W) float32 batch normalised with the ImageNet mean/std (as the PyTorch
model does), and returns ``logits`` (B, K, H, W) and, on request, ``prior_logits`` (B, K, ceil(H/4),
ceil(W/4)), the decoder's summed semantic prior. Nothing is written unless the export succeeds and its check
passes. Which exporter, the limits of dynamic sizes and why: docs/design.md ("Apps").
"""
from __future__ import annotations

import copy
import json
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn

from semask.bounds import check_fits, check_pixels, explicit_attention_strides, forward_bytes
from semask.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from semask.model.segmentor import SeMaskFPN
from semask.errors import MissingPackageError, SemaskError, UsageError, UsageTypeError
from semask.io import atomic_path, check_output_file

__all__ = [
    "MIN_DYNAMIC_SIZE",
    "min_dynamic_trace_size",
    "EXPORT_PACKAGES",
    "ExportError",
    "MissingPackageError",
    "OnnxExport",
    "export_onnx",
    "onnxruntime_session",
    "onnx_parity",
]

PathLike = Union[str, os.PathLike]
MIN_DYNAMIC_SIZE = 33  # smallest height/width of a dynamic graph: the stride-32 stage needs >= 2 tokens per side
EXPORT_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # the export extra: pip install 'semask[export]'
_INSTALL_HINT = f"install the export extra: pip install 'semask[export]' ({', '.join(EXPORT_PACKAGES)})"


class ExportError(SemaskError, RuntimeError):
    """An ONNX export that failed or did not reproduce PyTorch; the message says which and what to do."""


@dataclass
class OnnxExport:
    """What `export_onnx` wrote.

    Attributes:
        path: the `.onnx` file.
        size: (H, W) the graph was traced at.
        batch_size: the batch of a static graph (a dynamic graph takes any batch).
        dynamic: whether batch, height and width are symbolic.
        outputs: output names, ``("logits",)`` or ``("logits", "prior_logits")``.
        opset: the ONNX opset of the default domain.
        min_size: smallest height/width a dynamic graph is valid for (None for a static graph).
        checks: per checked input size, ``{"size", "max_abs_diff", "argmax_agreement"}`` against PyTorch.
    """

    path: Path
    size: tuple[int, int]
    batch_size: int
    dynamic: bool
    outputs: tuple[str, ...]
    opset: int
    min_size: Optional[int] = None
    checks: list[dict[str, Any]] = field(default_factory=list)


class _GraphOutputs(nn.Module):
    """The tensors of `SegmentationOutput` that go into the graph: logits, and the prior on request."""

    def __init__(self, model: SeMaskFPN, prior: bool):
        super().__init__()
        self.model = model
        self.prior = prior

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(image)
        return (out.logits, out.prior_logits) if self.prior else (out.logits,)


# ----------------------------------------------------------------------------------------------- helpers
def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingPackageError(f"ONNX export needs the package {module!r}; {_INSTALL_HINT}") from exc


def _check_size(size: Sequence[int], name: str = "size") -> tuple[int, int]:
    if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in size):
        raise UsageTypeError(f"{name} must be two positive integers (height, width), got {tuple(size)!r}")
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise UsageError(f"{name} must be two positive numbers (height, width), got {size}")
    return size  # type: ignore[return-value]


def min_dynamic_trace_size(model: SeMaskFPN) -> int:
    """Smallest height/width a dynamic graph of `model` can be traced at: the last stage needs 2+ windows per side.

    (PyTorch treats a size that is 1 at trace time as the constant 1, so a stage with a single window at the
    traced size would be fixed to one window.) 225 for window 7, 385 for window 12.
    """
    return model.backbone.strides[-1] * model.backbone.window_size + 1


def _other_size(size: tuple[int, int]) -> tuple[int, int]:
    """A second, smaller size to check a dynamic graph at (odd offsets: other padding in the stages)."""
    return max(MIN_DYNAMIC_SIZE, size[0] // 2 + 3), max(MIN_DYNAMIC_SIZE, size[1] // 2 + 7)


def _images(batch: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def onnxruntime_session(path: PathLike, threads: Optional[int] = None) -> Any:
    """An onnxruntime CPU session for an exported graph.

    Args:
        path: the `.onnx` file.
        threads: intra-op threads (None: onnxruntime's default, one per physical core).

    Returns:
        `onnxruntime.InferenceSession` with all graph optimisations on.
    """
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def onnx_parity(model: SeMaskFPN, session: Any, image: torch.Tensor, prior: bool = False) -> dict[str, Any]:
    """Compare an exported graph with the PyTorch model on one batch.

    Args:
        model: the PyTorch model (evaluated in eval mode, on the CPU, without autograd).
        session: an onnxruntime session (`onnxruntime_session`) of the model's export.
        image: (B, 3, H, W) normalised images.
        prior: also compare ``prior_logits`` (the graph must have been exported with ``prior=True``).

    Returns:
        ``{"size", "batch_size", "max_abs_diff", "argmax_agreement"}`` over the logits, plus
        ``"prior_max_abs_diff"`` with `prior`.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = model(image.cpu())
    finally:
        model.train(was_training)
    outputs = session.run(None, {"image": image.cpu().numpy()})
    logits = torch.from_numpy(outputs[0])
    if logits.shape != ref.logits.shape:
        raise ExportError(f"the graph returned logits of shape {tuple(logits.shape)}, PyTorch "
                          f"{tuple(ref.logits.shape)}")
    result = {"size": list(image.shape[-2:]), "batch_size": image.shape[0],
              "max_abs_diff": float((logits - ref.logits).abs().max()),
              "argmax_agreement": float((logits.argmax(1) == ref.logits.argmax(1)).double().mean())}
    if prior:
        result["prior_max_abs_diff"] = float((torch.from_numpy(outputs[1]) - ref.prior_logits).abs().max())
    return result


def _symbolic_ranges(program: torch.export.ExportedProgram) -> list[Optional[tuple[int, Any]]]:
    """For each dimension of the exported program's input: (lower, upper) when symbolic, None when fixed."""
    name = program.graph_signature.user_inputs[0]
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == name)
    ranges: list[Optional[tuple[int, Any]]] = []
    for dim in node.meta["val"].shape:
        if isinstance(dim, torch.SymInt):
            vr = program.range_constraints.get(dim.node.expr)
            ranges.append((int(vr.lower), vr.upper) if vr is not None else (0, None))
        else:
            ranges.append(None)
    return ranges


def _trace(module: nn.Module, example: torch.Tensor, dynamic: bool) -> tuple[torch.export.ExportedProgram, Optional[int]]:
    """`torch.export` the wrapped model; for a dynamic graph also return the smallest valid height/width."""
    shapes = {"image": {0: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}}
    try:
        with torch.no_grad():
            program = torch.export.export(module, (example,), dynamic_shapes=shapes if dynamic else None,
                                          strict=False)
    except Exception as exc:  # re-raised with what was asked; torch's own report follows as the cause
        what = "with dynamic batch, height and width" if dynamic else "at a fixed size"
        raise ExportError(f"torch.export could not trace the model {what} at input {tuple(example.shape)}: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if not dynamic:
        return program, None
    ranges = _symbolic_ranges(program)
    fixed = [axis for axis, r in zip(("batch", "channels", "height", "width"), ranges) if r is None and axis != "channels"]
    if fixed:
        raise ExportError(f"the graph traced at {tuple(example.shape)} is not dynamic in {fixed}: PyTorch fixed "
                          f"them to the traced size; export at a larger size (e.g. 512 512), or without dynamic.")
    return program, max(ranges[2][0], ranges[3][0])  # type: ignore[index]


def _check_request(model: SeMaskFPN, size: Sequence[int], batch_size: int, dynamic: bool,
                   prior: bool) -> tuple[int, int]:
    """The checked (H, W) of an export of `model` as asked, or the reason it cannot be done."""
    if not isinstance(model, SeMaskFPN):
        raise UsageTypeError(f"expected a semask SeMaskFPN model, got {type(model).__name__}")
    size = _check_size(size)
    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, got {batch_size}")
    # bounded before anything is traced: export and check run PyTorch and onnxruntime at this size on the CPU
    check_pixels(f"size (--size) {size}", *size)
    needed = forward_bytes(*size, model.num_classes, batch_size,
                           attention_strides=explicit_attention_strides(model, "cpu"))
    check_fits(f"size (--size) {size}", needed, "cpu",
               f"a forward pass of {batch_size} image(s) of {size[0]} x {size[1]} pixels with {model.num_classes} "
               "classes", "export at a smaller --size (a dynamic graph accepts other sizes)")
    if dynamic and min(size) < min_dynamic_trace_size(model):
        window, stride = model.backbone.window_size, model.backbone.strides[-1]
        raise UsageError(
            f"a dynamic graph of {model.name!r} must be traced at a height and width of at least "
            f"{min_dynamic_trace_size(model)} pixels, got size {size}: at the traced size every stage needs two "
            f"or more windows per side (the last stage has stride {stride} and windows of {window}), or PyTorch "
            f"fixes the graph to one window there. Export at a larger size (e.g. 512 512; the graph then accepts "
            f"any height and width from {MIN_DYNAMIC_SIZE}), or without dynamic")
    if prior and not model.decode_head.prior_branch:
        raise UsageError(f"model {model.name!r} has no semantic prior (a plain-Swin baseline); export without prior")
    if tuple(int(v) for v in re.findall(r"\d+", torch.__version__)[:2]) < (2, 6):
        raise ExportError(f"ONNX export needs PyTorch >= 2.6 (torch.export with Dim.DYNAMIC), found {torch.__version__}")
    return size


def _metadata(model: SeMaskFPN, outputs: tuple[str, ...], dynamic: bool, size: tuple[int, int],
              min_size: Optional[int]) -> dict[str, str]:
    """The ``semask.*`` metadata an exported file carries: the model, its classes, the input and outputs."""
    return {
        "semask.model": model.name, "semask.num_classes": str(model.num_classes),
        "semask.class_names": json.dumps(list(model.class_names) if model.class_names else None),
        "semask.palette": json.dumps(model.palette),
        "semask.input": "image: (batch, 3, height, width) float32, RGB pixels 0..255 normalised as (x - mean) / std",
        "semask.mean": json.dumps(list(IMAGENET_MEAN)), "semask.std": json.dumps(list(IMAGENET_STD)),
        "semask.outputs": json.dumps(list(outputs)), "semask.dynamic": json.dumps(dynamic),
        "semask.export_size": json.dumps(list(size)), "semask.min_size": json.dumps(min_size),
    }


def _check_graph(onnx: Any, proto: Any, path: Path, net: SeMaskFPN, sizes: Sequence[tuple[int, int]],
                 batch_size: int, prior: bool, atol: float, min_agreement: float) -> list[dict[str, Any]]:
    """`onnx.checker` on the written graph, then onnxruntime against PyTorch at each of `sizes`.

    Raises:
        ExportError: onnxruntime's logits differ by more than `atol` or agree on fewer argmax than `min_agreement`.
    """
    onnx.checker.check_model(proto, full_check=True)
    session = onnxruntime_session(path)
    checks = []
    for i, s in enumerate(sizes):
        result = onnx_parity(net, session, _images(batch_size, s, seed=i + 1), prior=prior)
        checks.append(result)
        if result["max_abs_diff"] > atol or result["argmax_agreement"] < min_agreement:
            raise ExportError(
                f"onnxruntime does not reproduce PyTorch at input {batch_size}x3x{s[0]}x{s[1]}: max "
                f"|dlogits| {result['max_abs_diff']:.3g} (allowed {atol:g}), argmax agreement "
                f"{result['argmax_agreement']:.4%} (needed {min_agreement:.2%}); nothing was written")
    return checks


# ----------------------------------------------------------------------------------------------- export
def export_onnx(model: SeMaskFPN, path: PathLike, *, size: Sequence[int] = (512, 512), batch_size: int = 1,
                dynamic: bool = False, prior: bool = False, opset: Optional[int] = None, check: bool = True,
                atol: float = 1e-3, min_agreement: float = 0.999, overwrite: bool = True) -> OnnxExport:
    """Export a model's logits (and optionally its semantic prior) to an ONNX file.

    Args:
        model: a `SeMaskFPN` (it is copied to the CPU in fp32 eval mode for the export; the original is left
            as it is).
        path: destination `.onnx`; written atomically, and only after the checks pass.
        size: (H, W) of the input the graph is traced at; a static graph accepts only this size.
        batch_size: images per batch of a static graph.
        dynamic: make batch, height and width symbolic. `size` must then be at least
            `min_dynamic_trace_size(model)` per side (225 for window 7, 385 for window 12), and the graph
            accepts heights and widths from `MIN_DYNAMIC_SIZE` (33) up.
        prior: also output ``prior_logits`` (B, K, ceil(H/4), ceil(W/4)); needs a SeMask model (not the
            plain-Swin baseline).
        opset: ONNX opset (None: the exporter's default).
        check: run `onnx.checker` and compare onnxruntime with PyTorch on random images at the export size
            (dynamic graphs: also at a second, smaller size that pads differently); raise `ExportError` if the
            logits differ by more than `atol` or the argmax agreement is below `min_agreement`.
        atol, min_agreement: the check's tolerances.
        overwrite: replace an existing `path` (as Python's writers do; `semask export` passes its --overwrite).
            Whether `path` can be written is checked before the model is traced.

    Returns:
        `OnnxExport` describing the file (with the check results).

    Raises:
        UsageError: a request that cannot be exported (see the messages); `UsageTypeError` for a model that is
            not a `SeMaskFPN`; `MissingPackageError` without the export extra; `OutputError` for a `path` that
            cannot be written (`OutputExistsError`: it exists and `overwrite` is False).
        WriteError: the OS refused the write (no space left, ...); the previous file is kept.
        ExportError: PyTorch cannot trace or translate the model, or the check fails.
    """
    size = _check_request(model, size, batch_size, dynamic, prior)
    path = check_output_file(path, "path", overwrite=overwrite, probe=True)  # before the (slow) trace
    _require("onnxscript")
    onnx = _require("onnx")

    net = copy.deepcopy(model).float().cpu().eval()
    module = _GraphOutputs(net, prior).eval()
    example = _images(2 if dynamic and batch_size == 1 else batch_size, size)
    program, min_size = _trace(module, example, dynamic)
    outputs = ("logits", "prior_logits") if prior else ("logits",)
    try:
        onnx_program = torch.onnx.export(program, (example,), input_names=["image"], output_names=list(outputs),
                                         opset_version=opset, dynamo=True, optimize=True, verbose=False)
    except Exception as exc:
        raise ExportError(f"torch.onnx could not translate the traced model to ONNX: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    onnx_program.model.metadata_props.update(_metadata(model, outputs, dynamic, size, min_size))
    with atomic_path(path) as tmp:
        onnx_program.save(tmp, external_data=False)
        proto = onnx.load(str(tmp))
        opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), -1)
        checks: list[dict[str, Any]] = []
        if check:
            sizes = [size, _other_size(size)] if dynamic else [size]
            checks = _check_graph(onnx, proto, tmp, net, sizes, batch_size, prior, atol, min_agreement)
    return OnnxExport(path=path, size=size, batch_size=batch_size, dynamic=dynamic, outputs=outputs,
                      opset=opset_used, min_size=min_size, checks=checks)
