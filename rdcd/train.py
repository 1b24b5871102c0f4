"""The distillation job on Ray: Ray Data feeds views and teacher descriptors, Ray Train runs DDP.

Data flow, all streaming:
  image URIs x epochs (driver, seeded order)
    -> CPU tasks: read, decode, two augmented views            (`view_cpus` each)
    -> teacher actors: SSCD descriptor of view 1                (`teacher_cpus` each, GPU-free)
    -> `train_loop_per_worker` on `workers` DDP workers          (gloo on CPU, nccl on GPU)
The teacher runs in its own actors, so a CPU-bound ONNX teacher overlaps with the student's
steps instead of stalling them; its share of time is in the job's metrics.

Checkpoints go through `ray.train.report` to `<out>/ray/<run>`; starting the same command again
resumes from the latest one, and `FailureConfig` restarts a run whose worker died from its last
checkpoint. The end of a run exports `<out>/student.pt`, a self-describing checkpoint.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch

from rdcd import io as rio
from rdcd.distill import (
    RDCD,
    STUDENT_INIT,
    DistillConfig,
    epoch_order,
    export_student,
    fit_heads,
    list_training_images,
    load_state,
    make_optimizer,
    make_views,
    state_bytes,
    train_step,
)
from rdcd.models.embedder import Embedder
from rdcd.models.teacher import trust_env

log = logging.getLogger(__name__)

INIT_STUDENT = "init-student.pt"

STATE_FILE = "state.pt"
RUN_NAME = "rdcd-distill"
LOCAL_STATE = "local-state.pt"


def view_batch(batch: dict[str, np.ndarray], config: dict) -> dict[str, np.ndarray]:
    """Ray Data map: rows {uri, index, epoch} -> rows {view1, view2}; undecodable rows dropped."""
    cfg = DistillConfig.from_dict(config)
    v1, v2 = [], []
    for uri, index, epoch in zip(batch["uri"], batch["index"], batch["epoch"], strict=True):
        pair = make_views(str(uri), int(index), int(epoch), cfg)
        if pair is not None:
            v1.append(pair[0])
            v2.append(pair[1])
    shape = (0, cfg.train_size, cfg.train_size, 3)
    return {
        "view1": np.stack(v1) if v1 else np.zeros(shape, np.uint8),
        "view2": np.stack(v2) if v2 else np.zeros(shape, np.uint8),
    }


class TeacherFeatures:
    """Ray Data actor: loads the teacher once, adds its descriptor of view 1 to each batch."""

    def __init__(self, spec: str, teacher_path: str | None, size: int, device: str = "cpu"):
        from rdcd.models import load_model

        self.model = load_model(spec, teacher=teacher_path, teacher_size=size, device=device)
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
    model = RDCD(cfg).to(device)
    optimizer = make_optimizer(model, cfg)
    step, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d, open(os.path.join(d, STATE_FILE), "rb") as f:
            step, history = load_state(f.read(), model, optimizer)
        log.info("worker %d resumed at step %d", rank, step)
    unused = not (cfg.w_con or cfg.w_hn)  # then the d-dim head gets no gradient
    student = ray.train.torch.prepare_model(
        model.student, move_to_device=False,
        parallel_strategy_kwargs={"find_unused_parameters": unused},
    )  # fmt: skip
    scaler = torch.amp.GradScaler("cuda") if cfg.amp and device.type == "cuda" else None
    shard = ray.train.get_dataset_shard("train")
    model.train()
    t_last, n_last, t_wait = time.perf_counter(), 0, 0.0
    t_fetch = time.perf_counter()
    for batch in shard.iter_batches(batch_size=cfg.batch_size, drop_last=True, prefetch_batches=2):
        t_wait += time.perf_counter() - t_fetch
        metrics = train_step(model, student, optimizer, batch, step, device, scaler)
        step += 1
        n_last += len(batch["view1"]) * ctx.get_world_size()
        is_ckpt = step % cfg.checkpoint_every == 0 or step >= cfg.steps
        if step % cfg.log_every == 0 or is_ckpt:
            now = time.perf_counter()
            metrics.update(step=step, images_per_s=n_last / (now - t_last),
                           data_wait_share=t_wait / (now - t_last))  # fmt: skip
            t_last, n_last, t_wait = now, 0, 0.0
            history.append(metrics)
            if is_ckpt and rank == 0:
                with tempfile.TemporaryDirectory() as d:
                    with open(os.path.join(d, STATE_FILE), "wb") as f:
                        f.write(state_bytes(model, optimizer, step, history))
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


def build_dataset(cfg: DistillConfig, uris: list[str], start_step: int):
    """The streaming training dataset from `start_step` on: enough epochs to cover every step."""
    import ray.data

    needed = (cfg.steps - start_step) * cfg.global_batch
    first = start_step * cfg.global_batch
    epochs = math.ceil((first + needed) / len(uris)) + 1
    items = []
    for epoch in range(first // len(uris), epochs):
        for i in epoch_order(len(uris), cfg.seed, epoch):
            items.append({"uri": uris[i], "index": i, "epoch": epoch})
    items = items[first % len(uris) :][: needed + len(uris)]
    ds = ray.data.from_items(
        items, override_num_blocks=max(1, len(items) // (cfg.global_batch * 2))
    )
    # Tasks and actors read S3 (images, a teacher file) with the driver's AWS settings.
    aws = _aws_env()
    env = {"runtime_env": {"env_vars": aws}} if aws else {}
    ds = ds.map_batches(view_batch, fn_kwargs={"config": cfg.to_dict()}, batch_size=cfg.batch_size,
                        num_cpus=cfg.view_cpus, **env)  # fmt: skip
    return ds.map_batches(
        TeacherFeatures,
        fn_constructor_kwargs={"spec": cfg.teacher, "teacher_path": cfg.teacher_path,
                               "size": cfg.train_size,
                               "device": "cuda" if cfg.teacher_gpus > 0 else "cpu"},
        batch_size=cfg.batch_size, num_cpus=cfg.teacher_cpus,
        compute=ray.data.ActorPoolStrategy(size=cfg.teacher_actors),
        num_gpus=cfg.teacher_gpus, **env,
    )  # fmt: skip


def _aws_env() -> dict[str, str]:
    """The driver's S3 settings, and its TorchScript opt-in, for tasks, actors and workers."""
    return {k: os.environ[k] for k in rio.AWS_ENV if os.environ.get(k)} | trust_env()


