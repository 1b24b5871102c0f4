"""Global + local: what keypoint verification and local recall add to a global descriptor.

    python benchmarks/local.py [--quick] [--models sscd,default] [--root DIR] [--k 10]

Two evaluation sets, both DISC-layout folders built from ../shared/data:
- hard: the train_pool hold-out of benchmarks/distill_quality.py (`build_pool_eval_set`; hard
  seeded copies, 2-4 edits, tight crops, overlays; distractor queries; photos of the same
  category among the references), or its `build_eval_set` where the pool builder is missing;
- real: the 193 real copy pairs as queries against their originals, with the 396 photos and the
  second images of the 18 hard negatives as distractor references and the first images of the
  hard negatives as distractor queries. Scored per group: the non-GCompris pairs ("real"), the
  GCompris detail crops ("gcompris-crop", tiny circular fragments) and the other GCompris pairs
  ("gcompris-other"), each group with every distractor query.

Per model (teacher `sscd`, default student): µAP and recall@P90 for the global descriptor (raw
cosine, and score-normalised against the background), + verification of the global top-k, +
local recall; the fused score is fitted per model on labelled pairs made from the background set
(seeded hard copies of background images searched against the background: the true original is
a positive, every other candidate a negative), so nothing of the evaluation sets is fitted on.
A last row scores with `FusedScore.DEFAULT` instead. Timings are milliseconds per query for each
stage on this machine; bytes per reference for the stored local features (Parquet) and the recall
index. Figures only, never asserts.

Measured (full run on the shared 2-core machine, k = 10, default LocalConfig: 928 s wall
extracting every image's features, 552 s re-run on its cached features; hard = pool hold-out,
279 references, 200 copies + 126 distractor queries; real = 410 references, 83 non-GCompris
pairs, 106 GCompris crops, 17 distractor queries; figures of the re-run, with the previous
fitted-heads default student; README has the re-run with the tail-distilled one):

    µAP                 | teacher (sscd)                  | default student
                        | global  +verify  +verify+recall | global  +verify  +verify+recall
    hard                | 0.830   0.909    0.924          | 0.288   0.682    0.866
    real (non-GCompris) | 0.973   0.971    0.971          | 0.929   0.968    0.968
    GCompris crops      | 0.050   0.103    0.101          | 0.003   0.012    0.011

The default student with verification and local recall (0.866) beats the teacher's global-only
µAP on the hard set (0.830); the teacher gains +0.094. recall@P90 on hard: teacher 0.680 ->
0.875, student 0.140 -> 0.840. Per query: RootSIFT extraction 25-93 ms, recall vote 16-24 ms,
verification of 10 candidates 32-52 ms (the machine was shared with a training job; loaded).
Local features stored: 47-50 KiB per reference in Parquet (~470-500 keypoints); recall index
(IVF1024,PQ64x4fs, 256 descriptors per reference) 11.5-13.2 KiB per reference.
"""

from __future__ import annotations

import os

# One BLAS thread: descriptor matching is a small matrix product per pair, and OpenBLAS threads
# that spin against other work on a shared CPU made it 4x slower here. Set before NumPy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import csv
import hashlib
import importlib.util
import json
import platform
import random
import shutil
import sys
import time

import faiss
import numpy as np

from rdcd import io as rio
from rdcd.decode import decode_image
from rdcd.edits import random_copy
from rdcd.embed import embed_files
from rdcd.local import (
    FusedScore,
    LocalConfig,
    LocalFeatures,
    LocalIndex,
    extract_bytes,
    from_table,
    parquet_bytes,
    read_parquet_bytes,
    to_table,
)
from rdcd.metrics import Match, evaluate_predictions, read_ground_truth, write_ground_truth
from rdcd.models import load_model
from rdcd.search import ScoreNormalizer, local_recall, search, verify_candidates

SHARED = os.environ.get("RDCD_SHARED_DATA", os.path.join("..", "shared", "data"))
HERE = os.path.dirname(os.path.abspath(__file__))


