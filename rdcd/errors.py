"""Errors that the command line reports as user errors, kept free of heavy imports.

`rdcd.cli` catches these to print one line and exit 2; defining `ModelError` here (not beside
the models, which import PyTorch) lets `rdcd --help`, `python -m jobs.* --help` and every refusal
of bad arguments answer without loading PyTorch and timm first (seconds on a small machine).
"""

from __future__ import annotations


class ModelError(RuntimeError):
    """A model that cannot be loaded or used: missing, corrupt, or mismatched."""
