"""A student's whole forward pass as an ONNX graph, in fp32 or static int8, for onnxruntime.

The graph takes what every rdcd embedder takes, uint8 (N, S, S, 3) RGB, and does the rest itself:
NHWC to NCHW, mean/std, backbone, GeM, both heads and the L2 norm, so a job hands it decoded pixels
and gets descriptors back with no torch on the path. Only rdcd's own students are exported; the
teacher file is never exported, converted or touched.

fp32: the legacy TorchScript exporter (`dynamo=False`: the dynamo exporter needs `onnxscript`,
which rdcd does not depend on), opset 17, a dynamic batch and a fixed image size. Every export is
checked against torch on seeded inputs (cosine >= `EXPORT_MIN_COSINE`): an exporter that got a
backbone wrong is refused, and the student runs in torch.

int8: onnxruntime's static quantisation in the QDQ format, weights int8 per output channel,
activations uint8 with MinMax ranges from calibration photos (`rdcd.models.calibration`); the
first convolution stays fp32, since its input (normalised pixels) is where 8 bits lose the most
(on the default student: mean cosine to fp32 0.983 -> 0.990, worst image 0.939 -> 0.973, for ~5%
of the speed). The result must agree with fp32 on held-out photos (`INT8_MIN_MEAN_COSINE`,
`INT8_MIN_COSINE`) or it is refused: that check is what lets an int8 model keep the checkpoint's
fingerprint (see `rdcd.models.runtime`).
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rdcd.models.cache import Refused
from rdcd.models.calibration import CalibrationSet, load_pixels
from rdcd.models.student import StudentNet

log = logging.getLogger(__name__)

OPSET = 17
INPUT, OUTPUT = "pixels", "descriptor"
EXPORT_MIN_COSINE = 0.9999
INT8_MIN_MEAN_COSINE = 0.98
INT8_MIN_COSINE = 0.90
CALIBRATION_BATCH = 16


class ExportError(RuntimeError):
    """The student could not be exported faithfully (the exporter failed or disagrees)."""


class DeployedStudent(nn.Module):
    """uint8 NHWC pixels -> the student's L2-normalised descriptor: the graph that is exported."""

    def __init__(self, student: StudentNet):
        super().__init__()
        self.student = student
        cfg = student.config
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1) * 255.0)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).float()
        return self.student((x - self.mean) / self.std)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, d) arrays."""
    na = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(na, 1e-12)


def agreement(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    c = cosines(reference, other)
    return {
        "mean_cosine": round(float(c.mean()), 6),
        "min_cosine": round(float(c.min()), 6),
        "p05_cosine": round(float(np.percentile(c, 5)), 6),
    }


def probe_pixels(size: int, n: int = 6, seed: int = 0) -> np.ndarray:
    """Seeded test inputs for the export check: noise, flat grey and smooth gradients, which
    between them reach every layer's ordinary range."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (max(1, n - 2), size, size, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    grad = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)),
                     np.tile(ramp[:, None], (1, size))], axis=-1).astype(np.uint8)  # fmt: skip
    flat = np.full((size, size, 3), 128, np.uint8)
    return np.concatenate([noise, grad[None], flat[None]])


def _run(path: Path, pixels: np.ndarray, threads: int = 0) -> np.ndarray:
    from rdcd.models.runtime import make_session

    session = make_session(path, threads)
    return np.asarray(session.run([OUTPUT], {INPUT: pixels})[0], np.float32)


