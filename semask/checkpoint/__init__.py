"""Checkpoints of SeMask FPN (arXiv 2112.12782): the released (mmseg 0.x) layout, semask's own files, safetensors,
URLs, ImageNet Swin weights, training state, and the checks on untrusted files."""
from semask.checkpoint.core import (LIMITS, ArchitectureLimits, CheckpointError, CheckpointLimitError,
                                    CheckpointNonFiniteError, LoadReport, check_architecture, check_finite,
                                    check_tensors, convert_to_safetensors, download_checkpoint, infer_model_config,
                                    is_url, load_checkpoint, load_model_weights, load_pretrained_backbone,
                                    load_training_state, read_checkpoint_file, read_safetensors_checkpoint,
                                    resolve_checkpoint_path, save_checkpoint, save_safetensors,
                                    to_official_checkpoint)

__all__ = [
    "CheckpointError", "CheckpointLimitError", "CheckpointNonFiniteError", "ArchitectureLimits", "LIMITS",
    "check_architecture", "check_tensors", "check_finite", "LoadReport", "read_checkpoint_file",
    "infer_model_config", "load_checkpoint", "load_model_weights", "to_official_checkpoint", "save_checkpoint",
    "load_training_state", "load_pretrained_backbone", "is_url", "download_checkpoint", "resolve_checkpoint_path",
    "read_safetensors_checkpoint", "save_safetensors", "convert_to_safetensors",
]
