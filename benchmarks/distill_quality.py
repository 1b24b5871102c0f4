"""How good is a distilled student? µAP on held-out real copies, beside the teacher and an
untrained student, plus training throughput and the teacher's share of a training step.

    python benchmarks/distill_quality.py --student runs/default/train/student.pt [--student ...]

The evaluation set is a DISC2021-layout folder built from data no training run here used:
- the hold-out slice of ../shared/data/photos (every 4th photo in name order; the training
  manifests exclude it) as references, with three seeded *hard* copies each as queries (2-4
  edits, tight crops, overlays onto other photos), edited distractor queries and a background
  set (`rdcd.demo.build_demo_set(hard=True)`);
- the real copy pairs of ../shared/data/copy_pairs.csv (AugLy, ThreatExchange, imagededup,
  ISC2021; GCompris detail crops excluded), originals as references and copies as queries.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import time

import numpy as np
import torch

from rdcd import io as rio
from rdcd.demo import build_demo_set
from rdcd.distill import RDCD, DistillConfig, make_optimizer, train_step
from rdcd.evaluate import EvalConfig, evaluate
from rdcd.metrics import read_ground_truth, write_ground_truth
from rdcd.models import load_model
from rdcd.models.checkpoint import save_checkpoint

SHARED = os.environ.get("RDCD_SHARED_DATA", os.path.join("..", "shared", "data"))


def holdout_photos(shared: str) -> list[str]:
    names = sorted(os.listdir(os.path.join(shared, "photos")))
    return [os.path.join(shared, "photos", n) for i, n in enumerate(names) if i % 4 == 0]


def training_manifest(shared: str) -> list[str]:
    """What the default student trained on: photos outside the hold-out, plus imagenet_dev."""
    names = sorted(os.listdir(os.path.join(shared, "photos")))
    photos = [os.path.join(shared, "photos", n) for i, n in enumerate(names) if i % 4 != 0]
    imnet = sorted(os.listdir(os.path.join(shared, "imagenet_dev")))
    return photos + [os.path.join(shared, "imagenet_dev", n) for n in imnet]


def build_eval_set(shared: str, root: str) -> dict:
    counts = build_demo_set(holdout_photos(shared), root, copies=3, seed=11, hard=True)
    gt = read_ground_truth(rio.join(root, "ground_truth.csv"))
    rows = [(q, r) for q, r in gt.pairs] + [
        (q, None) for q in gt.queries - {q for q, _ in gt.pairs}
    ]
    with open(os.path.join(shared, "copy_pairs.csv")) as f:
        pairs = [r for r in csv.DictReader(f) if not r["source"].startswith("gcompris")]
    ref_ids: dict[str, str] = {}
    for i, p in enumerate(pairs):
        if p["original"] not in ref_ids:
            ref_ids[p["original"]] = f"RC{len(ref_ids):05d}"
            ext = os.path.splitext(p["original"])[1]
            rio.write_bytes(rio.join(root, "references", ref_ids[p["original"]] + ext),
                            rio.read_bytes(os.path.join(shared, p["original"])))  # fmt: skip
        qid = f"QC{i:05d}"
        ext = os.path.splitext(p["copy"])[1]
        rio.write_bytes(rio.join(root, "queries", qid + ext),
                        rio.read_bytes(os.path.join(shared, p["copy"])))  # fmt: skip
        rows.append((qid, ref_ids[p["original"]]))
    write_ground_truth(rio.join(root, "ground_truth.csv"), sorted(rows))
    counts.update(real_pairs=len(pairs), real_originals=len(ref_ids))
    return counts


def untrained_student(like: str, path: str) -> str:
    """Same architecture and starting weights as a trained student, before any distillation."""
    trained = load_model(like)
    cfg = trained.module.config
    init = "efficientnet-lite0" if cfg.backbone == "efficientnet_lite0" else "random"
    torch.manual_seed(0)
    rdcd = RDCD(DistillConfig(backbone=cfg.backbone, dim=cfg.dim, init=init,
                              queue_size=64, memory_size=64))  # fmt: skip
    save_checkpoint(rdcd.student.eval(), path)
    return path


def step_timing(student_path: str, batch_size: int = 32, steps: int = 3) -> dict:
    """Seconds of one student training step and of the teacher on the same batch, on this CPU."""
    cfg0 = load_model(student_path).module.config
    cfg = DistillConfig(backbone=cfg0.backbone, dim=cfg0.dim, batch_size=batch_size,
                        queue_size=batch_size * 4, memory_size=batch_size * 4)  # fmt: skip
    model = RDCD(cfg)
    opt = make_optimizer(model, cfg)
    teacher = load_model("sscd", teacher_size=cfg.train_size)
    rng = np.random.default_rng(0)
    views = rng.integers(0, 256, (batch_size, cfg.train_size, cfg.train_size, 3), dtype=np.uint8)
    t = time.perf_counter()
    for _ in range(steps):
        feats = teacher.embed(views)
    t_teacher = (time.perf_counter() - t) / steps
    batch = {"view1": views, "view2": views[::-1].copy(), "teacher": feats}
    train_step(model, model.student, opt, batch, 0, torch.device("cpu"))  # warm-up
    t = time.perf_counter()
    for s in range(steps):
        train_step(model, model.student, opt, batch, s + 1, torch.device("cpu"))
    t_step = (time.perf_counter() - t) / steps
    return {"student_step_s": t_step, "teacher_s": t_teacher,
            "teacher_share": t_teacher / (t_teacher + t_step),
            "train_images_per_s_serial": batch_size / (t_teacher + t_step),
            "train_images_per_s_overlapped": batch_size / max(t_teacher, t_step)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--student", action="append", default=[], help="trained student checkpoint(s)")
    p.add_argument("--work", default="runs/distill-quality", help="where the eval set is built")
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    p.add_argument("--write-manifest", metavar="FILE",
                   help="write the training manifest (hold-out excluded) and exit")  # fmt: skip
    args = p.parse_args()
    if args.write_manifest:
        rio.write_text(args.write_manifest, "\n".join(training_manifest(SHARED)) + "\n")
        return
    root = os.path.join(args.work, "data")
    counts = build_eval_set(SHARED, root)
    print(f"eval set: {counts}")
    print(f"{os.cpu_count()} CPUs, {platform.machine()}, torch {torch.__version__}, "
          f"cuda={torch.cuda.is_available()}")  # fmt: skip
    models = [("teacher SSCD R50 (int8 ONNX)", "sscd")]
    for i, s in enumerate(args.student):
        untrained = untrained_student(s, os.path.join(args.work, f"untrained-{i}.pt"))
        models.append(("  same, untrained (random heads)", untrained))
        models.append((f"student {s}", s))
    print(f"{'model':<52}{'dim':>5}{'µAP':>8}{'µAP-sn':>8}{'R@P90':>8}{'R@1':>7}{'img/s':>8}")
    teacher_uap = None
    rows = []
    for name, spec in models:
        m = evaluate(EvalConfig(disc_root=root, model=spec, out=os.path.join(args.work, "eval"),
                                progress=False))  # fmt: skip
        teacher_uap = teacher_uap or m["uap_sn"]
        print(f"{name:<52}{m['model']['dim']:>5}{m['uap']:>8.3f}{m['uap_sn']:>8.3f}"
              f"{m['recall_at_p90_sn']:>8.3f}{m['recall_at_1']:>7.3f}"
              f"{m['timings']['images_per_second']:>8.1f}   "
              f"(µAP-sn / teacher {m['uap_sn'] / teacher_uap:.2f})")  # fmt: skip
        rows.append({"model": name, "spec": spec, "dim": m["model"]["dim"], "uap": m["uap"],
                     "uap_sn": m["uap_sn"], "recall_at_p90_sn": m["recall_at_p90_sn"],
                     "recall_at_1": m["recall_at_1"], "ratio_to_teacher": m["uap_sn"] / teacher_uap,
                     "fingerprint": m["model"]["fingerprint"]})  # fmt: skip
    timing = None
    if args.student and not args.no_timing:
        t = timing = step_timing(args.student[0])
        print(
            f"training on this CPU, batch 32: student step {t['student_step_s']:.2f} s, "
            f"teacher {t['teacher_s']:.2f} s (share {t['teacher_share']:.0%} if serial); "
            f"{t['train_images_per_s_serial']:.1f} img/s serial, "
            f"{t['train_images_per_s_overlapped']:.1f} img/s with the teacher overlapped"
        )

    if args.json:
        rio.write_text(args.json, json.dumps({"eval_set": counts, "rows": rows,
                                              "cpu_step_timing": timing,
                                              "hardware": f"{os.cpu_count()} CPUs, no GPU"},
                                             indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
