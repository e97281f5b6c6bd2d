"""Training configuration of SeMask FPN (arXiv 2112.12782): typed dataclasses and the published recipes.

A `TrainConfig` has one section per concern — `model`, `data`, `loss`, `optim`, `schedule`, `train`, `eval` —
each a dataclass whose defaults carry a short comment. `PRESETS` holds one named config per published SeMask FPN
recipe (4 variants x ADE20K, Cityscapes, COCO-Stuff 10k; docs/recipes.md §5), the plain-Swin FPN baselines on the same
recipes, and `toy` / `swin_toy` for the built-in toy data:

    config = semask.engine.config.get_preset("semask_tiny_ade20k")
    config = apply_overrides(config, ["data.root=/data/ADEChallengeData2016", "train.batch_size=4"])

Overrides are dotted ``key=value`` strings applied with type checking (never `exec` of a file): an unknown key
or a value of the wrong type is a `ConfigError` that names the key and lists the valid ones. A resolved config
round-trips through `to_dict` / `from_dict` (JSON), which is how it is stored in a run directory and inside
every checkpoint. `train.global_batch` is the recipe's ``images per GPU x GPUs``, reached by gradient accumulation
(docs/design.md, "Engine").
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from semask.bounds import SettingError, check_pixels, check_settings, setting
from semask.data.datasets import IGNORE_INDEX
from semask.device import PRECISIONS
from semask.engine.coerce import ConfigError, build_dataclass, coerce, fail, unwrap_optional
from semask.data.transforms import TEST_PRESETS, TRAIN_PRESETS, TestPipelineConfig, TrainPipelineConfig

__all__ = [
    "ConfigError",
    "ModelSection",
    "DataSection",
    "LossSection",
    "OptimSection",
    "ScheduleSection",
    "RuntimeSection",
    "EvalSection",
    "TrainConfig",
    "PRESETS",
    "DATASETS",
    "list_presets",
    "get_preset",
    "apply_overrides",
    "set_value",
    "to_dict",
    "from_dict",
    "load_config",
    "flat_keys",
]

DATASETS = ("ade20k", "cityscapes", "coco_stuff10k", "toy", "folder")


# --------------------------------------------------------------------------------------------- sections
@dataclass
class ModelSection:
    """Which model to build (any `semask.list_models()` name) and where its backbone starts from."""

    name: str = "semask_tiny_fpn"  # registry name; swin_*_fpn are the plain-Swin FPN baselines
    pretrained: Optional[str] = None  # ImageNet Swin weights (Microsoft's or timm's layout); None = from scratch
    backbone_classes: Optional[int] = setting(None, ge=1, le=10_000)  # semantic layers' classes; None = the dataset's
    # stages with global semantic attention; None = the released rule
    semantic_global_stages: Optional[tuple[int, ...]] = setting(None, ge=0, allow_empty=True)
    drop_path_rate: Optional[float] = setting(None, ge=0, lt=1)  # stochastic depth; None = the registry's (0.3)
    grad_checkpointing: bool = False  # recompute backbone stages in backward (saves memory, costs ~30% time)
    sync_bn: Optional[bool] = None  # SyncBatchNorm in the decoder; None = on when training on several CUDA processes


@dataclass
class DataSection:
    """The dataset, its augmentation (docs/recipes.md §5) and its test-time rescale (docs/recipes.md §6)."""

    dataset: str = "ade20k"  # ade20k | cityscapes | coco_stuff10k | toy | folder
    root: str = "data/ade20k"  # dataset root (for ade20k also the folder that contains ADEChallengeData2016)
    train_split: Optional[str] = None  # None = the dataset's training split
    val_split: Optional[str] = None  # None = the dataset's validation split
    train_pipeline: TrainPipelineConfig = field(default_factory=TrainPipelineConfig)  # the recipe's augmentation
    test_pipeline: TestPipelineConfig = field(default_factory=TestPipelineConfig)  # the recipe's test scale
    num_workers: int = setting(4, ge=0, le=256)  # DataLoader processes per process (0 = none)
    class_names: Optional[tuple[str, ...]] = None  # folder datasets only: one name per class
    img_suffix: str = ".jpg"  # folder datasets only: how image file names end
    seg_map_suffix: str = ".png"  # folder datasets only: how label file names end
    reduce_zero_label: bool = False  # folder datasets only: label 0 = unlabelled, k -> class k - 1


@dataclass
class LossSection:
    """CE of the decoder + prior_weight x CE of the summed semantic prior (docs/recipes.md §3)."""

    prior_weight: float = setting(0.4, ge=0)  # weight of the semantic-prior loss (0.4 in every recipe)
    ohem_min_kept: Optional[int] = setting(None, ge=1)  # OHEM: hardest pixels kept per image (or 100000)
    # per-class loss weights, one per class, not all zero (none in the released recipes)
    class_weight: Optional[tuple[float, ...]] = setting(None, ge=0, not_all_zero=True)


@dataclass
class OptimSection:
    """AdamW with the paper's parameter groups (no decay on position tables and norms)."""

    lr: float = setting(1e-4, gt=0)  # peak learning rate
    weight_decay: float = setting(1e-4, ge=0)  # AdamW decoupled weight decay (0 for pos. tables, norms)
    betas: tuple[float, float] = setting((0.9, 0.999), ge=0, lt=1)  # AdamW betas
    eps: float = setting(1e-8, gt=0)  # AdamW epsilon
    clip_grad_norm: Optional[float] = setting(None, gt=0)  # clip the global gradient norm; None = do not clip