def _distill_quality():
    spec = importlib.util.spec_from_file_location(
        "distill_quality", os.path.join(HERE, "distill_quality.py")
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["distill_quality"] = mod
    spec.loader.exec_module(mod)
    return mod


def build_hard(shared: str, root: str, quick: bool) -> dict:
    dq = _distill_quality()
    if hasattr(dq, "build_pool_eval_set"):
        kw = dict(references=60, queries=40, distractors=30, background=80) if quick else {}
        counts = dq.build_pool_eval_set(shared, root, **kw)
        counts["builder"] = "build_pool_eval_set"
    else:
        counts = dq.build_eval_set(shared, root)
        counts["builder"] = "build_eval_set"
    return counts


def build_real(shared: str, root: str, background_from: str, quick: bool) -> dict:
    """The real copy pairs as a DISC-layout set; writes `groups.json` (query id -> group)."""
    if os.path.isdir(root):
        shutil.rmtree(root)
    with open(os.path.join(shared, "copy_pairs.csv")) as f:
        pairs = list(csv.DictReader(f))
    with open(os.path.join(shared, "hard_negatives.csv")) as f:
        negs = list(csv.DictReader(f))
    if quick:
        rng = random.Random(5)
        pairs = rng.sample(pairs, 40)
    refs: dict[str, str] = {}

    # shared/data holds a few byte-identical files in two folders (a hard negative's image is
    # also one of photos/): a distractor reference identical to a query would be a true copy
    # missing from the ground truth, and a second copy of an original a "false" positive
    def sha(rel: str) -> str:
        with open(os.path.join(shared, rel), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    query_shas = {sha(p["copy"]) for p in pairs} | {sha(n["image_a"]) for n in negs}
    ref_shas: set[str] = set()

    def add_ref(rel: str, distractor: bool = False) -> str | None:
        if rel not in refs:
            digest = sha(rel)
            if digest in ref_shas or (distractor and digest in query_shas):
                return None
            ref_shas.add(digest)
            refs[rel] = f"R{len(refs):05d}"
            ext = os.path.splitext(rel)[1]
            shutil.copyfile(os.path.join(shared, rel),
                            os.path.join(root, "references", refs[rel] + ext))  # fmt: skip
        return refs[rel]

    os.makedirs(os.path.join(root, "references"))
    os.makedirs(os.path.join(root, "queries"))
    gt: list[tuple[str, str | None]] = []
    groups: dict[str, str] = {}
    for i, p in enumerate(pairs):
        rid = add_ref(p["original"])
        qid = f"Q{i:05d}"
        ext = os.path.splitext(p["copy"])[1]
        shutil.copyfile(os.path.join(shared, p["copy"]), os.path.join(root, "queries", qid + ext))
        gt.append((qid, rid))
        if not p["source"].startswith("gcompris"):
            groups[qid] = "real"
        else:
            groups[qid] = "gcompris-crop" if "detail_crop" in p["transform"] else "gcompris-other"
    for n in negs:
        add_ref(n["image_b"], distractor=True)
    photos = sorted(os.listdir(os.path.join(shared, "photos")))
    for name in photos[:: 4 if quick else 1]:
        add_ref(os.path.join("photos", name), distractor=True)
    neg_queries = sorted(
        r for r in {n["image_a"] for n in negs} - set(refs) if sha(r) not in ref_shas
    )
    for j, rel in enumerate(neg_queries):
        qid = f"N{j:05d}"
        shutil.copyfile(os.path.join(shared, rel),
                        os.path.join(root, "queries", qid + os.path.splitext(rel)[1]))  # fmt: skip
        gt.append((qid, None))
        groups[qid] = "distractor"
    shutil.copytree(os.path.join(background_from, "train"), os.path.join(root, "train"))
    write_ground_truth(os.path.join(root, "ground_truth.csv"), gt)
    with open(os.path.join(root, "groups.json"), "w") as f:
        json.dump(groups, f, indent=1, sort_keys=True)
    sizes = {g: sum(1 for v in groups.values() if v == g) for g in sorted(set(groups.values()))}
    return {"references": len(refs), "queries": len(gt), **sizes}


def build_fit_set(background: str, root: str, n: int, seed: int = 23) -> list[tuple[str, str]]:
    """Seeded hard copies of `n` background images: (copy path, original stem) pairs."""
    if os.path.isdir(root):
        shutil.rmtree(root)
    os.makedirs(root)
    files = sorted(f.uri for f in rio.list_files(background, rio.IMAGE_SUFFIXES))
    rng = random.Random(seed)
    canvases = [decode_image(rio.read_bytes(u)) for u in files[-20:]]
    out = []
    for i, u in enumerate(rng.sample(files, min(n, len(files)))):
        img, _ = random_copy(decode_image(rio.read_bytes(u)), rng, hard=True, canvases=canvases)
        path = os.path.join(root, f"F{i:05d}.jpg")
        img.convert("RGB").save(path, quality=85)
        out.append((path, rio.stem(u)))
    return out


# ---- the measured pipeline --------------------------------------------------------------------


class Features:
    """Local features of files, extracted once and cached as Parquet under `root`, keyed by the
    sha256 of the file's bytes (the sets are rebuilt on every run; their files are seeded)."""

    def __init__(self, cache: str, cfg: LocalConfig):
        self.cache, self.cfg = cache, cfg
        self.by_sha: dict[str, LocalFeatures] = {}
        self.ms_by_sha: dict[str, float] = {}
        self.ms: dict[str, float] = {}  # by path, for the files asked for in this run
        if os.path.exists(cache + ".parquet"):
            with open(cache + ".json") as f:
                meta = json.load(f)
            got = from_table(read_parquet_bytes(rio.read_bytes(cache + ".parquet")))
            self.by_sha = {h: got[i] for i, h in enumerate(meta["sha"])}
            self.ms_by_sha = meta["ms"]

    def get(self, paths: list[str]) -> list[LocalFeatures]:
        out, added = [], False
        for p in paths:
            data = rio.read_bytes(p)
            h = hashlib.sha256(data).hexdigest()
            if h not in self.by_sha:
                t = time.perf_counter()
                self.by_sha[h] = extract_bytes(data, self.cfg)
                self.ms_by_sha[h] = 1000 * (time.perf_counter() - t)
                added = True
            self.ms[p] = self.ms_by_sha[h]
            out.append(self.by_sha[h])
        if added:
            order = sorted(self.by_sha)
            table = to_table(list(range(len(order))), [self.by_sha[h] for h in order], self.cfg)
            rio.write_bytes(self.cache + ".parquet", parquet_bytes(table))
            with open(self.cache + ".json", "w") as f:
                json.dump({"sha": order, "ms": self.ms_by_sha}, f)
        return out


def _files(folder: str) -> list[str]:
    return sorted(f.uri for f in rio.list_files(folder, rio.IMAGE_SUFFIXES))


def fit_fused(model, fit_pairs, background, feats: Features, k: int, cfg: LocalConfig):
    """FusedScore fitted on the background copies (see the module docstring)."""
    bg_files = _files(background)
    bg = embed_files(model, bg_files, progress=False)
    q = embed_files(model, [p for p, _ in fit_pairs], progress=False)
    truth = dict(fit_pairs)
    found = search(q.embeddings, bg.embeddings, k)
    bg_feats = dict(zip(bg.uris, feats.get(bg.uris), strict=True))
    q_feats = feats.get(q.uris)
    g, inl, y = [], [], []
    for row, qu in enumerate(q.uris):
        for j, s in zip(found.indices[row], found.raw_scores[row], strict=True):
            if j < 0:
                continue
            from rdcd.local import verify

            v = verify(q_feats[row], bg_feats[bg.uris[j]], cfg)
            g.append(float(s))
            inl.append(v.inliers)
            y.append(rio.stem(bg.uris[j]) == truth[qu])
    fused = FusedScore.fit(np.array(g), np.array(inl), np.array(y, float))
    return fused, {"pairs": len(y), "positives": int(sum(y))}


def run_set(
    name: str, root: str, model, feats: Features, fused: FusedScore, k: int, cfg: LocalConfig,
    groups: dict[str, str] | None, recall_index: LocalIndex,
) -> list[dict]:  # fmt: skip
    refs = embed_files(model, _files(os.path.join(root, "references")), progress=False)
    bg = embed_files(model, _files(os.path.join(root, "train")), progress=False)
    t = time.perf_counter()
    qs = embed_files(model, _files(os.path.join(root, "queries")), progress=False)
    embed_ms = 1000 * (time.perf_counter() - t) / max(1, len(qs.uris))
    gt = read_ground_truth(os.path.join(root, "ground_truth.csv"))
    r_ids = [rio.stem(u) for u in refs.uris]
    q_ids = [rio.stem(u) for u in qs.uris]
    t = time.perf_counter()
    found = search(qs.embeddings, refs.embeddings, k, ScoreNormalizer(bg.embeddings))
    search_ms = 1000 * (time.perf_counter() - t) / max(1, len(q_ids))
    ref_feats = dict(enumerate(feats.get(refs.uris)))
    q_feats = feats.get(qs.uris)
    extract_ms = float(np.mean([feats.ms.get(u, np.nan) for u in qs.uris]))

    def features_of(ids):
        return {int(i): ref_feats[int(i)] for i in ids}

    stages = ("global", "global-sn", "verify", "verify+recall", "verify+recall (default fused)")
    preds: dict[str, list[Match]] = {s: [] for s in stages}
    verify_ms, vote_ms, recall_added = [], [], 0
    for row, qid in enumerate(q_ids):
        ids, raw, sn = found.indices[row], found.raw_scores[row], found.scores[row]
        for j, a, b in zip(ids, raw, sn, strict=True):
            if j >= 0:
                preds["global"].append(Match(qid, r_ids[j], float(a)))
                preds["global-sn"].append(Match(qid, r_ids[j], float(b)))
        t = time.perf_counter()
        ver = verify_candidates(q_feats[row], ids.tolist(), raw.tolist(), features_of, fused, cfg)
        verify_ms.append(1000 * (time.perf_counter() - t))
        preds["verify"] += [Match(qid, r_ids[c.id], c.score) for c in ver]
        t = time.perf_counter()
        voted = recall_index.vote(q_feats[row])
        vote_ms.append(1000 * (time.perf_counter() - t))
        cids, cscores, votes = local_recall(ids.tolist(), raw.tolist(), voted)
        recall_added += len(cids) - int((ids >= 0).sum())
        both = verify_candidates(q_feats[row], cids, cscores, features_of, fused, cfg, votes)[:k]
        preds["verify+recall"] += [Match(qid, r_ids[c.id], c.score) for c in both]
        dflt = FusedScore.DEFAULT(np.array([c.global_score for c in both]),
                                  np.array([c.inliers for c in both]))  # fmt: skip
        preds["verify+recall (default fused)"] += [
            Match(qid, r_ids[c.id], float(s)) for c, s in zip(both, dflt, strict=True)
        ]
    timing = {"embed_ms": embed_ms, "search_ms": search_ms, "extract_ms": extract_ms,
              "vote_ms": float(np.mean(vote_ms)), "verify_ms": float(np.mean(verify_ms)),
              "recall_added_per_query": recall_added / max(1, len(q_ids))}  # fmt: skip
    rows = []
    subsets = {name: None}
    if groups:
        subsets = {f"{name}/{g}": g for g in sorted(set(groups.values()) - {"distractor"})}
    for label, group in subsets.items():
        keep = None
        if group is not None:
            keep = {q for q, gname in groups.items() if gname in (group, "distractor")}
        sub_gt = gt
        if keep is not None:
            from rdcd.metrics import GroundTruth

            sub_gt = GroundTruth(frozenset(p for p in gt.pairs if p[0] in keep),
                                 frozenset(q for q in gt.queries if q in keep))  # fmt: skip
        for stage, ps in preds.items():
            ps = [m for m in ps if keep is None or m.query_id in keep]
            m = evaluate_predictions(ps, sub_gt)
            rows.append({"set": label, "stage": stage, "uap": m["uap"],
                         "recall_at_p90": m["recall_at_p90"], "n_gt": m["n_gt_pairs"],
                         "n_queries": m["n_queries"]})  # fmt: skip
    for r in rows:
        r.update(timing)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small subsets, to try it")
    ap.add_argument("--models", default="sscd,default")
    ap.add_argument("--root", default=os.path.join("runs", "bench_local"))
    ap.add_argument("--shared", default=SHARED)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--fit-copies", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1, help="FAISS OpenMP threads")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    faiss.omp_set_num_threads(args.threads)
    t_all = time.perf_counter()
    root = os.path.abspath(args.root + ("-quick" if args.quick else ""))
    cfg = LocalConfig()
    os.makedirs(root, exist_ok=True)
    t = time.perf_counter()
    hard_root, real_root = os.path.join(root, "hard"), os.path.join(root, "real")
    counts = {"hard": build_hard(args.shared, hard_root, args.quick)}
    counts["real"] = build_real(args.shared, real_root, hard_root, args.quick)
    fit_pairs = build_fit_set(os.path.join(hard_root, "train"), os.path.join(root, "fit"),
                              30 if args.quick else args.fit_copies)  # fmt: skip
    print(f"sets built in {time.perf_counter() - t:.0f} s: {json.dumps(counts)}")
    feats = Features(os.path.join(root, "features"), cfg)
    with open(os.path.join(real_root, "groups.json")) as f:
        groups = json.load(f)
    # local features and recall index of each set's references: model-independent
    indexes, storage = {}, {}
    for name, sroot in (("hard", hard_root), ("real", real_root)):
        ref_files = _files(os.path.join(sroot, "references"))
        rf = feats.get(ref_files)
        t = time.perf_counter()
        indexes[name] = LocalIndex.build(enumerate(rf), factory="auto", per_reference=256)
        build_s = time.perf_counter() - t
        pq_bytes = len(parquet_bytes(to_table(list(range(len(rf))), rf, cfg)))
        kp = float(np.mean([len(x) for x in rf]))
        storage[name] = {"references": len(rf), "keypoints_per_ref": kp,
                         "parquet_bytes_per_ref": pq_bytes / len(rf),
                         "recall_factory": indexes[name].info["factory"],
                         "recall_bytes_per_ref": indexes[name].bytes_per_reference(),
                         "recall_build_s": build_s}  # fmt: skip
    rows, fits = [], {}
    for spec in args.models.split(","):
        model = load_model(spec)
        fused, info = fit_fused(model, fit_pairs, os.path.join(hard_root, "train"), feats,
                                args.k, cfg)  # fmt: skip
        fits[spec] = {**fused.to_dict(), **info}
        print(f"{spec}: fused score fitted on {info}: {fused.to_dict()}")
        for name, sroot in (("hard", hard_root), ("real", real_root)):
            for r in run_set(name, sroot, model, feats, fused, args.k, cfg,
                             groups if name == "real" else None, indexes[name]):  # fmt: skip
                rows.append({"model": spec, **r})
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"FAISS threads {args.threads}; k = {args.k}; LocalConfig {cfg.to_dict()}")  # fmt: skip
    print(f"sets: {json.dumps(counts)}")
    print("\nbytes per reference (local features):")
    for name, s in storage.items():
        print(f"  {name}: {s['references']} refs, {s['keypoints_per_ref']:.0f} keypoints/ref, "
              f"Parquet {s['parquet_bytes_per_ref'] / 1024:.1f} KiB/ref, recall index "
              f"{s['recall_factory']} {s['recall_bytes_per_ref'] / 1024:.1f} KiB/ref "
              f"(built in {s['recall_build_s']:.1f} s)")  # fmt: skip
    print(f"\n{'model':8} {'set':22} {'stage':30} {'µAP':>6} {'R@P90':>6} {'gt':>4}")
    for r in rows:
        print(f"{r['model']:8} {r['set']:22} {r['stage']:30} {r['uap']:6.3f} "
              f"{(r['recall_at_p90'] or 0):6.3f} {r['n_gt']:4d}")  # fmt: skip
    print(
        "\nms per query (extract: query RootSIFT; embed: global descriptor; vote: local recall; "
        "verify: top-k verification):"
    )
    seen = set()
    for r in rows:
        key = (r["model"], r["set"].split("/")[0])
        if key in seen:
            continue
        seen.add(key)
        print(f"  {key[0]:8} {key[1]:5} extract {r['extract_ms']:6.1f}  "
              f"embed {r['embed_ms']:6.1f}  search {r['search_ms']:5.2f}  "
              f"vote {r['vote_ms']:6.1f}  verify {r['verify_ms']:6.1f}  "
              f"(+{r['recall_added_per_query']:.1f} recall candidates/query)")  # fmt: skip
    print(f"\nwall time {time.perf_counter() - t_all:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "storage": storage, "fits": fits, "counts": counts}, f,
                      indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
