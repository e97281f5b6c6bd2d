"""Notebooks under pytest (nbval): the kernels run each notebook's small CI setting.

Notebooks 04-07 read ``SEMASK_NOTEBOOKS`` in their parameter cell: ``ci`` selects a setting of seconds, anything
else (a person running the notebook) the full one whose outputs are committed. The kernels inherit this
process's environment, so setting it here, when pytest collects the notebooks, is enough.
"""
import os

os.environ.setdefault("SEMASK_NOTEBOOKS", "ci")