@dataclass
class ScheduleSection:
    """Iteration-based linear warm-up then polynomial decay (mmcv's `poly` policy with `linear` warm-up)."""

    iters: int = setting(80_000, ge=1)  # optimizer steps
    warmup_iters: int = setting(1500, ge=0)  # linear warm-up steps
    warmup_ratio: float = setting(1e-6, gt=0, le=1)  # learning rate at step 0, as a fraction of the scheduled rate
    power: float = setting(1.0, gt=0)  # poly decay power
    min_lr: float = setting(0.0, ge=0)  # learning rate reached at the last step


@dataclass
class RuntimeSection:
    """Batch, precision, device, seeding and how often to log, evaluate and checkpoint."""

    batch_size: int = setting(8, ge=1)  # images per process per forward pass (the recipe's images per GPU)
    global_batch: int = setting(16, ge=1)  # images per optimizer step (images/GPU x GPUs), by accumulation
    precision: str = "auto"  # auto (bf16 where native: GPUs, AVX512_BF16/AMX CPUs; else fp16/fp32) | fp32|bf16|fp16
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda | cuda:N (torchrun assigns one GPU per process)
    seed: int = setting(0, ge=0, le=2**32 - 1)  # seeds initialisation, data order, augmentation, dropout
    log_interval: int = setting(50, ge=1)  # steps between log lines
    eval_interval: int = setting(8000, ge=0)  # steps between validations (0 = only at the end)
    checkpoint_interval: int = setting(8000, ge=0)  # steps between writes of latest.pth (and at the end)
    # steps between weight snapshots iter_NNNNNN.pth in the run directory, kept for later study (0 = none)
    snapshot_interval: int = setting(0, ge=0)
    channels_last: bool = True  # channels-last images (faster convolutions on CPUs and tensor cores)
    tensorboard: bool = True  # also write TensorBoard scalars when the `tensorboard` package is installed
    threads: Optional[int] = setting(None, ge=1, le=1024)  # torch.set_num_threads on the CPU; None = PyTorch's


@dataclass
class EvalSection:
    """The validation protocol used during training and by `semask test`."""

    mode: str = "whole"  # whole | slide (single scale); `semask test --aug-test` adds multi-scale + flip
    crop_size: int = setting(512, ge=1)  # window of the sliding-window mode
    stride: int = setting(341, ge=1)  # stride of the sliding-window mode
    max_images: Optional[int] = setting(None, ge=1)  # validate on the first N images only (None = the whole split)
    # also score each stage's semantic prior and the decoder's summed prior in the same forward (whole mode only;
    # the eval records' prior_mIoU and decoder_prior_mIoU, as semask.analyze scores them)
    prior_metrics: bool = True


