"""semask: SeMask (Semantically Masked Transformers for Semantic Segmentation, arXiv 2112.12782).

A small, modern, importable implementation that loads the released SeMask FPN checkpoints and reproduces
their outputs, with datasets, metrics, inference and visualisation around it.

    import semask
    model = semask.create_model("semask_tiny_fpn", num_classes=150)
    model = semask.load_checkpoint("semask_tiny_fpn_ade20k.pth")
    labels = semask.predict(model, "image.jpg", mode="msflip")
    result = semask.train(semask.config.get_preset("toy"), work_dir="runs/toy")
    print(semask.evaluate(result.model, dataset).table())
    print(semask.analyze(result.model, dataset).table())      # what the semantic layers learn, per stage

`semask.train` and `semask.evaluate` are the functions; their modules are `semask.engine.train` and
`semask.engine.evaluate`. `semask.config` is the training config module `semask.engine.config`.
"""
from semask.engine import config
from semask.engine.analysis import Analysis, analyze
from semask.checkpoint import load_checkpoint, load_pretrained_backbone, save_checkpoint
from semask.engine.evaluate import EvalResult, evaluate
from semask.apps.export import export_onnx
from semask.engine.inference import Predictor, predict
from semask.engine.losses import SeMaskLoss, semask_loss
from semask.model.config import ModelConfig
from semask.model.registry import create_model, list_models
from semask.model.segmentor import SegmentationOutput, SeMaskFPN
from semask.engine.train import TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "Analysis",
    "EvalResult",
    "ModelConfig",
    "Predictor",
    "SeMaskFPN",
    "SeMaskLoss",
    "SegmentationOutput",
    "TrainResult",
    "config",
    "analyze",
    "create_model",
    "evaluate",
    "export_onnx",
    "list_models",
    "load_checkpoint",
    "load_pretrained_backbone",
    "predict",
    "save_checkpoint",
    "semask_loss",
    "train",
    "__version__",
]
