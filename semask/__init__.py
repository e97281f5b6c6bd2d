"""semask: SeMask (Semantically Masked Transformers for Semantic Segmentation, arXiv 2112.12782).

A small, modern, importable implementation that loads the released SeMask FPN checkpoints and reproduces
their outputs, with datasets, metrics, inference and visualisation around it.

    import semask
    model = semask.create_model("semask_tiny_fpn", num_classes=150)
    model = semask.load_checkpoint("semask_tiny_fpn_ade20k.pth")
    labels = semask.predict(model, "image.jpg", mode="msflip")
"""
from semask.checkpoint import load_checkpoint, load_pretrained_backbone, save_checkpoint
from semask.export import export_onnx
from semask.inference import Predictor, predict
from semask.losses import SeMaskLoss, semask_loss
from semask.models import ModelConfig, create_model, list_models
from semask.segmentor import SegmentationOutput, SeMaskFPN

__version__ = "0.1.0"

__all__ = [
    "ModelConfig",
    "Predictor",
    "SeMaskFPN",
    "SeMaskLoss",
    "SegmentationOutput",
    "create_model",
    "export_onnx",
    "list_models",
    "load_checkpoint",
    "load_pretrained_backbone",
    "predict",
    "save_checkpoint",
    "semask_loss",
    "__version__",
]
