"""Distillation: the training step, loss switches, local and Ray Train runs, resume, export."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from rdcd.cli import build_parser, load_distill_config
from rdcd.distill import RDCD, DistillConfig, lr_at, make_optimizer, train_step
from rdcd.models import load_model


def _images_dir(request) -> str:
    try:
        return str(request.getfixturevalue("shared_data") / "photos")
    except pytest.skip.Exception:
        from rdcd.demo import bundled_photos

        return os.path.dirname(bundled_photos()[0])


def tiny(**kw) -> DistillConfig:
    base = DistillConfig(backbone="mobilenetv3_small_050", dim=32, train_size=64, eval_size=64,
                         batch_size=4, steps=4, queue_size=8, memory_size=16, warmup_steps=1,
                         log_every=1, checkpoint_every=2, max_images=24, lr=0.01,
                         collapse_limit=1.0)  # fmt: skip
    # collapse_limit 1.0: the guard never stops these plumbing runs of a random 64 px student on
    # random pixels (whose descriptors do collapse); tests/test_distill_learning.py tests it
    return replace(base, **kw)


def _batch(n=4, size=64, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "view1": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        "view2": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        "teacher": rng.normal(size=(n, 512)).astype(np.float32),
    }


@pytest.mark.parametrize("off", ["w_con", "w_hn", "w_rel", "w_feat"])
def test_zero_weight_turns_a_term_off(off):
    cfg = tiny(**{"w_feat": 2.0, off: 0.0})
    model = RDCD(cfg)
    m = train_step(
        model, model.student, make_optimizer(model, cfg), _batch(), 0, torch.device("cpu")
    )
    names = {"w_con": "loss_con", "w_hn": "loss_hn", "w_rel": "loss_rel", "w_feat": "loss_feat"}
    assert names[off] not in m
    assert all(n in m for w, n in names.items() if w != off)
    weights = {n: getattr(cfg, w) for w, n in names.items()}
    assert m["loss"] == pytest.approx(sum(weights[k] * m[k] for k in weights if k in m), rel=1e-5)


def test_frozen_layers_keep_weights_and_statistics():
    cfg = tiny(freeze=("backbone.conv_stem", "backbone.bn1", "backbone.blocks.0"))
    model = RDCD(cfg).train()
    before = {k: v.clone() for k, v in model.student.state_dict().items()}
    train_step(model, model.student, make_optimizer(model, cfg), _batch(), 0, torch.device("cpu"))
    after = model.student.state_dict()
    frozen = [k for k in before if k.startswith(cfg.freeze) and before[k].is_floating_point()]
    assert any("running_mean" in k for k in frozen)
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["backbone.blocks.1.0.conv_dw.weight"],
                           after["backbone.blocks.1.0.conv_dw.weight"])  # fmt: skip
    with pytest.raises(ValueError, match="no student parameter starts with 'backbone.nope'"):
        RDCD(tiny(freeze=("backbone.nope",)))


def test_init_from_a_trained_student(tmp_path):
    from rdcd.models.checkpoint import save_checkpoint

    donor = RDCD(tiny(seed=1, dim=32)).student.eval()
    path = str(tmp_path / "donor.pt")
    save_checkpoint(donor, path)
    same = RDCD(tiny(init=f"student:{path}", dim=32)).student.state_dict()
    other_dim = RDCD(tiny(init=f"student:{path}", dim=16)).student.state_dict()
    ref = donor.state_dict()
    assert torch.equal(same["head.weight"], ref["head.weight"])
    assert torch.equal(other_dim["project.weight"], ref["project.weight"])  # 512-d part carries
    assert other_dim["head.weight"].shape == (16, 512)  # a new head for a new dimension
    from rdcd.models.embedder import ModelError

    with pytest.raises(ModelError, match="cannot seed"):
        RDCD(tiny(init=f"student:{path}", backbone="resnet10t"))


def test_step_updates_student_momentum_and_queues():
    cfg = tiny()
    model = RDCD(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model, model.student, make_optimizer(model, cfg), _batch(), 0, torch.device("cpu"))
    after = model.state_dict()
    assert not torch.equal(before["student.head.weight"], after["student.head.weight"])
    assert not torch.equal(
        before["momentum_student.head.weight"], after["momentum_student.head.weight"]
    )
    assert int(after["queue.ptr"]) == 4 and int(after["memory.ptr"]) == 4
    # the momentum student moved only 1 - m of the way
    d_student = (after["student.head.weight"] - before["student.head.weight"]).norm()
    d_momentum = (
        after["momentum_student.head.weight"] - before["momentum_student.head.weight"]
    ).norm()
    assert d_momentum < d_student


def test_config_validation_and_schedule():
    with pytest.raises(ValueError, match="multiples of the global batch"):
        tiny(images="x", queue_size=10).validate()
    from rdcd.demo import bundled_photos
    from rdcd.distill import list_training_images

    folder = os.path.dirname(bundled_photos()[0])
    with pytest.raises(ValueError, match="queue would hold positives"):
        list_training_images(tiny(images=folder, queue_size=64, max_images=20))
    with pytest.raises(ValueError, match="all loss weights are 0"):
        tiny(images="x", w_con=0, w_hn=0, w_rel=0).validate()
    with pytest.raises(ValueError, match="unknown distillation settings: bogus"):
        DistillConfig.from_dict({"bogus": 1})
    cfg = DistillConfig(lr=1.0, warmup_steps=10, steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.5) and lr_at(110, cfg) == pytest.approx(0.0)


def test_cli_config_precedence(tmp_path):
    (tmp_path / "c.yaml").write_text("steps: 10\ndim: 64\nlr: 0.5\nimages: a\n")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "c.yaml"), "--set",
                                      "lr=0.25", "--set", "amp=false", "--dim", "128"])  # fmt: skip
    cfg = load_distill_config(args)
    assert (cfg.steps, cfg.dim, cfg.lr, cfg.amp, cfg.images) == (10, 128, 0.25, False, "a")
    bad = build_parser().parse_args(["train", "--set", "nope=1"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        load_distill_config(bad)


def test_local_run_exports_and_resumes(random_sscd_teacher, tmp_path, request):
    from rdcd.train import run_local

    cfg = tiny(images=_images_dir(request), out=str(tmp_path / "run"), teacher=random_sscd_teacher)
    first = run_local(cfg, device="cpu")
    assert first["steps"] == 4 and first["resumed_from"] == 0
    student = load_model(str(tmp_path / "run" / "student.pt"))
    assert student.dim == 32 and student.fingerprint == first["fingerprint"]
    assert student.embed(np.zeros((1, 64, 64, 3), np.uint8)).shape == (1, 32)
    again = run_local(replace(cfg, steps=6), device="cpu")
    assert again["resumed_from"] == 4 and again["steps"] == 6
    assert [h["step"] for h in again["history"]] == [1, 2, 3, 4, 5, 6]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["steps"] == 6


def test_fit_heads_starts_in_the_teachers_space(random_sscd_teacher, tmp_path, request):
    import torch.nn.functional as F

    from rdcd.distill import _pooled_features, fit_heads, list_training_images, make_views
    from rdcd.train import INIT_STUDENT, fitted_start

    cfg = tiny(images=_images_dir(request), out=str(tmp_path / "run"), dim=8,
               teacher=random_sscd_teacher)  # fmt: skip
    teacher = load_model(random_sscd_teacher, teacher_size=64)
    uris = list_training_images(cfg)
    net = fit_heads(cfg, uris, teacher, n_images=24)
    basis = net.head.weight.detach()
    gram = basis @ basis.T  # PCA directions (whitened: orthogonal, scaled per component)
    assert torch.allclose(gram, torch.diag(gram.diagonal()), atol=1e-4 * float(gram.max()))
    views = np.stack([make_views(u, i, 0, cfg)[0] for i, u in enumerate(uris[:8])])
    target = torch.as_tensor(teacher.embed(views))

    def cosine(student) -> float:
        with torch.no_grad():
            h = student.project(_pooled_features(student, views))
        return float(F.cosine_similarity(h, target, dim=1).mean())

    assert cosine(net) > cosine(RDCD(cfg).student.eval()) + 0.1
    fitted = fitted_start(replace(cfg, fit_heads=16), uris, teacher)
    path = tmp_path / "run" / INIT_STUDENT
    assert fitted.init == f"student:{path}" and path.exists()
    stamp = path.stat().st_mtime_ns
    assert fitted_start(replace(cfg, fit_heads=16), uris, teacher).init == fitted.init
    assert path.stat().st_mtime_ns == stamp  # a re-run reuses the fitted start


def test_steps_zero_exports_the_fitted_student(random_sscd_teacher, tmp_path, request):
    from rdcd.train import INIT_STUDENT, run_local

    cfg = tiny(images=_images_dir(request), out=str(tmp_path / "run"), dim=8, steps=0,
               teacher=random_sscd_teacher, fit_heads=8, fit_views=4)  # fmt: skip
    summary = run_local(cfg, device="cpu")
    assert summary["steps"] == 0
    exported = load_model(str(tmp_path / "run" / "student.pt")).module.state_dict()
    fitted = load_model(str(tmp_path / "run" / INIT_STUDENT)).module.state_dict()
    assert all(torch.equal(exported[k], fitted[k]) for k in fitted)
    with pytest.raises(ValueError, match="steps 0 trains nothing"):
        replace(cfg, fit_heads=0).validate()
    with pytest.raises(ValueError, match="fit_views must be an even number"):
        replace(cfg, fit_views=3).validate()


@pytest.mark.slow
def test_ray_train_two_workers_checkpoint_export_resume(ray_local, random_sscd_teacher, tmp_path,
                                                         request):  # fmt: skip
    from rdcd.train import run_training

    cfg = tiny(images=_images_dir(request), out=str(tmp_path / "run"), teacher=random_sscd_teacher,
               workers=2, cpus_per_worker=0.5, steps=2, max_images=16,
               fit_heads=8)  # fmt: skip
    first = run_training(cfg)
    assert (tmp_path / "run" / "init-student.pt").exists()  # workers started from fitted heads
    assert first["steps"] == 2 and first["resumed_from"] == 0
    ckpts = [d for d in os.listdir(tmp_path / "run" / "ray" / "rdcd-distill")
             if d.startswith("checkpoint_")]  # fmt: skip
    assert ckpts
    assert load_model(str(tmp_path / "run" / "student.pt")).fingerprint == first["fingerprint"]
    second = run_training(replace(cfg, steps=4))
    assert second["resumed_from"] == 2 and second["steps"] == 4
    assert [h["step"] for h in second["history"]] == [1, 2, 3, 4]


@pytest.mark.slow
def test_ray_train_checkpoints_and_exports_to_s3(ray_local, random_sscd_teacher, s3_bucket,
                                                 request):  # fmt: skip
    """`--out s3://...`: Ray Train uploads checkpoints there from its workers (whose environment
    lacks the driver's AWS settings), the student is exported there, and a re-run would resume."""
    from rdcd import io as rio
    from rdcd.train import _resume_step, run_training

    out = f"s3://{s3_bucket}/runs/tiny"
    cfg = tiny(images=_images_dir(request), out=out, teacher=random_sscd_teacher, workers=1,
               cpus_per_worker=0.5, steps=2, max_images=16)  # fmt: skip
    first = run_training(cfg)
    assert first["steps"] == 2 and first["resumed_from"] == 0
    saved = [f.uri for f in rio.list_files(f"{out}/ray", None)]
    assert any("/checkpoint_" in u and u.endswith("/state.pt") for u in saved), saved
    assert load_model(f"{out}/student.pt").fingerprint == first["fingerprint"]
    assert _resume_step(cfg) == 2  # a re-run would resume (as the local-storage test checks)


def _kill_one_train_worker() -> int | None:
    """SIGKILL one Ray Train worker process (Ray titles them `ray::RayTrainWorker...`)."""
    import signal
    from pathlib import Path

    for proc in sorted(Path("/proc").glob("[0-9]*")):
        try:
            title = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if title.startswith(b"ray::RayTrainWorker"):
            os.kill(int(proc.name), signal.SIGKILL)
            return int(proc.name)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the worker through /proc")
def test_ray_train_restarts_a_killed_worker_from_its_checkpoint(ray_local, random_sscd_teacher,
                                                                tmp_path, request):  # fmt: skip
    """A worker killed mid-run: `FailureConfig` restarts the workers from the last checkpoint
    and the run ends at its last step with every step logged once."""
    import threading
    import time

    from rdcd.train import run_training

    cfg = tiny(images=_images_dir(request), out=str(tmp_path / "run"), teacher=random_sscd_teacher,
               workers=2, cpus_per_worker=0.5, steps=20, checkpoint_every=2, max_images=16,
               max_failures=1)  # fmt: skip
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = run_training(cfg)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    progress = tmp_path / "run" / "progress.json"
    deadline = time.monotonic() + 300
    step = 0
    while time.monotonic() < deadline and thread.is_alive() and step < 2:
        time.sleep(0.1)
        try:
            step = json.loads(progress.read_text())["step"]
        except (OSError, ValueError, KeyError):
            pass
    assert 2 <= step < cfg.steps, f"no checkpoint to restart from, or the run ended (step {step})"
    assert _kill_one_train_worker() is not None, "no Ray Train worker process found"
    thread.join(timeout=600)
    assert not thread.is_alive(), "the run did not finish after the worker was killed"
    assert "error" not in box, box.get("error")
    result = box["result"]
    assert result["steps"] == cfg.steps
    assert [h["step"] for h in result["history"]] == list(range(1, cfg.steps + 1))
