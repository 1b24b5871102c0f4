"""Self-describing student checkpoints: one file that rebuilds the model and proves its identity.

A checkpoint holds the weights, the `StudentConfig` (backbone, dims, image size, mean/std) and a
fingerprint: sha256 over every tensor and the preprocessing. The fingerprint travels into every
Parquet shard and index built with the model, so a server can refuse descriptors that came from
another model. Files are read with `torch.load(weights_only=True)` only: a checkpoint from an
untrusted bucket can carry tensors and plain values, never code.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import torch

from rdcd import io as rio
from rdcd.models.embedder import Embedder, ModelError, preprocessing_fingerprint, sha256_hex
from rdcd.models.student import StudentConfig, StudentNet

log = logging.getLogger(__name__)

FORMAT = "rdcd-student-v1"
# Buffers a checkpoint may lack (written before they existed); they load as the identity, and the
# fingerprint stays that of the tensors the file holds.
OPTIONAL_BUFFERS = ("feat_mean", "feat_scale", "white_mean", "white_proj")


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def fingerprint_of(state_dict: dict[str, torch.Tensor], config: StudentConfig) -> str:
    """sha256 of the weights exactly as stored (names, dtypes, shapes, bytes) and the config."""
    chunks = [b"rdcd-student-v1\n", preprocessing_fingerprint(config.to_dict())]
    for key in sorted(state_dict):
        t = state_dict[key]
        chunks.append(f"\n{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        chunks.append(_tensor_bytes(t))
    return sha256_hex(*chunks)


def checkpoint_bytes(
    model: StudentNet, *, half: bool = False, meta: dict[str, Any] | None = None
) -> tuple[bytes, str]:
    """Serialise `model`; `half=True` stores floating weights as fp16 (half the size)."""
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        state[k] = v.half() if half and v.is_floating_point() else v.clone()
    fp = fingerprint_of(state, model.config)
    payload = {
        "format": FORMAT,
        "config": model.config.to_dict(),
        "state_dict": state,
        "fingerprint": fp,
        "meta": dict(meta or {}),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue(), fp


def save_checkpoint(
    model: StudentNet, uri: str, *, half: bool = False, meta: dict[str, Any] | None = None
) -> str:
    """Write a checkpoint to a local path or `s3://` URI; returns its fingerprint."""
    data, fp = checkpoint_bytes(model, half=half, meta=meta)
    rio.write_bytes(uri, data)
    log.info("saved student checkpoint %s (%d bytes, fingerprint %s)", uri, len(data), fp[:12])
    return fp


def _checked_config(raw: object, source: str) -> StudentConfig:
    """The file's `StudentConfig`, refused when a field is outside its bounds. The fingerprint
    cannot vouch for the config: whoever edits it can recompute the fingerprint."""
    if not isinstance(raw, dict):
        raise ModelError(f"{source}: checkpoint `config` is not a dict ({type(raw).__name__})")
    try:
        return StudentConfig.from_dict(raw).validate()
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{source}: refused checkpoint config: {exc}") from exc


def parse_checkpoint(data: bytes, source: str = "<bytes>") -> tuple[StudentNet, str, dict]:
    """Rebuild the model from checkpoint bytes, verifying format and fingerprint."""
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickles with code, truncation, garbage
        raise ModelError(
            f"{source} is not a loadable rdcd checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        got = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ModelError(
            f"{source} is not an rdcd student checkpoint (format {got!r}, expected {FORMAT!r}); "
            "use `sscd` for the teacher"
        )
    config = _checked_config(payload.get("config"), source)
    state = payload.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{source}: `state_dict` is not a dict of tensors")
    fp = fingerprint_of(state, config)
    if fp != payload.get("fingerprint"):
        raise ModelError(
            f"{source}: fingerprint mismatch (stored {str(payload.get('fingerprint'))[:12]}, "
            f"computed {fp[:12]}): the file was modified or corrupted"
        )
    model = StudentNet(config)
    weights = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    for key in OPTIONAL_BUFFERS:  # checkpoints from before the standardisation / whitening
        weights.setdefault(key, model.state_dict()[key])
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise ModelError(f"{source}: weights do not fit {config.backbone}: {exc}") from exc
    return model.eval(), fp, dict(payload.get("meta") or {})


def load_student(
    uri: str,
    device: str | None = None,
    precision: str = "fp32",
    backend: str = "torch",
    threads: int = 0,
) -> Embedder:
    """Load a student checkpoint from a path or URI as a ready `Embedder`. By default the torch
    module in fp32 (what training and tools that need `.module` want); jobs pass `backend="auto"`
    and a compute precision for the onnxruntime backend on CPU (`rdcd.models.runtime`), whose
    files are cached by the fingerprint beside `uri`."""
    try:
        data = rio.read_bytes(uri)
    except rio.StorageError as exc:
        raise ModelError(f"cannot load model {uri!r}: {exc}") from exc
    model, fp, _ = parse_checkpoint(data, uri)
    from rdcd.models.runtime import student_embedder

    return student_embedder(model, fp, uri, device=device, precision=precision, backend=backend,
                            threads=threads)  # fmt: skip