@dataclass
class TrainConfig:
    """A complete, resolved training recipe."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: RuntimeSection = field(default_factory=RuntimeSection)
    eval: EvalSection = field(default_factory=EvalSection)
    name: str = "custom"  # preset name (informational)
    official_config: Optional[str] = None  # the released config file this preset reproduces

    def __post_init__(self) -> None:
        validate(self)


# --------------------------------------------------------------------------------------------- validation
SECTIONS = ("model", "data", "loss", "optim", "schedule", "train", "eval")


def validate(config: TrainConfig) -> None:
    """Check every setting: each numeric field against the range declared beside it (`semask.bounds`), then the
    names and the settings that must agree with each other; raises `ConfigError` naming the key."""
    from semask.model.registry import list_models

    for section in SECTIONS:
        for obj, prefix in _checked_parts(getattr(config, section), section):
            try:
                check_settings(obj)
            except SettingError as exc:
                fail(f"{prefix}.{exc.field}", exc.expected, exc.got)
    if config.model.name not in list_models():
        fail("model.name", f"a registered model ({', '.join(list_models())})", config.model.name)
    if config.data.dataset not in DATASETS:
        fail("data.dataset", f"one of {', '.join(DATASETS)}", config.data.dataset)
    if config.data.dataset == "folder" and not config.data.class_names:
        fail("data.class_names", "one name per class for a folder dataset (e.g. data.class_names=sky,road,car)",
             config.data.class_names)
    if config.train.precision not in PRECISIONS:
        fail("train.precision", f"one of {', '.join(PRECISIONS)}", config.train.precision)
    if config.eval.mode not in ("whole", "slide"):
        fail("eval.mode", "whole or slide (multi-scale + flip is `semask test --aug-test`)", config.eval.mode)
    if config.train.global_batch % config.train.batch_size:
        fail("train.global_batch", f"a multiple of train.batch_size ({config.train.batch_size})",
             config.train.global_batch)
    if config.schedule.min_lr > config.optim.lr:
        fail("schedule.min_lr", f"at most optim.lr ({config.optim.lr:g}): the rate would rise while it decays",
             config.schedule.min_lr)
    if config.eval.stride > config.eval.crop_size:
        fail("eval.stride", f"at most eval.crop_size ({config.eval.crop_size}; windows farther apart leave pixels "
             "uncovered): set both", config.eval.stride)
    # one ignore index: the datasets mark unlabelled pixels with it, the pipeline pads with it, the loss and the
    # metric skip it; another value would pad with a real class and train on it
    if config.data.train_pipeline.ignore_index != IGNORE_INDEX:
        fail("data.train_pipeline.ignore_index", f"{IGNORE_INDEX}, the ignore label of every dataset, of the loss "
             "and of the metric (semask.data.IGNORE_INDEX)", config.data.train_pipeline.ignore_index)
    try:
        check_pixels(f"eval.crop_size {config.eval.crop_size}", config.eval.crop_size, config.eval.crop_size)
    except SettingError as exc:
        raise ConfigError(f"config key 'eval.crop_size': {exc}") from None


def _checked_parts(section: Any, prefix: str) -> list[tuple[Any, str]]:
    """A section and its nested setting dataclasses (the pipelines), with their dotted prefixes."""
    parts = [(section, prefix)]
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            parts += _checked_parts(value, f"{prefix}.{f.name}")
    return parts


# --------------------------------------------------------------------------------------------- presets
_VARIANT_ARCH = {"tiny": "patch4_window7", "small": "patch4_window7", "base": "patch4_window12",
                 "large": "patch4_window12"}
# ImageNet Swin weights each published recipe starts from (Microsoft's release names)
PRETRAINED = {"tiny": "swin_tiny_patch4_window7_224.pth", "small": "swin_small_patch4_window7_224.pth",
              "base": "swin_base_patch4_window12_384_22k.pth", "large": "swin_large_patch4_window12_384_22k.pth"}
_DATASET_ROOTS = {"ade20k": "data/ade20k", "cityscapes": "data/cityscapes", "coco_stuff10k": "data/coco_stuff10k",
                  "toy": "data/toy", "folder": "data/custom"}
_OFFICIAL_DATASET = {"ade20k": "ade20k", "cityscapes": "cityscapes", "coco_stuff10k": "coco10k"}


def _published(semantic: bool, variant: str, dataset: str) -> TrainConfig:
    """One row of the recipe table of docs/recipes.md §5 (both for SeMask and for the plain-Swin baseline)."""
    large = variant == "large"
    crop = 768 if dataset == "cityscapes" else 640 if large else 512
    if dataset == "ade20k":
        per_gpu, gpus = (4, 4) if large else (8, 2)
    elif dataset == "cityscapes":
        per_gpu, gpus = (2, 4) if large else (4, 2)
    else:
        per_gpu, gpus = (2, 8) if variant in ("base", "large") else (4, 4)
    cityscapes = dataset == "cityscapes"
    # OHEM: the Large ADE20K recipe and every COCO-Stuff 10k recipe (docs/recipes.md §3)
    ohem = 100_000 if (dataset == "ade20k" and large) or dataset == "coco_stuff10k" else None
    test_key = f"{dataset}_large" if large and f"{dataset}_large" in TEST_PRESETS else dataset
    prefix = "semask_swin" if semantic else "swin"
    official = (f"configs/{prefix}/{dataset}/semfpn_{prefix}_{variant}_{_VARIANT_ARCH[variant]}_{crop}x{crop}_80k_"
                f"{_OFFICIAL_DATASET[dataset]}.py")
    return TrainConfig(
        name=f"{'semask' if semantic else 'swin'}_{variant}_{dataset}",
        official_config=official,
        model=ModelSection(name=f"{'semask' if semantic else 'swin'}_{variant}_fpn", pretrained=PRETRAINED[variant]),
        data=DataSection(dataset=dataset, root=_DATASET_ROOTS[dataset],
                         train_pipeline=TRAIN_PRESETS[f"{dataset}_{variant}"], test_pipeline=TEST_PRESETS[test_key]),
        loss=LossSection(prior_weight=0.4, ohem_min_kept=ohem),
        optim=OptimSection(lr=1e-3 if cityscapes else 1e-4, weight_decay=0.05 if cityscapes else 1e-4),
        schedule=ScheduleSection(iters=80_000, warmup_iters=1500,
                                 warmup_ratio=1e-5 if cityscapes and variant != "base" else 1e-6),
        train=RuntimeSection(batch_size=per_gpu, global_batch=per_gpu * gpus, eval_interval=8000,
                             checkpoint_interval=8000),
        eval=EvalSection(mode="whole", crop_size=crop, stride=crop * 2 // 3),
    )


# `semask.engine.losses.balanced_class_weights` of the toy training split's pixel counts (seed 0, 300 scenes): the six
# things cover 2% of the pixels; weighting the loss by frequency ** -0.5 lifts them about 5-16x over the stuff
# (tests/test_config.py recomputes these numbers from a freshly written toy set)
TOY_CLASS_WEIGHTS = (0.70, 1.05, 0.95, 1.00, 0.92, 6.77, 4.90, 7.17, 6.82, 7.49, 15.73)


def _toy(semantic: bool) -> TrainConfig:
    """The built-in toy data: `semask_toy_fpn` from scratch, sized for `semask demo` on a 2-core CPU (the choices:
    docs/design.md, "Engine"; the timing: docs/benchmarks.md, "The demo")."""
    return TrainConfig(
        name="toy" if semantic else "swin_toy",
        official_config=None,
        model=ModelSection(name="semask_toy_fpn" if semantic else "swin_toy_fpn"),
        data=DataSection(dataset="toy", root=_DATASET_ROOTS["toy"], train_pipeline=TRAIN_PRESETS["toy"],
                         test_pipeline=TEST_PRESETS["toy"], num_workers=0),
        loss=LossSection(prior_weight=0.4, ohem_min_kept=None, class_weight=TOY_CLASS_WEIGHTS),
        optim=OptimSection(lr=2e-3, weight_decay=0.01, clip_grad_norm=5.0),
        schedule=ScheduleSection(iters=800, warmup_iters=40, warmup_ratio=1e-3),
        train=RuntimeSection(batch_size=8, global_batch=8, log_interval=10, eval_interval=200,
                             checkpoint_interval=200),
        eval=EvalSection(mode="whole", crop_size=256, stride=171),
    )


def _build_presets() -> dict[str, TrainConfig]:
    presets: dict[str, TrainConfig] = {}
    for semantic in (True, False):
        for dataset in ("ade20k", "cityscapes", "coco_stuff10k"):
            for variant in ("tiny", "small", "base", "large"):
                config = _published(semantic, variant, dataset)
                presets[config.name] = config
        config = _toy(semantic)
        presets[config.name] = config
    return presets


PRESETS: dict[str, TrainConfig] = _build_presets()


def list_presets(pattern: str = "*") -> list[str]:
    """Preset names matching a shell-style pattern (e.g. ``"*_ade20k"``), sorted."""
    import fnmatch

    return sorted(n for n in PRESETS if fnmatch.fnmatch(n, pattern))


def get_preset(name: str) -> TrainConfig:
    """A fresh copy of a named preset; an unknown name raises `ConfigError` listing the valid ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(list_presets())}")
    return from_dict(to_dict(PRESETS[name]))


