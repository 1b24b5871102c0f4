"""How a student runs: the compute precision a job asks for, resolved for the device it runs on,
and the onnxruntime backend that runs exported students on CPU.

In PyTorch eager fp32 a student was slower on CPU than the int8 ONNX teacher; exported to ONNX it
runs 3.8x faster than eager, in static int8 7.7x (4.2x the teacher; the default student at 288 px
on 2 cores, benchmarks/embed_throughput.py). So on CPU a student runs in onnxruntime by default:

    --precision   CPU (students)                        GPU (students)
    auto          CPU_DEFAULT (int8), onnxruntime       fp16, torch channels-last
    fp32          fp32, onnxruntime                     fp32, torch
    fp16 / bf16   fp32, onnxruntime (no CPU half path)  torch autocast fp16 / bf16
    int8          int8, onnxruntime                     refused: a CPU precision

Teachers run as their file is: the ONNX teacher as given, a torch teacher in fp32 or (on a GPU)
fp16/bf16; int8 is refused for torch teachers, since rdcd never converts the teacher.

Fallbacks, each logged: an export that fails or disagrees with torch -> torch fp32; int8 without
calibration photos, or refused by its agreement check -> onnxruntime fp32. `describe()` always says
what actually runs (`backend`, `precision`).

Fingerprints: compute precision is not model identity. fp32, fp16 and int8 descriptors of one
checkpoint carry the checkpoint's fingerprint, so an index built in one precision answers queries
embedded in another (as fp16 storage already did). What makes that safe is that nothing unchecked
gets the fingerprint: the ONNX files are derived from the checkpoint itself and bound to its
fingerprint by their cache record (`rdcd.models.cache`); an export must match torch to cosine
0.9999, and an int8 model must agree with fp32 on held-out photos (`rdcd.models.export`) or it is
not used. Cross-precision retrieval is measured in benchmarks/distill_quality.py.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from rdcd.models.embedder import Embedder, ModelError, TorchEmbedder, l2_normalize

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")
BACKENDS = ("auto", "torch", "onnx")
# The fastest precision that loses at most 0.005 µAP on the hard held-out set (the default
# student, benchmarks/distill_quality.py --precisions torch-fp32,fp32,int8): int8 loses 0.0047
# µAP and 0.0005 µAP-sn against fp32, at 2x onnxruntime fp32's images/s.
CPU_DEFAULT = "int8"
GPU_DEFAULT = "fp16"
GPU_ONLY = ("fp16", "bf16")
# Settings a job's workers need to find or build the same cache: forwarded to Ray workers.
ENV_VARS = ("RDCD_CACHE_DIR", "RDCD_CALIBRATION", "RDCD_SHARED_DATA")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision


def resolve(precision: str, backend: str, device: str) -> tuple[str, str]:
    """(backend, precision) that a student runs with for `precision` on `device` (`cpu` or
    `cuda`), by the table of the module docstring; `backend="torch"` keeps it in torch."""
    check_precision(precision)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    gpu = device.startswith("cuda")
    if precision == "auto":
        precision = GPU_DEFAULT if gpu else (CPU_DEFAULT if backend != "torch" else "fp32")
    if precision == "int8":
        if backend == "torch":
            raise ModelError("int8 runs in onnxruntime: it needs backend onnx or auto, not torch")
        if gpu and backend == "auto":
            raise ModelError("int8 is a CPU precision (onnxruntime); on a GPU use fp16 or bf16")
        return "onnx", "int8"
    if backend == "torch" or (backend == "auto" and gpu):
        return "torch", precision
    if precision in GPU_ONLY:
        log.info("%s is a GPU precision; on CPU the student runs in fp32 (onnxruntime)", precision)
    return "onnx", "fp32"


def default_threads() -> int:
    """This process's CPU share: torch's thread count, which follows `torch.set_num_threads`
    and the OMP_NUM_THREADS that Ray sets to a task's or actor's CPUs."""
    import torch

    return max(1, torch.get_num_threads())


def make_session(path: str | Path, threads: int = 0) -> Any:
    """An onnxruntime CPU session of the model at `path` with `threads` intra-op threads
    (0: `default_threads()`), sequential execution and no idle spinning: in a job the decode
    tasks share the cores, and threads spinning between batches take their time."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


