"""Checkpoints of SeMask FPN (arXiv 2112.12782): the released (mmseg 0.x) layout, semask's own files, safetensors,
URLs, ImageNet Swin weights, training state, and the checks on untrusted files.

- `errors`: the checkpoint errors. `checks`: `LIMITS` and every check on an untrusted file.
- `remote`: URLs, the download cache (bounded by `DOWNLOAD_LIMITS`) and SHA-256. `official`: the released layout
  and architecture inference.
- `files`: reading any file, semask's own ``.pth`` (with training state) and ``.safetensors``.
- `pretrained`: ImageNet Swin weights for the backbone.
"""
from semask.checkpoint.checks import (LIMITS, ArchitectureLimits, check_architecture, check_finite, check_tensors,
                                      load_model_weights)
from semask.checkpoint.errors import (CheckpointError, CheckpointLimitError, CheckpointNonFiniteError, DownloadError,
                                      DownloadLimitError, DownloadNotFoundError)
from semask.checkpoint.files import (convert_to_safetensors, load_checkpoint, load_training_state,
                                     read_checkpoint_file, read_safetensors_checkpoint, save_checkpoint,
                                     save_safetensors)
from semask.checkpoint.official import infer_model_config, to_official_checkpoint
from semask.checkpoint.pretrained import LoadReport, load_pretrained_backbone
from semask.checkpoint.remote import (DOWNLOAD_LIMITS, DownloadLimits, cache_path, download_checkpoint, is_url,
                                      resolve_checkpoint_path)

__all__ = [
    "CheckpointError", "CheckpointLimitError", "CheckpointNonFiniteError", "ArchitectureLimits", "LIMITS",
    "check_architecture", "check_tensors", "check_finite", "LoadReport", "read_checkpoint_file",
    "infer_model_config", "load_checkpoint", "load_model_weights", "to_official_checkpoint", "save_checkpoint",
    "load_training_state", "load_pretrained_backbone", "is_url", "download_checkpoint", "resolve_checkpoint_path",
    "read_safetensors_checkpoint", "save_safetensors", "convert_to_safetensors", "DownloadError", "DownloadLimitError",
    "DownloadNotFoundError", "DownloadLimits", "DOWNLOAD_LIMITS", "cache_path",
]