def export_fp32(student: StudentNet, path: Path) -> dict[str, Any]:
    """Write `student` as an fp32 ONNX graph at `path`; returns what the cache records. Raises
    `ExportError` when the exporter fails or its graph disagrees with torch."""
    size = student.config.image_size
    module = DeployedStudent(student.float().cpu().eval()).eval()
    dummy = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # legacy-exporter deprecation and tracer notes
            torch.onnx.export(module, (dummy,), str(path), dynamo=False, opset_version=OPSET,
                              input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                              do_constant_folding=True)  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - any exporter failure means: run in torch
        raise ExportError(f"ONNX export of {student.config.backbone} failed: {exc}") from exc
    seconds = time.perf_counter() - t0
    probe = probe_pixels(size)
    with torch.inference_mode():
        want = module(torch.from_numpy(probe)).numpy()
    try:
        got = _run(path, probe)
    except Exception as exc:  # noqa: BLE001 - onnxruntime refusing the graph
        raise ExportError(f"onnxruntime cannot run the exported graph: {exc}") from exc
    check = agreement(want, got)
    if check["min_cosine"] < EXPORT_MIN_COSINE:
        raise ExportError(
            f"the exported graph disagrees with torch (min cosine {check['min_cosine']:.6f} < "
            f"{EXPORT_MIN_COSINE})"
        )
    import onnx

    return {
        "precision": "fp32",
        "opset": OPSET,
        "image_size": size,
        "export_seconds": round(seconds, 2),
        "check_vs_torch": check,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__},
    }


def _reduce_range() -> bool:
    """x86 CPUs without VNNI can saturate u8 x s8 products, and onnxruntime then wants 7-bit
    weights (`reduce_range`); VNNI/AMX CPUs and ARM do not."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # unknown x86: the safe choice
    return not any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _first_conv(model: Any) -> list[str]:
    for node in model.graph.node:  # ONNX nodes are stored in topological order
        if node.op_type in ("Conv", "MatMul", "Gemm"):
            return [node.name]
    return []


def quantize_int8(
    fp32_path: Path, path: Path, calibration: CalibrationSet, image_size: int
) -> dict[str, Any]:
    """Static int8 (QDQ) of the fp32 graph at `fp32_path`, calibrated on `calibration.calibrate`,
    written at `path`. Raises `Refused` when it disagrees with fp32 on `calibration.check`."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    t0 = time.perf_counter()
    calib = load_pixels(calibration.calibrate, image_size)
    check = load_pixels(calibration.check, image_size)
    if len(calib) < 8 or len(check) < 4:
        raise ExportError(f"too few decodable calibration images ({len(calib)} + {len(check)})")
    t_decode = time.perf_counter() - t0

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(range(0, len(calib), CALIBRATION_BATCH))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self._it, None)
            if start is None:
                return None
            return {INPUT: calib[start : start + CALIBRATION_BATCH]}

    reduce_range = _reduce_range()
    with tempfile.TemporaryDirectory(prefix="rdcd-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        excluded = _first_conv(onnx.load(str(pre)))
        t1 = time.perf_counter()
        quantize_static(str(pre), str(path), Batches(), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=reduce_range,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_exclude=excluded)  # fmt: skip
        t_quant = time.perf_counter() - t1
    agree = agreement(_run(fp32_path, check), _run(path, check))
    details = {
        "precision": "int8",
        "calibration": calibration.describe(),
        "calibrated_on": len(calib),
        "agreement_vs_fp32": {**agree, "images": len(check)},
        "scheme": {
            "format": "QDQ",
            "weights": "int8 per-channel",
            "activations": "uint8 MinMax",
            "reduce_range": reduce_range,
            "fp32_nodes": excluded,
        },
        "seconds": {"decode": round(t_decode, 2), "calibrate_and_quantise": round(t_quant, 2)},
        "versions": {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }
    if agree["mean_cosine"] < INT8_MIN_MEAN_COSINE or agree["min_cosine"] < INT8_MIN_COSINE:
        raise Refused(
            f"int8 disagrees with fp32 on {len(check)} held-out photos (mean cosine "
            f"{agree['mean_cosine']:.4f}, min {agree['min_cosine']:.4f}; needs >= "
            f"{INT8_MIN_MEAN_COSINE} and >= {INT8_MIN_COSINE})",
            details,
        )
    return details
