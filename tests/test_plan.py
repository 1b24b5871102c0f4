"""`rdcd train --dry-run` and the run plan: resources against the cluster, the teacher's
resolution and the refusal of an int8 CPU teacher in a GPU run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rdcd.cli import main

REPO = Path(__file__).resolve().parents[1]
PAPER = str(REPO / "jobs" / "configs" / "paper.yaml")

# The paper.yaml plan before teacher_placement existed: 8 trainers x 1 GPU + 8 actors x 0.25 GPU.
ACTOR_TEACHERS = ["--set", "teacher_placement=actors", "--set", "teacher_actors=8",
                  "--set", "teacher_gpus=0.25", "--set", "teacher_cpus=1"]  # fmt: skip
CLUSTER = ["--cluster-gpus", "8", "--cluster-cpus", "64"]

_DRY_RUNS = """
import contextlib, io, json, resource, sys, time
from rdcd.cli import main
runs = json.loads(sys.argv[1])
out = {}
for name, argv in runs.items():
    buf = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = main(argv)
    out[name] = {"rc": rc, "seconds": time.perf_counter() - t, "text": buf.getvalue()}
# VmHWM, not getrusage: Linux folds the pre-exec (forked) image's peak into ru_maxrss, so a
# child of a big pytest process would report the parent's size
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")]
out["maxrss_mib"] = (int(hwm[0].split()[1]) if hwm else
                     resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024
out["ray_imported"] = "ray" in sys.modules
print(json.dumps(out))
"""


def _flat(text: str) -> str:
    """The plan's text with its line wrapping undone."""
    return " ".join(text.split())


def _manifest(path: Path, n: int) -> str:
    with open(path, "w") as f:
        f.writelines(f"s3://disc21/train/T{i:07d}.jpg\n" for i in range(n))
    return str(path)


def _teacher_file(tmp_path: Path, name: str) -> str:
    """An empty file with a teacher's name: the dry run must not read teacher weights."""
    path = tmp_path / name
    path.write_bytes(b"")
    return str(path)


def test_dry_run_of_paper_yaml_over_a_million_images(tmp_path):
    """The paper's recipe over a 1M-line manifest: the old resource plan (separate teacher GPU
    actors) is refused on 8 GPUs with the reason, the shipped one fits; both in seconds and well
    under 2 GB (peak RSS of the whole process, torch included)."""
    manifest = _manifest(tmp_path / "train.txt", 1_000_000)
    teacher = _teacher_file(tmp_path, "sscd_disc_mixup.torchvision.pt")
    base = ["train", "--config", PAPER, "--images", manifest, "--teacher", teacher,
            "--out", str(tmp_path / "run"), "--dry-run", *CLUSTER]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _DRY_RUNS, json.dumps({"refuse": base + ACTOR_TEACHERS,
                                                      "accept": base})],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    refused, accepted = out["refuse"], out["accept"]
    assert refused["rc"] == 2, refused["text"]
    why = _flat(refused["text"])
    assert "needs 10 GPUs" in why and "the cluster has 8" in why
    assert "teacher_placement=trainer" in why
    assert accepted["rc"] == 0, accepted["text"]
    text = _flat(accepted["text"])
    assert "1,000,000 under" in text and "390,625 steps x global batch 256" in text
    assert "3,906 steps per epoch" in text and "inside each DDP worker, on its GPU, bf16" in text
    assert "needs 33 CPUs, 8 GPUs" in text and "verdict fits" in text
    assert max(refused["seconds"], accepted["seconds"]) < 30, out
    assert wall < 60, wall
    assert out["maxrss_mib"] < 1536, out["maxrss_mib"]
    assert not out["ray_imported"]  # a dry run starts nothing


def _small(tmp_path: Path) -> list[str]:
    manifest = _manifest(tmp_path / "small.txt", 2048)
    return ["train", "--config", PAPER, "--images", manifest, "--out", str(tmp_path / "run"),
            "--set", "queue_size=256", "--set", "memory_size=256", "--dry-run",
            *CLUSTER]  # fmt: skip


