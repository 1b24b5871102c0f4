"""How good is a distilled student? µAP on held-out copies, beside the teacher and an
untrained student, plus training throughput and the teacher's share of a training step.

    python benchmarks/distill_quality.py --student runs/default/train/student.pt [--student ...]
    python benchmarks/distill_quality.py --set pool --baseline prev.pt \
        --student runs/pool/train/student.pt

`--set pool` is the set that ranks students: the train_pool hold-out with photos of the same
category as distractors (see `build_pool_eval_set`); every model is embedded once and scored at
64/128/256 (its own dim as it is, lower dims by PCA fitted on the background set), beside the
512-d teacher. The default `--set photos`:

The evaluation set is a DISC2021-layout folder built from data no training run here used:
- the hold-out slice of ../shared/data/photos (every 4th photo in name order; the training
  manifests exclude it) as references, with three seeded *hard* copies each as queries (2-4
  edits, tight crops, overlays onto other photos), edited distractor queries and a background
  set (`rdcd.demo.build_demo_set(hard=True)`);
- the real copy pairs of ../shared/data/copy_pairs.csv (AugLy, ThreatExchange, imagededup,
  ISC2021; GCompris detail crops excluded), originals as references and copies as queries.

With `--precisions torch-fp32,fp32,int8` each student is evaluated in each compute precision
side by side (torch eager fp32, onnxruntime fp32, onnxruntime static int8), plus the mixed rows
the shared fingerprint allows: references and background of one precision, queries of another.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import shutil
import time
import zlib
from collections import defaultdict

import numpy as np
import torch

from rdcd import io as rio
from rdcd.decode import decode_image
from rdcd.demo import build_demo_set
from rdcd.distill import RDCD, DistillConfig, make_optimizer, train_step
from rdcd.edits import random_copy
from rdcd.embed import embed_files
from rdcd.evaluate import EvalConfig, evaluate
from rdcd.metrics import Match, evaluate_predictions, read_ground_truth, write_ground_truth
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


# ---- the train-pool held-out set ----------------------------------------------------------------
# One photo in ten of ../shared/data/train_pool, chosen by a hash of its name (stable when the pool
# grows), is never trained on. From it: references with several photos of each category (another
# motorbike on white, another face against the same wall: the distractors that break ImageNet
# features), one hard copy of a subset of them as queries, hard copies of *other* held-out photos
# of the same categories as distractor queries (no reference: any match is a false positive), and
# the rest as the background set for score normalisation.
POOL_HOLDOUT_MOD = 10


def pool_category(name: str) -> str:
    """`caltech101__Faces__image_0001.jpg` -> `caltech101/Faces`; Imagenette by synset; the
    clothing photos are one category."""
    parts = os.path.basename(name).split("__")
    if parts[0] == "imagenette224" and len(parts) > 2:
        return f"imagenette/{parts[2]}"
    if parts[0] == "caltech101" and len(parts) > 1:
        return f"caltech101/{parts[1]}"
    return parts[0]


def pool_is_holdout(name: str) -> bool:
    return zlib.crc32(os.path.basename(name).encode()) % POOL_HOLDOUT_MOD == 0


def pool_photos(shared: str, holdout: bool) -> list[str]:
    folder = os.path.join(shared, "train_pool")
    if not os.path.isdir(folder):
        return []
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".jpg", ".jpeg")))
    return [os.path.join(folder, n) for n in names if pool_is_holdout(n) == holdout]


def pool_training_manifest(shared: str) -> list[str]:
    """Training images of the pool student: the pool outside its hold-out, plus the default
    student's manifest (photos outside their hold-out, imagenet_dev)."""
    return pool_photos(shared, holdout=False) + training_manifest(shared)


def _save(img, path: str, quality: int = 90) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.convert("RGB").save(path, "JPEG", quality=quality)


