"""Descriptor models: the SSCD teacher, the compact RDCD student, and how `M` names one."""

from rdcd.models.embedder import Embedder, ModelError, TorchEmbedder
from rdcd.models.resolve import load_model

__all__ = ["Embedder", "ModelError", "TorchEmbedder", "load_model"]
