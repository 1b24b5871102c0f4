"""The distillation job on Ray: Ray Data feeds views (and teacher descriptors), Ray Train runs DDP.

Data flow, all streaming; the driver holds the image listing and a few integers, nothing per step:
  the listing, packed (`rdcd.trainset.ImageTable`, in the object store once)
    -> one block per view task, a range of chunks; chunk c is one batch of positions of
       the epoch-concatenated seeded order (`SampleStream`)
    -> CPU tasks: the chunk's URIs, read concurrently, decoded, two augmented views each
    -> the teacher's descriptor of view 1, by `teacher_placement`:
       "actors":  a Ray Data actor pool (`teacher_cpus`/`teacher_gpus` each), so a CPU-bound
                  ONNX teacher overlaps the student's steps;
       "trainer": inside each DDP worker on its GPU (`teacher_precision`), as the paper runs
                  it: no extra GPUs, 8 workers fit 8 GPUs
    -> `train_loop_per_worker` on `workers` DDP workers (gloo on CPU, nccl on GPU), BatchNorm
       synchronised or shuffled across them (`bn_sync`)
The teacher is resolved once on the driver and named explicitly to every task and worker
(`rdcd.plan.resolve_teacher`), and the run's plan is checked against the cluster first.

Checkpoints go through `ray.train.report` to `<out>/ray/<run>`; starting the same command again
resumes from the latest one, and `FailureConfig` restarts a run whose worker died from its last
checkpoint. The end of a run exports `<out>/student.pt`, a self-describing checkpoint.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import torch

from rdcd import io as rio
from rdcd.distill import (
    RDCD,
    STUDENT_INIT,
    CollapseError,
    CollapseGuard,
    DistillConfig,
    _all_sum,
    bn_sync_mode,
    convert_sync_bn,
    export_student,
    fit_heads,
    list_training_images,
    load_state,
    make_optimizer,
    make_scaler,
    make_views,
    state_bytes,
    train_step,
    warm_batches,
    warm_fill,
)
from rdcd.models.embedder import Embedder
from rdcd.models.teacher import trust_env
from rdcd.trainset import ImageTable, SampleStream, chunk_samples

log = logging.getLogger(__name__)

INIT_STUDENT = "init-student.pt"

STATE_FILE = "state.pt"
COLLAPSED_FILE = "collapsed.json"  # written by the workers when the collapse guard stopped a run
RUN_NAME = "rdcd-distill"
LOCAL_STATE = "local-state.pt"

_READ_POOLS: dict[int, ThreadPoolExecutor] = {}  # per process, by size: one per io_threads


def read_all(uris: Sequence[str], threads: int) -> list[bytes | None]:
    """The bytes of every URI, `threads` reads at a time (an S3 GET is ~10-50 ms of waiting,
    so a task that read its batch one GET after another spent most of its time idle). None
    where a read failed (logged): one unreadable image never stops a task."""
    pool = _READ_POOLS.get(threads)
    if pool is None:
        pool = _READ_POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="rdcd-read")

    def read(uri: str) -> bytes | None:
        try:
            return rio.read_bytes(uri)
        except rio.StorageError as exc:
            log.warning("skipping training image %s: %s", uri, exc)
            return None

    return list(pool.map(read, uris))


def view_batch(batch: dict[str, np.ndarray], config: dict) -> dict[str, np.ndarray]:
    """Ray Data map: rows {uri, index, epoch} -> rows {view1, view2}; undecodable rows dropped.
    The batch's images are read concurrently (`io_threads`), then decoded and augmented."""
    cfg = DistillConfig.from_dict(config)
    uris = [str(u) for u in batch["uri"]]
    v1, v2 = [], []
    for uri, data, index, epoch in zip(uris, read_all(uris, cfg.io_threads), batch["index"],
                                       batch["epoch"], strict=True):  # fmt: skip
        pair = None if data is None else make_views(uri, int(index), int(epoch), cfg, data=data)
        if pair is not None:
            v1.append(pair[0])
            v2.append(pair[1])
    shape = (0, cfg.train_size, cfg.train_size, 3)
    return {
        "view1": np.stack(v1) if v1 else np.zeros(shape, np.uint8),
        "view2": np.stack(v2) if v2 else np.zeros(shape, np.uint8),
    }