def fitted_start(
    cfg: DistillConfig, uris: list[str], teacher: Embedder | None = None
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


def run_training(cfg: DistillConfig) -> dict:
    """Run (or resume) distillation on the current Ray cluster; returns the run summary."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg.validate()
    uris = list_training_images(cfg)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
    start = _resume_step(cfg)
    if start >= cfg.steps > 0:
        log.info("run already finished at step %d; exporting again", start)
    t0 = time.perf_counter()
    cfg = fitted_start(cfg, uris)
    storage = rio.join(cfg.out, "ray")
    fs, storage_path = rio.arrow_filesystem(storage) if rio.is_s3(storage) else (None, None)
    if not rio.is_s3(storage):
        storage_path = os.path.abspath(storage)
        os.makedirs(storage_path, exist_ok=True)
    if cfg.steps == 0:
        return finish(cfg, None, time.perf_counter() - t0, 0, len(uris))
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

    cfg.validate()
    uris = list_training_images(cfg)
    teacher = load_model(cfg.teacher, teacher=cfg.teacher_path, teacher_size=cfg.train_size)
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
            device=torch.device(device) if device else None,
            resume=resume,
            on_log=lambda m: log.info("step %s: %s", m["step"], m),
            on_checkpoint=keep,
        )
    return finish(cfg, last["state"], time.perf_counter() - t0, start, len(uris))