def test_gpu_plan_refuses_the_int8_teacher_unless_forced(tmp_path, capsys):
    onnx = _teacher_file(tmp_path, "sscd.onnx")
    assert main([*_small(tmp_path), "--teacher", onnx]) == 2
    err = _flat(capsys.readouterr().err)
    assert "int8" in err and "--allow-cpu-teacher" in err and onnx in err
    assert main([*_small(tmp_path), "--teacher", onnx, "--allow-cpu-teacher"]) == 0
    assert "verdict fits" in _flat(capsys.readouterr().out)
    # a CPU run may use it: there is nothing faster to wait for
    cpu = ["--set", "use_gpu=false", "--set", "bn_sync=shuffle", "--teacher", onnx]
    assert main([*_small(tmp_path), *cpu]) == 0


def test_sscd_is_resolved_on_the_driver_and_named_to_workers(tmp_path, monkeypatch):
    """`sscd` resolves here (RDCD_TEACHER of the driver), and the config the workers receive
    names the file: they never consult their own environment."""
    from rdcd.distill import DistillConfig
    from rdcd.plan import resolve_teacher

    onnx = _teacher_file(tmp_path, "sscd.onnx")
    monkeypatch.setenv("RDCD_TEACHER", onnx)
    cfg, info = resolve_teacher(DistillConfig(images="x", teacher="sscd"))
    assert cfg.teacher_path == onnx and info.origin == "$RDCD_TEACHER" and info.runs_on_cpu
    monkeypatch.delenv("RDCD_TEACHER")
    tv = _teacher_file(tmp_path, "sscd_disc_mixup.torchvision.pt")
    cfg, info = resolve_teacher(DistillConfig(images="x", teacher="sscd", teacher_path=tv))
    assert cfg.teacher_path == tv and info.kind == "torchvision" and not info.runs_on_cpu


def test_plan_refusals_name_the_fix(tmp_path, capsys):
    teacher = _teacher_file(tmp_path, "sscd_disc_mixup.torchvision.pt")
    args = [*_small(tmp_path), "--teacher", teacher]
    assert main([*args, "--cluster-gpus", "4"]) == 2  # later flags win: 4 GPUs
    assert "needs 8 GPUs" in _flat(capsys.readouterr().err)
    assert main([*args, "--cluster-cpus", "16"]) == 2
    assert "needs 33 CPUs" in _flat(capsys.readouterr().err)
    assert main([*args, "--teacher", str(tmp_path / "missing.torchvision.pt")]) == 2
    assert "teacher file not found" in _flat(capsys.readouterr().err)
    assert main([*args, "--set", "use_gpu=false", "--set", "bn_sync=sync"]) == 2
    assert "SyncBatchNorm runs on CUDA only" in _flat(capsys.readouterr().err)


def test_run_settings_are_checked():
    import torch

    from rdcd.distill import DistillConfig, autocast_dtype, bn_sync_mode, make_scaler

    for bad in ({"amp_dtype": "fp8"}, {"bn_sync": "yes"}, {"teacher_placement": "gpu"},
                {"teacher_precision": "int4"}, {"io_threads": 0}):  # fmt: skip
        with pytest.raises(ValueError):
            DistillConfig(images="x", **bad).validate()
    cfg = DistillConfig(images="x", amp_dtype="bf16", workers=4, use_gpu=True)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert autocast_dtype(cfg, cuda) == torch.bfloat16 and make_scaler(cfg, cuda) is None
    assert autocast_dtype(cfg, cpu) is None and make_scaler(cfg, cpu) is None
    assert bn_sync_mode(cfg, 4, "cuda") == "sync" and bn_sync_mode(cfg, 4, "cpu") == "shuffle"
    assert bn_sync_mode(cfg, 1, "cuda") == "off"