_TABLES: dict[str, ImageTable] = {}


def _table(box: list) -> ImageTable:
    """The listing behind an object ref (wrapped in a list so Ray passes the ref itself), read
    once per process: the arrays come out of the object store without a copy."""
    import ray

    ref = box[0]
    key = ref.hex()
    if key not in _TABLES:
        _TABLES.clear()
        _TABLES[key] = ray.get(ref)
    return _TABLES[key]


def sample_blocks(
    batch: dict[str, np.ndarray], table: list, stream: dict
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data map: blocks of chunks {lo, hi} -> the chunks' sample rows {uri, index, epoch},
    yielded one chunk at a time so the views of the first start before the last is listed."""
    s = SampleStream.from_dict(stream)
    for lo, hi in zip(batch["lo"], batch["hi"], strict=True):
        for c in range(int(lo), int(hi)):
            yield chunk_samples(s, c, _table(table))


class TeacherFeatures:
    """Ray Data actor: loads the teacher once, adds its descriptor of view 1 to each batch."""

    def __init__(self, spec: str, teacher_path: str | None, size: int, device: str = "cpu",
                 precision: str = "fp32"):  # fmt: skip
        from rdcd.models import load_model

        self.model = load_model(spec, teacher=teacher_path, teacher_size=size, device=device,
                                precision=precision)  # fmt: skip
        self.seconds, self.images = 0.0, 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t = time.perf_counter()
        if len(batch["view1"]):
            batch["teacher"] = self.model.embed(batch["view1"])
        else:
            batch["teacher"] = np.zeros((0, self.model.dim), np.float32)
        self.seconds += time.perf_counter() - t
        self.images += len(batch["view1"])
        return batch


class TrainerTeacher:
    """The teacher inside a training process (`teacher_placement: trainer`), on its device:
    adds the descriptor of view 1 to a batch and returns the seconds it took (the step's
    teacher share, reported as `teacher_share`)."""

    def __init__(self, cfg: DistillConfig, device: torch.device):
        from rdcd.models import load_model

        self.model = load_model(cfg.teacher, teacher=cfg.teacher_path, device=str(device),
                                precision=cfg.teacher_precision,
                                teacher_size=cfg.train_size)  # fmt: skip

    def __call__(self, batch: dict) -> float:
        t = time.perf_counter()
        batch["teacher"] = self.model.embed(np.asarray(batch["view1"]))  # returns on the host
        return time.perf_counter() - t


def _progress_uri(cfg: DistillConfig) -> str:
    return rio.join(cfg.out, "progress.json")


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: DDP student, queues synchronised by all-gather, checkpoints by report."""
    import ray.train
    import ray.train.torch

    cfg = DistillConfig.from_dict(config["distill"])
    os.environ.update(config.get("aws", {}))  # the driver's S3 settings, for progress.json
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)
    model = RDCD(cfg)
    if bn_sync_mode(cfg, ctx.get_world_size(), device.type) == "sync":
        convert_sync_bn(model)  # before the optimiser and DDP see the modules
    model = model.to(device)
    optimizer = make_optimizer(model, cfg)
    scaler = make_scaler(cfg, device)
    step, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d, open(os.path.join(d, STATE_FILE), "rb") as f:
            step, history = load_state(f.read(), model, optimizer, scaler)
        log.info("worker %d resumed at step %d", rank, step)
    unused = not (cfg.w_con or cfg.w_hn)  # then the d-dim head gets no gradient
    student = ray.train.torch.prepare_model(
        model.student, move_to_device=False,
        parallel_strategy_kwargs={"find_unused_parameters": unused},
    )  # fmt: skip
    teacher = TrainerTeacher(cfg, device) if cfg.teacher_placement == "trainer" else None
    shard = ray.train.get_dataset_shard("train")
    batches = iter(
        shard.iter_batches(batch_size=cfg.batch_size, drop_last=True, prefetch_batches=2)
    )
    warm = warm_batches(cfg) if step == 0 else 0  # the stream starts with `warm` extra batches
    if warm:
        filling = [next(batches) for _ in range(warm)]
        if teacher is not None:
            for b in filling:
                teacher(b)
        log.info("worker %d: warm fill %s", rank, warm_fill(model, filling, device))
    guard = CollapseGuard(cfg.collapse_limit, cfg.collapse_window)
    world = ctx.get_world_size()
    model.train()
    t_last, n_last, t_wait, t_teacher = time.perf_counter(), 0, 0.0, 0.0
    t_fetch = time.perf_counter()
    for batch in batches:
        t_wait += time.perf_counter() - t_fetch
        if teacher is not None:
            t_teacher += teacher(batch)
        metrics = train_step(model, student, optimizer, batch, step, device, scaler)
        step += 1
        # every worker decides on the same number (the mean over workers), so all stop together
        spread = _all_sum(torch.tensor(metrics["offdiag_cos"], device=device)) / world
        metrics.update(offdiag_cos=float(spread), step=step)
        try:
            guard.check(metrics, cfg)
        except CollapseError as exc:
            if rank == 0:
                rio.write_text(rio.join(cfg.out, COLLAPSED_FILE),
                               json.dumps({"step": step, "reason": str(exc)}))  # fmt: skip
            ray.train.report(metrics)
            return  # not an error: a retry from the last checkpoint would collapse again
        n_last += len(batch["view1"]) * ctx.get_world_size()
        is_ckpt = step % cfg.checkpoint_every == 0 or step >= cfg.steps
        if step % cfg.log_every == 0 or is_ckpt:
            now = time.perf_counter()
            metrics.update(step=step, images_per_s=n_last / (now - t_last),
                           data_wait_share=t_wait / (now - t_last))  # fmt: skip
            if teacher is not None:  # the teacher's share of this worker's time
                metrics["teacher_share"] = t_teacher / (now - t_last)
            t_last, n_last, t_wait, t_teacher = now, 0, 0.0, 0.0
            history.append(metrics)
            if is_ckpt and rank == 0:
                with tempfile.TemporaryDirectory() as d:
                    with open(os.path.join(d, STATE_FILE), "wb") as f:
                        f.write(state_bytes(model, optimizer, step, history, scaler))
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
                rio.write_text(_progress_uri(cfg), json.dumps({"step": step}))
            else:
                ray.train.report(metrics)
        if step >= cfg.steps:
            break
        t_fetch = time.perf_counter()


