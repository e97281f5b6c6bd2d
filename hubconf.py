"""torch.hub entry points for semask (SeMask FPN, arXiv 2112.12782): one per registered model.

    model = torch.hub.load("path/to/semask", "semask_tiny_fpn", source="local", num_classes=150)
    model = torch.hub.load("path/to/semask", "semask_tiny_fpn", source="local",
                           pretrained="semask_tiny_fpn_ade20k.pth")          # or an https:// URL
    torch.hub.list("<owner>/semask")                                         # the entry points (GitHub repos)

Every entry point takes the same arguments (see `_entry`); they are generated from `semask.list_models()`, so
a model added to the registry is a hub entry point too.
"""
from __future__ import annotations

import typing as _t  # private names only: torch.hub lists every public callable of this file as an entry point

dependencies = ["torch", "timm", "numpy", "PIL", "matplotlib", "tqdm", "safetensors"]


def _entry(name: str) -> _t.Callable[..., _t.Any]:
    def entry(pretrained: _t.Optional[str] = None, *, num_classes: _t.Optional[int] = None,
              class_names: _t.Optional[_t.Sequence[str]] = None,
              palette: _t.Optional[_t.Sequence[_t.Sequence[int]]] = None,
              pretrained_backbone: _t.Optional[str] = None, sha256: _t.Optional[str] = None, **overrides: _t.Any):
        import semask
        from semask.errors import UsageError

        if pretrained is not None:
            if overrides or pretrained_backbone is not None:
                extra = sorted(overrides) + (["pretrained_backbone"] if pretrained_backbone is not None else [])
                raise UsageError(f"{name}: the architecture comes from pretrained={pretrained!r}; drop {extra}")
            model = semask.load_checkpoint(pretrained, sha256=sha256)
            if model.name != name:
                raise UsageError(f"{name}: pretrained={pretrained!r} holds a {model.name!r} model; "
                                 f"load it with torch.hub.load(..., {model.name!r}, ...)")
            if num_classes is not None and num_classes != model.num_classes:
                raise UsageError(f"{name}: pretrained={pretrained!r} has {model.num_classes} classes, "
                                 f"num_classes={num_classes} was asked for")
            for field, value, expected in (("class_names", class_names, model.num_classes),
                                           ("palette", palette, model.num_classes)):
                if value is not None and len(value) != expected:
                    raise UsageError(f"{name}: {field} has {len(value)} entries for {expected} classes")
            if class_names is not None:
                model.class_names = tuple(class_names)
            if palette is not None:
                model.palette = [list(map(int, c)) for c in palette]
            return model
        model = semask.create_model(name, num_classes=num_classes, class_names=class_names, palette=palette,
                                    **overrides)
        if pretrained_backbone is not None:
            semask.load_pretrained_backbone(model, pretrained_backbone, sha256=sha256)
        return model

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"""`{name}`: a SeMask/Swin FPN model from semask's registry.

    Args:
        pretrained: a checkpoint path or https:// URL (official SeMask FPN `.pth`, semask's `.pth` or
            `.safetensors`); the model comes back in eval mode with the file's classes and palette. None:
            fresh weights, in training mode.
        num_classes: decoder classes (checked against `pretrained` when both are given).
        class_names, palette: dataset metadata the model carries (override the checkpoint's).
        pretrained_backbone: ImageNet Swin weights (path or URL) for a fresh model.
        sha256: expected SHA-256 of `pretrained` / `pretrained_backbone` (hex, or a prefix of 8+ characters).
        **overrides: `ModelConfig` fields for a fresh model, e.g. ``drop_path_rate=0.2``.

    Returns:
        A `semask.SeMaskFPN`.
    """
    return entry


def _register() -> None:
    from semask.model.registry import list_models

    for model_name in list_models():
        globals()[model_name] = _entry(model_name)


_register()