class OnnxStudent(Embedder):
    """A student exported to ONNX (fp32 or int8) run by onnxruntime: uint8 NHWC in, unit
    vectors out. `module` is the torch student it was exported from, for its config."""

    backend = "onnxruntime"

    def __init__(
        self,
        path: Path,
        module: Any,
        *,
        name: str,
        fingerprint: str,
        precision: str,
        threads: int = 0,
        record: dict[str, Any] | None = None,
    ):
        cfg = module.config
        self.name, self.dim, self.image_size = name, cfg.dim, cfg.image_size
        self.fingerprint, self.precision, self.module = fingerprint, precision, module
        self.path, self.record = path, dict(record or {})
        self.threads = threads or default_threads()
        try:
            self.session = make_session(path, self.threads)
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"{path}: onnxruntime cannot load it ({exc})") from exc
        from rdcd.models.export import INPUT, OUTPUT

        self._input, self._output = INPUT, OUTPUT

    def embed(self, images: np.ndarray) -> np.ndarray:
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"expected uint8 (N, {self.image_size}, {self.image_size}, 3), got {images.shape}"
            )
        x = np.ascontiguousarray(images, dtype=np.uint8)
        out = self.session.run([self._output], {self._input: x})[0]
        return l2_normalize(np.asarray(out, np.float32))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "threads": self.threads}


def _int8_file(cache: Any, module: Any) -> tuple[Path | None, dict[str, Any]]:
    """The cached int8 graph of `module`, built (from the cached fp32 one) when missing;
    (None, record) when the build was refused. Raises `ExportError` without calibration photos."""
    from rdcd.models import export
    from rdcd.models.calibration import CALIBRATION_ENV, find_calibration_set

    existing = cache.record("int8")
    if existing is not None:  # built before: no calibration photos needed
        return (None if existing.get("status") == "refused" else cache.file("int8")), existing
    calibration = find_calibration_set()
    if calibration is None:
        raise export.ExportError(
            f"int8 needs a few hundred training-like photos to calibrate on: set "
            f"{CALIBRATION_ENV} to a folder or manifest of them (never evaluation images)"
        )
    fp32, _ = cache.get_or_build("fp32", lambda tmp: export.export_fp32(module, tmp))
    size = module.config.image_size
    return cache.get_or_build(
        "int8", lambda tmp: export.quantize_int8(fp32, tmp, calibration, size)
    )


def onnx_student(
    module: Any, fingerprint: str, source: str | None, precision: str, threads: int = 0
) -> Embedder | None:
    """The onnxruntime embedder of `module` in `precision` (`fp32` or `int8`), from the cache of
    `fingerprint` beside `source`; int8 falls back to fp32 when it cannot be had, and None
    (the caller runs torch) when the student does not export."""
    from rdcd.models import export
    from rdcd.models.cache import cache_for

    name = f"student:{module.config.backbone}/{module.config.dim}"
    cache = cache_for(source, fingerprint)
    found: tuple[Path | None, dict[str, Any]] = (None, {})
    if precision == "int8":
        try:
            found = _int8_file(cache, module)
        except export.ExportError as exc:
            log.warning("%s: %s; running fp32 (onnxruntime)", name, exc)
        else:
            if found[0] is None:
                log.warning("%s: int8 model refused (%s); running fp32 (onnxruntime)", name,
                            found[1].get("reason"))  # fmt: skip
    path, record = found
    if path is None:
        try:
            path, record = cache.get_or_build("fp32", lambda t: export.export_fp32(module, t))
        except export.ExportError as exc:
            log.warning("%s: %s; the student runs in torch fp32", name, exc)
            return None
    assert path is not None
    return OnnxStudent(path, module, name=name, fingerprint=fingerprint,
                       precision=record.get("precision", "fp32"), threads=threads,
                       record=record)  # fmt: skip


def student_embedder(
    module: Any,
    fingerprint: str,
    source: str | None,
    *,
    device: str | None = None,
    precision: str = "fp32",
    backend: str = "torch",
    threads: int = 0,
) -> Embedder:
    """The embedder of a loaded student (`module`, a `StudentNet`) for the requested precision
    and backend on `device` (None: the GPU when there is one)."""
    import torch

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kind, prec = resolve(precision, backend, dev)
    cfg = module.config
    if kind == "onnx":
        embedder = onnx_student(module, fingerprint, source, prec, threads)
        if embedder is not None:
            return embedder
        prec = "fp32"
    return TorchEmbedder(module, name=f"student:{cfg.backbone}/{cfg.dim}", dim=cfg.dim,
                         image_size=cfg.image_size, fingerprint=fingerprint, mean=cfg.mean,
                         std=cfg.std, device=dev, precision=prec)  # fmt: skip


def runtime_env_vars() -> dict[str, str]:
    """The cache and calibration settings of this process, for the Ray workers it starts."""
    return {k: os.environ[k] for k in ENV_VARS if os.environ.get(k)}