def _resume_step(cfg: DistillConfig) -> int:
    try:
        return int(json.loads(rio.read_text(_progress_uri(cfg)))["step"])
    except (rio.StorageError, KeyError, ValueError):
        return 0


def _remote_args(cfg: DistillConfig) -> dict:
    """Tasks and actors read S3 (images, a teacher file) with the driver's AWS settings."""
    aws = _aws_env()
    return {"runtime_env": {"env_vars": aws}} if aws else {}


def sample_dataset(cfg: DistillConfig, table: ImageTable, stream: SampleStream):
    """The rows {uri, index, epoch} of `stream` as a Ray dataset, computed by the tasks: the
    driver puts the listing in the object store once and makes one tiny block per view task
    (a range of chunks, at most `max_data_blocks`), whatever the number of steps."""
    import ray
    import ray.data

    ref = ray.put(table)
    ranges = stream.block_ranges(cfg.global_batch, cfg.max_data_blocks)
    ds = ray.data.from_items([{"lo": lo, "hi": hi} for lo, hi in ranges],
                             override_num_blocks=len(ranges))  # fmt: skip
    # The same remote args as the view map, so Ray Data fuses both into one task per block (a
    # read task of its own would ask for a whole CPU, which a packed cluster may never free).
    return ds.map_batches(sample_blocks, fn_kwargs={"table": [ref], "stream": stream.to_dict()},
                          batch_size=1, num_cpus=cfg.view_cpus, **_remote_args(cfg))  # fmt: skip