# --------------------------------------------------------------------------------------------- (de)serialising
def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(values: dict[str, Any]) -> TrainConfig:
    """Rebuild a `TrainConfig` from `to_dict` output (missing keys take their defaults)."""
    return build_dataclass(TrainConfig, values)


def load_config(path: Union[str, os.PathLike]) -> TrainConfig:
    """Read a config written by `semask train` (``config.json`` of a run directory)."""
    from pathlib import Path

    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read as JSON: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a JSON object, got {type(values).__name__}")
    return from_dict(values)


# --------------------------------------------------------------------------------------------- overrides
def flat_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every settable dotted key of a config class, e.g. ``["model.name", ..., "data.train_pipeline.crop_size"]``."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        inner, _ = unwrap_optional(hints[f.name])
        keys += flat_keys(inner, key) if dataclasses.is_dataclass(inner) else [key]
    return keys


def _set_in(values: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted ``key`` in a `to_dict` tree, parsing ``value`` by the field's type."""
    parts = key.split(".")
    node: Any = values
    cls: Any = TrainConfig
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            section = ".".join(parts[:i])
            valid = [k for k in flat_keys() if not section or k.startswith(section + ".")]
            raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")
        tp, _ = unwrap_optional(hints[part])
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"config key {key!r} is a section; set its fields: "
                                  f"{', '.join(flat_keys(tp, key))}")
            node[part] = json.loads(json.dumps(coerce(value, hints[part], key)))
        else:
            if not dataclasses.is_dataclass(tp):
                raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[:i + 1])} is not a section")
            cls, node = tp, node[part]


def set_value(config: TrainConfig, key: str, value: Any) -> TrainConfig:
    """A copy of ``config`` with the dotted ``key`` set to ``value`` (a string is parsed by the field's type)."""
    return apply_overrides(config, [(key, value)])


def apply_overrides(config: TrainConfig, overrides: Sequence[Union[str, tuple[str, Any]]]) -> TrainConfig:
    """Apply ``key=value`` strings (or ``(key, value)`` pairs) in order; the result is validated once, at the end,
    so that settings which only make sense together (``data.dataset=folder data.class_names=...``) can be given."""
    values = to_dict(config)
    for item in overrides:
        if isinstance(item, str):
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.batch_size=4)")
            key, value = item.split("=", 1)
        else:
            key, value = item
        _set_in(values, key.strip(), value)
    return from_dict(values)
