"""The one interface every descriptor model exposes to jobs: uint8 pixels in, unit vectors out.

Jobs (evaluation, bulk embedding, Serve) never care whether a descriptor comes from the ONNX
teacher, a TorchScript file or a distilled student: they decode to `image_size` x `image_size`
uint8 RGB, call `embed`, and stamp `fingerprint` on what they write, so descriptors of two
different models can never be mixed silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

from rdcd.errors import ModelError  # noqa: F401 - re-exported: models raise it

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocessing_fingerprint(parts: dict[str, Any]) -> bytes:
    """Canonical bytes of the preprocessing, so a change of size or mean/std changes the print."""
    return json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()


def sha256_hex(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


class Embedder(ABC):
    """A descriptor model ready for inference."""

    name: str  # human-readable: "sscd-onnx", "student:efficientnet_b0/128"
    dim: int
    image_size: int
    fingerprint: str
    # What computes the descriptors (for reports; not identity: see rdcd.models.runtime).
    backend: str = "torch"
    precision: str = "fp32"

    @abstractmethod
    def embed(self, images: np.ndarray) -> np.ndarray:
        """`images`: uint8 (N, H, W, 3) RGB with H = W = `image_size`. Returns float32 (N, dim),
        each row L2-normalised."""

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dim": self.dim,
            "image_size": self.image_size,
            "fingerprint": self.fingerprint,
            "backend": self.backend,
            "precision": self.precision,
        }


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


class TorchEmbedder(Embedder):
    """Wraps an `nn.Module` that maps normalised NCHW floats to descriptors."""

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        name: str,
        dim: int,
        image_size: int,
        fingerprint: str,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        device: str | None = None,
        precision: str = "fp32",
    ):
        self.name, self.dim, self.image_size, self.fingerprint = name, dim, image_size, fingerprint
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # fp16/bf16 autocast on a GPU (bf16: fp32's range, what a trainer on A100/H100 runs)
        half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        self.dtype = half if self.device.type == "cuda" else None
        self.precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.dtype, "fp32")
        # channels-last runs convolutions ~1.5x faster on CPU (and on tensor cores) here.
        self.module = module.eval().to(self.device, memory_format=torch.channels_last)
        self._mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255.0

    def to_input(self, images: np.ndarray) -> torch.Tensor:
        """uint8 NHWC pixels to the normalised NCHW float tensor the network takes."""
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        x = x.permute(0, 3, 1, 2).float()  # NHWC memory viewed as NCHW: already channels-last
        return ((x - self._mean) / self._std).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def embed(self, images: np.ndarray) -> np.ndarray:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 (N, H, W, 3) images, got shape {images.shape}")
        x = self.to_input(images)
        if self.dtype is not None:
            with torch.autocast(self.device.type, dtype=self.dtype):
                out = self.module(x)
        else:
            out = self.module(x)
        return l2_normalize(out.float().cpu().numpy())