def build_dataset(cfg: DistillConfig, uris: Sequence[str], start_step: int):
    """The streaming training dataset from `start_step` on: enough epochs to cover every step
    (and a warm fill of the queues at step 0), views made by CPU tasks, the teacher's
    descriptors added by an actor pool unless the teacher runs in the trainers."""
    import ray.data

    table = uris if isinstance(uris, ImageTable) else ImageTable.from_uris(uris)
    warm = warm_batches(cfg) if start_step == 0 else 0
    stream = SampleStream.for_run(cfg, len(table), start_step, extra_steps=warm)
    env = _remote_args(cfg)
    ds = sample_dataset(cfg, table, stream)
    ds = ds.map_batches(view_batch, fn_kwargs={"config": cfg.to_dict()}, batch_size=cfg.batch_size,
                        num_cpus=cfg.view_cpus, **env)  # fmt: skip
    if cfg.teacher_placement == "trainer":
        return ds
    return ds.map_batches(
        TeacherFeatures,
        fn_constructor_kwargs={"spec": cfg.teacher, "teacher_path": cfg.teacher_path,
                               "size": cfg.train_size,
                               "device": "cuda" if cfg.teacher_gpus > 0 else "cpu",
                               "precision": cfg.teacher_precision},
        batch_size=cfg.batch_size, num_cpus=cfg.teacher_cpus,
        compute=ray.data.ActorPoolStrategy(size=cfg.teacher_actors),
        num_gpus=cfg.teacher_gpus, **env,
    )  # fmt: skip


def _aws_env() -> dict[str, str]:
    """The driver's S3 settings, and its TorchScript opt-in, for tasks, actors and workers."""
    return {k: os.environ[k] for k in rio.AWS_ENV if os.environ.get(k)} | trust_env()


def fitted_start(
    cfg: DistillConfig, uris: Sequence[str], teacher: Embedder | None = None
) -> DistillConfig:
    """With `fit_heads`, fit the student's heads once (`<out>/init-student.pt`) and return a
    config that starts every worker from it; a resumed or re-run job reuses the same file."""
    if not cfg.fit_heads:
        return cfg
    uri = rio.join(cfg.out, INIT_STUDENT)
    if not rio.is_s3(uri):
        uri = os.path.abspath(uri)  # Ray workers may run in another directory
    if cfg.init == STUDENT_INIT + uri:
        return cfg
    if not rio.exists(uri):
        from rdcd.models import load_model
        from rdcd.models.checkpoint import save_checkpoint

        teacher = teacher or load_model(
            cfg.teacher, teacher=cfg.teacher_path, teacher_size=cfg.train_size
        )
        save_checkpoint(fit_heads(cfg, uris, teacher), uri)
    return replace(cfg, init=STUDENT_INIT + uri)


def prepare(cfg: DistillConfig) -> tuple[DistillConfig, ImageTable]:
    """What every run does first, on the driver: validate, resolve the teacher to one file
    (refusing an int8 CPU teacher in a GPU run unless forced) and read the listing."""
    from rdcd.plan import PlanError, resolve_teacher, teacher_problems

    cfg.validate()
    cfg, info = resolve_teacher(cfg)
    problems = teacher_problems(cfg, info)
    if problems:
        raise PlanError(problems[0])
    log.info("teacher %s -> %s (from %s, %s)", info.spec, info.uri, info.origin, info.kind)
    return cfg, list_training_images(cfg)


def check_cluster(cfg: DistillConfig, n_images: int, start_step: int) -> None:
    """Refuse a plan the connected cluster cannot hold (`check_resources`), with the reasons,
    instead of letting Ray wait forever for resources that will not come."""
    from rdcd.plan import ClusterSpec, PlanError, make_plan, resolve_teacher

    if not cfg.check_resources:
        return
    _, info = resolve_teacher(cfg)
    plan = make_plan(cfg, info, n_images, ClusterSpec.from_ray(), start_step=start_step)
    if plan.problems:
        raise PlanError(
            "the run does not fit this Ray cluster: "
            + "; ".join(plan.problems)
            + " (an autoscaling cluster that grows on demand: --set check_resources=false)"
        )


