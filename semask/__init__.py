"""semask: SeMask (Semantically Masked Transformers for Semantic Segmentation, arXiv 2112.12782).

A small, modern, importable implementation that loads the released SeMask FPN checkpoints and reproduces
their outputs, with datasets, metrics, inference and visualisation around it.
"""
__version__ = "0.1.0"
