"""The SeMask FPN forward pass (arXiv 2112.12782): Swin backbone with semantic layers, Semantic-FPN decoder,
segmentor, model config and the registry of named variants. No file I/O lives here."""
from semask.model.config import ModelConfig, check_class_metadata, released_global_stages
from semask.model.registry import build_model, create_model, list_models, model_config
from semask.model.segmentor import ExternalSegmentor, SegmentationOutput, SeMaskFPN, check_input

__all__ = ["ModelConfig", "check_class_metadata", "released_global_stages", "build_model", "create_model",
           "list_models", "model_config", "ExternalSegmentor", "SegmentationOutput", "SeMaskFPN", "check_input"]
