"""Distillation across DDP workers and in mixed precision: the queues every replica holds stay
identical, shuffle-BN hands each worker its own keys back, the GradScaler state is part of the
training state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rdcd.distill import RDCD, DistillConfig, load_state, make_optimizer, state_bytes

WORLD = 2


def _tiny(**kw) -> DistillConfig:
    """tests/conftest.py's tiny student (MobileNetV3-small-050 at 64 px), two workers."""
    base = {"backbone": "mobilenetv3_small_050", "dim": 32, "train_size": 64, "eval_size": 64,
            "batch_size": 4, "workers": WORLD, "steps": 3, "queue_size": 16, "memory_size": 16,
            "warmup_steps": 1, "lr": 0.01}  # fmt: skip
    return DistillConfig(**(base | kw))


def _batch(seed: int, n: int = 4, size: int = 64) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "view1": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        "view2": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        "teacher": rng.normal(size=(n, 512)).astype(np.float32),
    }


def _worker(rank: int, store: str, bn_sync: str, out: str) -> None:
    """One DDP rank (gloo): 3 training steps on its own batches, then its state to `out`."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from rdcd.distill import shuffled_apply, train_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        cfg = _tiny(bn_sync=bn_sync)
        torch.manual_seed(cfg.seed)  # as train_loop_per_worker: identical replicas
        model = RDCD(cfg)
        student = DistributedDataParallel(model.student)
        optimizer = make_optimizer(model, cfg)
        model.train()
        for step in range(cfg.steps):
            train_step(model, student, optimizer, _batch(100 * rank + step), step,
                       torch.device("cpu"))  # fmt: skip
        x = torch.arange(8.0).view(4, 2) + 100 * rank
        result = {
            "queue": model.queue.items.clone(),
            "queue_ptr": model.queue.ptr.clone(),
            "memory": model.memory.items.clone(),
            "momentum": {k: v.clone() for k, v in model.momentum_student.state_dict().items()},
            "x": x,
            "rowwise": shuffled_apply(lambda t: t * 2 + 1, x, cfg.seed, 7),
            "centred": shuffled_apply(lambda t: t - t.mean(0), x, cfg.seed, 7),
        }
        torch.save(result, out.format(rank=rank))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("bn_sync", ["off", "shuffle"])
def test_ddp_ranks_keep_identical_queues(tmp_path, bn_sync):
    """Two gloo ranks train on different batches; after 3 steps of `train_step` their key queue,
    teacher memory and momentum student are identical (keys and teacher descriptors are
    all-gathered; with shuffle-BN the keys come back unshuffled)."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "rank{rank}.pt")
    mp.spawn(_worker, args=(str(tmp_path / "store"), bn_sync, out), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(out.format(rank=r), weights_only=True) for r in range(WORLD))
    assert int(r0["queue_ptr"]) == int(r1["queue_ptr"]) == (3 * 4 * WORLD) % 16
    assert torch.equal(r0["queue"], r1["queue"])
    assert torch.equal(r0["memory"], r1["memory"])
    # Its weights too. Its BatchNorm running statistics are each rank's own (copied from the
    # student after a local forward; DDP re-broadcasts rank 0's before the next): unused in
    # training mode, where keys use batch statistics, and resumes load rank 0's.
    weights = [k for k in r0["momentum"] if not k.endswith(("running_mean", "running_var"))]
    assert len(weights) > 100
    assert all(torch.equal(r0["momentum"][k], r1["momentum"][k]) for k in weights)
    fresh = RDCD(_tiny())
    assert not torch.equal(r0["queue"], fresh.queue.items)  # real keys went in
    for r in (r0, r1):  # a row-wise function comes back to its own row, in order
        assert torch.equal(r["rowwise"], r["x"] * 2 + 1)
    # a batch-dependent one sees the cross-worker mix, not the worker's own batch
    assert any(not torch.allclose(r["centred"], r["x"] - r["x"].mean(0)) for r in (r0, r1))


def test_grad_scaler_state_round_trips():
    """An fp16 run's GradScaler (scale backed off, growth tracker) is saved with the training
    state and restored on resume; bf16/fp32 states carry none and load into any run."""
    cfg = _tiny(workers=1)
    model = RDCD(cfg)
    opt = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=7)
    scaler.scale(torch.ones(()))  # initialises the scale lazily, as the first step does
    scaler.update(new_scale=1536.0)
    data = state_bytes(model, opt, 5, [{"step": 5}], scaler)
    other = RDCD(cfg)
    restored = torch.amp.GradScaler("cpu")
    step, history = load_state(data, other, make_optimizer(other, cfg), restored)
    assert (step, history) == (5, [{"step": 5}])
    assert restored.get_scale() == 1536.0 and restored.state_dict() == scaler.state_dict()
    plain = state_bytes(model, opt, 5, [])  # no scaler (bf16, fp32)
    untouched = torch.amp.GradScaler("cpu", init_scale=8.0)
    load_state(plain, other, make_optimizer(other, cfg), untouched)
    assert untouched.get_scale() == 8.0
    load_state(data, other, make_optimizer(other, cfg))  # a run without a scaler ignores it


def test_sync_bn_conversion_keeps_the_function_and_the_state():
    """bn_sync=sync converts both students with timm's converter: the outputs stay the same
    (torch's own converter drops the activation of timm's fused BatchNormAct layers) and the
    state dict keeps its keys, so checkpoints load with or without it."""
    from rdcd.distill import convert_sync_bn

    cfg = _tiny()
    torch.manual_seed(0)
    plain = RDCD(cfg).eval()
    synced = convert_sync_bn(RDCD(cfg)).eval()
    synced.load_state_dict(plain.state_dict())
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.momentum_student.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(synced.student(x), plain.student(x), atol=1e-6)
    assert set(synced.state_dict()) == set(plain.state_dict())


@pytest.mark.slow
def test_ray_train_with_the_teacher_inside_the_trainers(ray_local, random_sscd_teacher, tmp_path,
                                                         shared_data):  # fmt: skip
    """`teacher_placement: trainer` (paper.yaml's): no teacher actors; each DDP worker embeds its
    batch's first views itself and reports the teacher's share of its time."""
    from rdcd.train import run_training

    cfg = _tiny(images=str(shared_data / "photos"), out=str(tmp_path / "run"),
                teacher=random_sscd_teacher, teacher_placement="trainer", cpus_per_worker=0.5,
                steps=2, max_images=16, queue_size=8, memory_size=8, log_every=1,
                checkpoint_every=2)  # fmt: skip
    summary = run_training(cfg)
    assert summary["steps"] == 2
    assert [h["step"] for h in summary["history"]] == [1, 2]
    assert all(0 < h["teacher_share"] < 1 for h in summary["history"])