def build_pool_eval_set(shared: str, root: str, seed: int = 13, references: int = 320,
                        queries: int = 200, distractors: int = 160,
                        background: int = 300) -> dict:  # fmt: skip
    """Write the DISC-layout pool hold-out set under `root` (local path); returns its counts.

    References are drawn category by category (at least 4 photos of each category they use), so
    most queries' true reference sits among photos of its own kind; queries are hard copies
    (`random_copy(hard=True)`: 2-4 edits, tight crops, overlays onto other held-out photos)."""
    held = pool_photos(shared, holdout=True)
    if not held:
        raise FileNotFoundError(f"no train_pool hold-out under {shared}")
    rng = random.Random(seed)
    by_cat: dict[str, list[str]] = defaultdict(list)
    for p in held:
        by_cat[pool_category(p)].append(p)
    cats = sorted(c for c, ps in by_cat.items() if len(ps) >= 6)
    rng.shuffle(cats)
    refs, dis_src, rest = [], [], []
    for c in cats:
        ps = sorted(by_cat[c])
        rng.shuffle(ps)
        if len(refs) < references:
            take = min(len(ps) // 2, max(4, len(ps) // 3), references - len(refs))
            refs += ps[:take]
            dis_src += ps[take : take + max(1, take // 2)]
            rest += ps[take + max(1, take // 2) :]
        else:
            rest += ps
    rest += [p for c, ps in by_cat.items() if c not in cats for p in ps]
    rng.shuffle(rest)
    rng.shuffle(dis_src)
    bg = rest[:background]
    if os.path.isdir(root):
        shutil.rmtree(root)
    images = {p: decode_image(rio.read_bytes(p)) for p in refs + dis_src + bg}
    canvases = [images[p] for p in bg[:60]]
    gt: list[tuple[str, str | None]] = []
    sources = [("id", "source", "edits")]
    ref_ids = {}
    for i, p in enumerate(refs):
        ref_ids[p] = f"R{i:06d}"
        _save(images[p], os.path.join(root, "references", ref_ids[p] + ".jpg"))
        sources.append((ref_ids[p], os.path.basename(p), ""))
    q = 0
    for p in rng.sample(refs, min(queries, len(refs))):
        img, names = random_copy(images[p], rng, hard=True, canvases=canvases)
        _save(img, os.path.join(root, "queries", f"Q{q:05d}.jpg"))
        gt.append((f"Q{q:05d}", ref_ids[p]))
        sources.append((f"Q{q:05d}", os.path.basename(p), "+".join(names)))
        q += 1
    for p in dis_src[:distractors]:
        img, names = random_copy(images[p], rng, hard=True, canvases=canvases)
        _save(img, os.path.join(root, "queries", f"Q{q:05d}.jpg"))
        gt.append((f"Q{q:05d}", None))
        sources.append((f"Q{q:05d}", os.path.basename(p), "+".join(names)))
        q += 1
    for t, p in enumerate(bg):
        _save(images[p], os.path.join(root, "train", f"T{t:06d}.jpg"))
        sources.append((f"T{t:06d}", os.path.basename(p), ""))
    write_ground_truth(os.path.join(root, "ground_truth.csv"), gt)
    with open(os.path.join(root, "sources.csv"), "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(sources)
    return {"references": len(refs), "categories": len({pool_category(p) for p in refs}),
            "queries": q, "copies": sum(1 for _, r in gt if r),
            "distractors": sum(1 for _, r in gt if not r), "background": len(bg)}  # fmt: skip


EVAL_SETS = {"pool": build_pool_eval_set, "photos": build_eval_set}


PRECISION_ROWS = {  # label -> (precision, backend)
    "torch-fp32": ("fp32", "torch"),
    "fp32": ("fp32", "auto"),
    "int8": ("int8", "auto"),
}


def _embed_folder(model, folder: str):
    files = [f.uri for f in rio.list_files(folder, rio.IMAGE_SUFFIXES)]
    got = embed_files(model, files, progress=False)
    return [rio.stem(u) for u in got.uris], got.embeddings


def mixed_precision(root: str, spec: str, index_precision: str, query_precision: str) -> dict:
    """µAP / µAP-sn with references and background embedded in `index_precision` and queries in
    `query_precision` (an index built in one precision answering queries of another)."""
    from rdcd.search import ScoreNormalizer, search

    idx_model = load_model(spec, precision=PRECISION_ROWS[index_precision][0],
                           backend=PRECISION_ROWS[index_precision][1])  # fmt: skip
    q_model = load_model(spec, precision=PRECISION_ROWS[query_precision][0],
                         backend=PRECISION_ROWS[query_precision][1])  # fmt: skip
    assert idx_model.fingerprint == q_model.fingerprint
    r_ids, refs = _embed_folder(idx_model, rio.join(root, "references"))
    _, background = _embed_folder(idx_model, rio.join(root, "train"))
    q_ids, queries = _embed_folder(q_model, rio.join(root, "queries"))
    gt = read_ground_truth(rio.join(root, "ground_truth.csv"))
    found = search(queries, refs, 10, ScoreNormalizer(background))
    out = {}
    for key, scores in (("uap", found.raw_scores), ("uap_sn", found.scores)):
        preds = [Match(q, r_ids[j], float(s)) for qi, q in enumerate(q_ids)
                 for j, s in zip(found.indices[qi], scores[qi], strict=True) if j >= 0]  # fmt: skip
        out[key] = evaluate_predictions(preds, gt)["uap"]
    out["precisions"] = (idx_model.precision, q_model.precision)
    return out


def dims_table(root: str, models: list[tuple[str, str]], dims=(256, 128, 64)) -> list[dict]:
    """µAP / µAP-sn / recall@P90 of each model at each dim of `dims`, embedding each model once:
    a model's own dim as it is, a lower dim by PCA of its descriptors fitted on the background
    set (how a 512-d teacher or a 256-d student is cut to 64/128 without retraining)."""
    from rdcd.search import ScoreNormalizer, search

    gt = read_ground_truth(rio.join(root, "ground_truth.csv"))
    rows = []
    for label, spec in models:
        model = load_model(spec)
        r_ids, refs = _embed_folder(model, rio.join(root, "references"))
        _, bg = _embed_folder(model, rio.join(root, "train"))
        q_ids, qs = _embed_folder(model, rio.join(root, "queries"))
        for d in sorted({model.dim, *dims}, reverse=True):
            if d > model.dim:
                continue
            if d == model.dim:
                cut = lambda x: x  # noqa: E731
                how = "as is"
            else:
                mean = bg.mean(axis=0)
                _, _, vt = np.linalg.svd(bg - mean, full_matrices=False)
                axes = vt[:d].T

                def cut(x, mean=mean, axes=axes):
                    y = (x - mean) @ axes
                    return (y / np.linalg.norm(y, axis=1, keepdims=True).clip(1e-12)).astype(
                        np.float32
                    )

                how = f"PCA {model.dim}->{d}"
            found = search(cut(qs), cut(refs), 10, ScoreNormalizer(cut(bg)))
            out = {"model": label, "spec": spec, "dim": d, "how": how}
            for key, scores in (("", found.raw_scores), ("_sn", found.scores)):
                preds = [Match(q, r_ids[j], float(s)) for qi, q in enumerate(q_ids)
                         for j, s in zip(found.indices[qi], scores[qi], strict=True)
                         if j >= 0]  # fmt: skip
                m = evaluate_predictions(preds, gt)
                out["uap" + key] = m["uap"]
                out["recall_at_p90" + key] = m.get("recall_at_p90", float("nan"))
            if d == model.dim:
                out["recall1_by_edit"] = recall_by_edit(root, q_ids, r_ids, found.indices, gt)
            rows.append(out)
    return rows


def recall_by_edit(root: str, q_ids: list[str], r_ids: list[str], indices: np.ndarray,
                   gt) -> dict[str, list]:  # fmt: skip
    """{edit family: [copies with it, share whose top-1 is the true reference]} from the set's
    sources.csv: which edits a student loses, which is where its next recipe should look."""
    path = rio.join(root, "sources.csv")
    if not rio.exists(path):
        return {}
    edits = {r["id"]: r["edits"] for r in csv.DictReader(rio.read_text(path).splitlines())}
    truth = dict(gt.pairs)
    hits = defaultdict(list)
    for qi, q in enumerate(q_ids):
        if q not in truth:
            continue
        top = indices[qi][0]
        ok = top >= 0 and r_ids[top] == truth[q]
        for name in ["all", *(e for e in edits.get(q, "").split("+") if e)]:
            hits[name].append(ok)
    return {k: [len(v), round(float(np.mean(v)), 3)] for k, v in sorted(hits.items())}


def print_by_edit(rows: list[dict]) -> None:
    own = [r for r in rows if r.get("recall1_by_edit")]
    if not own:
        return
    names = sorted({k for r in own for k in r["recall1_by_edit"]}, key=lambda k: (k != "all", k))
    print("\nrecall@1 of the copies by edit (each model at its own dim; a copy has 2-5 edits)")
    print(f"{'edit':<12}{'n':>5}" + "".join(f"{r['model'][-22:]:>24}" for r in own))
    for k in names:
        n = next(r["recall1_by_edit"][k][0] for r in own if k in r["recall1_by_edit"])
        vals = [r["recall1_by_edit"].get(k, [0, float("nan")])[1] for r in own]
        print(f"{k:<12}{n:>5}" + "".join(f"{v:>24.2f}" for v in vals))


def print_dims_table(rows: list[dict]) -> None:
    teacher = {r["dim"]: r for r in rows if r["spec"] == "sscd"}
    print(f"{'model':<40}{'dim':>5}{'how':>16}{'µAP':>8}{'µAP-sn':>8}{'R@P90-sn':>10}"
          f"{'µAP/T':>8}{'sn/T':>7}   (/T: over the 512-d teacher)")  # fmt: skip
    for r in rows:
        t = teacher.get(max(teacher)) if teacher else None  # the full 512-d teacher
        ratio = r["uap"] / t["uap"] if t else float("nan")
        ratio_sn = r["uap_sn"] / t["uap_sn"] if t else float("nan")
        print(f"{r['model']:<40}{r['dim']:>5}{r['how']:>16}{r['uap']:>8.3f}{r['uap_sn']:>8.3f}"
              f"{r['recall_at_p90_sn']:>10.3f}{ratio:>8.2f}{ratio_sn:>7.2f}")  # fmt: skip


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


def _short(path: str) -> str:
    """`run/student.pt`: the folder tells runs apart, whose files share a name."""
    return os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--student", action="append", default=[], help="trained student checkpoint(s)")
    p.add_argument("--work", default="runs/distill-quality", help="where the eval set is built")
    p.add_argument("--baseline", action="append", default=[],
                   help="--set pool: earlier students (e.g. the previous default)")  # fmt: skip
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    p.add_argument(
        "--precisions",
        help="evaluate each student in these compute precisions, "
        f"comma-separated, of {','.join(PRECISION_ROWS)} (default: torch-fp32 only)",
    )
    p.add_argument("--no-untrained", action="store_true", help="skip the untrained rows")
    p.add_argument("--write-manifest", metavar="FILE",
                   help="write the training listing of --set (no hold-out), exit")  # fmt: skip
    p.add_argument("--set", dest="eval_set", choices=sorted(EVAL_SETS), default="photos",
                   help="held-out set: `pool` (train_pool hold-out, category distractors) or "
                   "`photos` (photos/ hold-out + real copy pairs)")  # fmt: skip
    args = p.parse_args()
    if args.write_manifest:
        listing = pool_training_manifest if args.eval_set == "pool" else training_manifest
        rio.write_text(args.write_manifest, "\n".join(listing(SHARED)) + "\n")
        return
    if args.eval_set == "pool":
        root = os.path.join(args.work, "pool")
        counts = build_pool_eval_set(SHARED, root)
        print(f"pool hold-out set: {counts}")
        print(f"{os.cpu_count()} CPUs, {platform.machine()}, torch {torch.__version__}")
        models = [("teacher SSCD R50 (int8 ONNX)", "sscd")]
        models += [(f"baseline {_short(b)}", b) for b in args.baseline]
        models += [(f"student {_short(st)}", st) for st in args.student]
        rows = dims_table(root, models)
        print_dims_table(rows)
        print_by_edit(rows)
        if args.json:
            rio.write_text(args.json, json.dumps({"eval_set": counts, "rows": rows,
                                                  "hardware": f"{os.cpu_count()} CPUs, no GPU"},
                                                 indent=2))  # fmt: skip
        return
    root = os.path.join(args.work, "data")
    counts = build_eval_set(SHARED, root)
    print(f"eval set: {counts}")
    print(f"{os.cpu_count()} CPUs, {platform.machine()}, torch {torch.__version__}, "
          f"cuda={torch.cuda.is_available()}")  # fmt: skip
    precisions = (args.precisions or "torch-fp32").split(",")
    for label in precisions:
        if label not in PRECISION_ROWS:
            p.error(f"--precisions: {label!r} is not one of {', '.join(PRECISION_ROWS)}")
    models = [("teacher SSCD R50 (int8 ONNX)", "sscd", "torch-fp32")]
    for i, s in enumerate(args.student):
        if not args.no_untrained:
            untrained = untrained_student(s, os.path.join(args.work, f"untrained-{i}.pt"))
            models.append(("  same, untrained (random heads)", untrained, "torch-fp32"))
        for label in precisions:
            models.append((f"student {s} [{label}]", s, label))
    print(f"{'model':<52}{'dim':>5}{'µAP':>8}{'µAP-sn':>8}{'R@P90':>8}{'R@1':>7}{'img/s':>8}")
    teacher_uap = None
    rows = []
    for name, spec, label in models:
        precision, backend = PRECISION_ROWS[label]
        m = evaluate(EvalConfig(disc_root=root, model=spec, out=os.path.join(args.work, "eval"),
                                progress=False, precision=precision,
                                backend=backend))  # fmt: skip
        teacher_uap = teacher_uap or m["uap_sn"]
        print(f"{name:<52}{m['model']['dim']:>5}{m['uap']:>8.3f}{m['uap_sn']:>8.3f}"
              f"{m['recall_at_p90_sn']:>8.3f}{m['recall_at_1']:>7.3f}"
              f"{m['timings']['images_per_second']:>8.1f}   "
              f"(µAP-sn / teacher {m['uap_sn'] / teacher_uap:.2f})")  # fmt: skip
        rows.append({"model": name, "spec": spec, "precision": m["model"]["precision"],
                     "backend": m["model"]["backend"], "dim": m["model"]["dim"], "uap": m["uap"],
                     "uap_sn": m["uap_sn"], "recall_at_p90_sn": m["recall_at_p90_sn"],
                     "recall_at_1": m["recall_at_1"], "ratio_to_teacher": m["uap_sn"] / teacher_uap,
                     "fingerprint": m["model"]["fingerprint"]})  # fmt: skip
    mixed = []
    if len(precisions) > 1:
        print("mixed precisions (one fingerprint): references + background | queries")
        base = precisions[0]
        for s in args.student:
            for other in precisions[1:]:
                for idx_p, q_p in ((base, other), (other, base)):
                    r = mixed_precision(root, s, idx_p, q_p)
                    print(f"  {s} index {idx_p:<10} queries {q_p:<10} µAP {r['uap']:.3f}  "
                          f"µAP-sn {r['uap_sn']:.3f}   (ran {r['precisions']})")  # fmt: skip
                    mixed.append({"student": s, "index": idx_p, "queries": q_p, **r})
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
        rio.write_text(args.json, json.dumps({"eval_set": counts, "rows": rows, "mixed": mixed,
                                              "cpu_step_timing": timing,
                                              "hardware": f"{os.cpu_count()} CPUs, no GPU"},
                                             indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
