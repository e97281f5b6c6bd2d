"""Pictures of semask (arXiv 2112.12782): label maps and overlays, plots of priors, attention, training logs and
results, and the Jupyter widgets (explorer, comparison)."""