def run_training(cfg: DistillConfig) -> dict:
    """Run (or resume) distillation on the current Ray cluster; returns the run summary."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg, uris = prepare(cfg)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
    start = _resume_step(cfg)
    if start >= cfg.steps > 0:
        log.info("run already finished at step %d; exporting again", start)
    check_cluster(cfg, len(uris), min(start, max(0, cfg.steps - 1)))
    t0 = time.perf_counter()
    cfg = fitted_start(cfg, uris)
    storage = rio.join(cfg.out, "ray")
    fs, storage_path = rio.arrow_filesystem(storage) if rio.is_s3(storage) else (None, None)
    if not rio.is_s3(storage):
        storage_path = os.path.abspath(storage)
        os.makedirs(storage_path, exist_ok=True)
    if cfg.steps == 0:
        return finish(cfg, None, time.perf_counter() - t0, 0, len(uris))
    collapsed = rio.join(cfg.out, COLLAPSED_FILE)
    if rio.exists(collapsed):  # a previous attempt's verdict; this one decides anew
        fs_c, path_c = rio.filesystem(collapsed)
        fs_c.rm(path_c)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"distill": cfg.to_dict(), "aws": _aws_env()},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=RUN_NAME, storage_path=storage_path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": build_dataset(cfg, uris, min(start, cfg.steps - 1))},
    )  # fmt: skip
    result = trainer.fit()
    seconds = time.perf_counter() - t0
    if rio.exists(collapsed):
        raise CollapseError(json.loads(rio.read_text(collapsed))["reason"])
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as d, open(os.path.join(d, STATE_FILE), "rb") as f:
        data = f.read()
    return finish(cfg, data, seconds, start, len(uris))


def finish(
    cfg: DistillConfig, state: bytes | None, seconds: float, start: int, n_images: int
) -> dict:
    """Export the student of a final training state and write `run.json` beside it."""
    if state is None:  # steps 0: the closed-form (fit_heads) student is the result
        model, step, history = RDCD(cfg), 0, []
    else:
        model = RDCD(replace(cfg, init="random"))
        step, history = load_state(state, model, make_optimizer(model, cfg))
    meta = {"steps": step, "teacher": cfg.teacher, "images": cfg.images, "dim": cfg.dim}
    fp = export_student(model, rio.join(cfg.out, "student.pt"), meta=meta)
    summary = {
        "student": rio.join(cfg.out, "student.pt"),
        "fingerprint": fp,
        "steps": step,
        "resumed_from": start,
        "images": n_images,
        "seconds": round(seconds, 2),
        "final": history[-1] if history else {},
        "history": history,
        "config": cfg.to_dict(),
    }
    rio.write_text(rio.join(cfg.out, "run.json"), json.dumps(summary, indent=2))
    return summary


def run_local(cfg: DistillConfig, device: str | None = None) -> dict:
    """The same training in one process, without Ray (e.g. on a lone GPU machine): threads make
    the views, the teacher embeds the next batch while the student trains; resumable."""
    from rdcd.distill import local_batches, train
    from rdcd.models import load_model

    cfg, uris = prepare(cfg)
    dev = torch.device(device) if device else None
    t_dev = str(dev) if dev else ("cuda" if torch.cuda.is_available() else "cpu")
    teacher = load_model(cfg.teacher, teacher=cfg.teacher_path, teacher_size=cfg.train_size,
                         device=t_dev, precision=cfg.teacher_precision)  # fmt: skip
    t0 = time.perf_counter()
    cfg = fitted_start(cfg, uris, teacher)
    state_uri = rio.join(cfg.out, LOCAL_STATE)
    resume = rio.read_bytes(state_uri) if rio.exists(state_uri) else None
    start = 0
    if resume is not None:
        start = int(torch.load(io.BytesIO(resume), map_location="cpu", weights_only=True)["step"])
    last: dict = {"state": resume}

    def keep(state: bytes, step: int) -> None:
        rio.write_bytes(state_uri, state)
        last["state"] = state

    if start < cfg.steps:
        train(
            cfg,
            lambda s: local_batches(cfg, uris, teacher, s),
            device=dev,
            resume=resume,
            on_log=lambda m: log.info(
                "step %s: loss %.4f, in-batch cosine %.3f (collapse limit %s), %s",
                m["step"],
                m["loss"],
                m["offdiag_cos"],
                cfg.collapse_limit,
                m,
            ),
            on_checkpoint=keep,
        )
    return finish(cfg, last["state"], time.perf_counter() - t0, start, len(uris))
