"""The engine of semask (arXiv 2112.12782): losses, metrics, the inference protocols, evaluation, the training
loop, its typed config and presets, torch.distributed, and the run directory."""
