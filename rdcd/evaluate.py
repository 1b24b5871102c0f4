"""DISC2021-style evaluation of a descriptor model: embed, retrieve, score, report.

Reads a folder in the DISC2021 layout (`references/`, `queries/` or `dev_queries/` or
`final_queries/`, `train/` or `training/` as the background set, and a ground-truth CSV), embeds
everything with the model, retrieves the k nearest references of every query, and writes
`predictions.csv` (raw cosine), `predictions_sn.csv` (score-normalised against the background set)
and `metrics.json`. The same code serves a 60-image demo folder and the 1M-image dev set.

With `index` (`rdcd evaluate --index URI`), references and background come from a published
index instead (`rdcd embed` + `rdcd index`), and queries go through the production query path:
`ShardedIndex.search` and the prediction rows of `rdcd.match`, which `rdcd match` and the Serve
endpoint share. On an exact (Flat) index built from the same references and background, the
figures equal those of the flat search.

With `verify` (`rdcd evaluate --verify`), every query's top-k (plus the references local recall
votes for) is also verified with local features and rescored by the fused score, through
`rdcd.index.verify_row` like `rdcd match --verify` and `/v1/match?verify=true`: in-process, the
references' local features are extracted on the fly (and the fused score is
`FusedScore.DEFAULT`); with `index`, the index's stored features, recall index and fitted fused
score are used. `predictions_verified.csv` and the `verified` block of `metrics.json` hold the
result beside the global-only figures.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass

import numpy as np

from rdcd import io as rio
from rdcd.embed import EmbeddedSet, embed_files
from rdcd.metrics import (
    GroundTruth,
    Match,
    evaluate_predictions,
    read_ground_truth,
    write_predictions,
)
from rdcd.models import load_model
from rdcd.search import ScoreNormalizer, Whitening, check_fingerprint, search

log = logging.getLogger(__name__)

QUERY_DIRS = ("queries", "dev_queries", "final_queries")
BACKGROUND_DIRS = ("train", "training")


class LayoutError(ValueError):
    """A DISC folder that lacks a part evaluation needs."""


@dataclass
class EvalConfig:
    """`rdcd evaluate` options; every path may be a local path or an s3:// URI."""

    disc_root: str | None = None
    model: str = "sscd"
    out: str = "eval"
    references: str | None = None
    queries: str | None = None
    background: str | None = None
    ground_truth: str | None = None
    teacher: str | None = None
    k: int = 10
    batch_size: int = 32
    workers: int = 2
    beta: float = 1.0
    sn_neighbours: int = 3
    max_background: int | None = None
    whiten: bool = False
    seed: int = 0
    progress: bool = True
    index: str | None = None  # a published index: evaluate the production search path on it
    precision: str = "auto"  # compute precision (rdcd.models.runtime): int8 onnxruntime on CPU
    backend: str = "auto"  # `torch` keeps a student in PyTorch (the baseline benchmarks compare)
    verify: bool = False  # also verify the candidates with local features (fused score)
    local_recall: bool = True  # with verify: add the references local recall votes for


@dataclass(frozen=True)
class DiscLayout:
    references: str | None  # None: the references are those of `EvalConfig.index`
    queries: str
    background: str | None
    ground_truth: str


def _first_existing(root: str, names: tuple[str, ...]) -> str | None:
    for name in names:
        path = rio.join(root, name)
        if rio.exists(path):
            return path
    return None


def _find_ground_truth(root: str, queries: str) -> str | None:
    """A CSV directly under `root` named like ground truth; `dev_*` for `dev_queries/`, etc."""
    names = [
        f.uri
        for f in rio.list_files(root, (".csv",), recursive=False)
        if any(t in rio.stem(f.uri).lower() for t in ("ground_truth", "groundtruth", "gt"))
    ]
    if not names:
        return None
    prefix = rio.stem(queries).split("_")[0].lower()  # "dev", "final" or "queries"
    names.sort(key=lambda u: (not rio.stem(u).lower().startswith(prefix), len(u), u))
    return names[0]


def resolve_layout(cfg: EvalConfig) -> DiscLayout:
    """Explicit flags win; otherwise the DISC2021 names under `disc_root`."""
    root = cfg.disc_root
    need_refs = not cfg.index
    if root is None and not (
        (cfg.references or not need_refs) and cfg.queries and cfg.ground_truth
    ):
        raise LayoutError("give --disc-root, or all of --references, --queries and --ground-truth")
    refs = cfg.references or (_first_existing(root, ("references",)) if root else None)
    queries = cfg.queries or _first_existing(root, QUERY_DIRS)
    background = cfg.background or (_first_existing(root, BACKGROUND_DIRS) if root else None)
    if not need_refs:
        refs = background = None  # both come from the index
    elif not refs:
        raise LayoutError(f"{root}: no references/ folder (or pass --references)")
    if not queries:
        raise LayoutError(f"{root}: none of {', '.join(QUERY_DIRS)} found (or pass --queries)")
    gt = cfg.ground_truth or (_find_ground_truth(root, queries) if root else None)
    if not gt:
        raise LayoutError(f"{root}: no ground-truth CSV found (or pass --ground-truth)")
    return DiscLayout(refs, queries, background, gt)


def _list_images(uri: str, what: str) -> list[str]:
    files = [f.uri for f in rio.list_files(uri, rio.IMAGE_SUFFIXES)]
    if not files:
        raise LayoutError(f"{what} folder {uri} holds no images")
    return files


def _ids(embedded: EmbeddedSet, what: str) -> list[str]:
    ids = [rio.stem(u) for u in embedded.uris]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise LayoutError(
            f"{what}: two files share the id {dup!r} (ids are file names without extension)"
        )
    return ids


def _predictions(
    q_ids: list[str], r_ids: list[str], idx: np.ndarray, scores: np.ndarray
) -> list[Match]:
    out = []
    for qi, q in enumerate(q_ids):
        for j, s in zip(idx[qi], scores[qi], strict=True):
            if j >= 0:
                out.append(Match(q, r_ids[j], float(s)))
    return out


@dataclass
class _Searched:
    """What either search path hands to scoring: predictions and what was embedded."""

    raw: list[Match]
    normalised: list[Match] | None
    embedded: list[EmbeddedSet]
    references: int
    background: int
    search_seconds: float
    verified: list[Match] | None = None
    verify_info: dict | None = None


def _search_flat(cfg: EvalConfig, layout: DiscLayout, run, queries: EmbeddedSet) -> _Searched:
    ref_files = _list_images(layout.references, "references")
    bg_files = _list_images(layout.background, "background") if layout.background else []
    if cfg.max_background and len(bg_files) > cfg.max_background:
        bg_files = sorted(random.Random(cfg.seed).sample(bg_files, cfg.max_background))
    refs = run(ref_files, "references")
    background = run(bg_files, "background") if bg_files else None
    r_ids, q_ids = _ids(refs, "references"), _ids(queries, "queries")

    r_emb, q_emb = refs.embeddings, queries.embeddings
    b_emb = background.embeddings if background is not None and len(background.uris) else None
    if cfg.whiten:
        if b_emb is None:
            raise LayoutError("--whiten needs a background set (train/ or --background)")
        white = Whitening.fit(b_emb)
        r_emb, q_emb, b_emb = white.apply(r_emb), white.apply(q_emb), white.apply(b_emb)

    t_search = time.perf_counter()
    normalizer = ScoreNormalizer(b_emb, cfg.beta, cfg.sn_neighbours) if b_emb is not None else None
    found = search(q_emb, r_emb, cfg.k, normalizer)
    seconds = time.perf_counter() - t_search
    raw = _predictions(q_ids, r_ids, found.indices, found.raw_scores)
    sn = _predictions(q_ids, r_ids, found.indices, found.scores) if normalizer else None
    embedded = [refs] + ([background] if background is not None else [])
    n_bg = len(background.uris) if background else 0
    out = _Searched(raw, sn, embedded, len(refs.uris), n_bg, seconds)
    if cfg.verify:
        from rdcd.index import InMemoryLocal
        from rdcd.local import LocalConfig

        lcfg = LocalConfig()
        t0 = time.perf_counter()
        ref_feats = _local_features(refs.uris, lcfg, cfg.workers)
        local = InMemoryLocal(ref_feats, lcfg, recall=cfg.local_recall)
        prep = time.perf_counter() - t0
        out.verified, out.verify_info = _verify_all(
            cfg, local, queries, q_ids, found.indices, found.raw_scores,
            lambda j: r_ids[j],
        )  # fmt: skip
        out.verify_info.update(
            reference_features_seconds=round(prep, 3),
            fused="default",
            references_with_features=len(ref_feats),
        )
    return out


def _search_index(cfg: EvalConfig, model, queries: EmbeddedSet, index) -> _Searched:
    from rdcd.match import query_ids_of, reference_namer, search_index, to_predictions

    t_search = time.perf_counter()
    q_ids = query_ids_of(queries.uris)
    found = search_index(index, queries.embeddings, cfg.k, model.fingerprint)
    name = reference_namer(index, "stem")
    raw = to_predictions(q_ids, found, name=name, raw=True)
    sn = to_predictions(q_ids, found, name=name) if index.normalizer is not None else None
    seconds = time.perf_counter() - t_search
    n_bg = len(index.normalizer.background) if index.normalizer is not None else 0
    out = _Searched(raw, sn, [], index.ntotal, n_bg, seconds)
    if cfg.verify:
        from rdcd.index import LocalData

        local = LocalData(index.info["root"], index.info["manifest"])
        uri_of = dict(zip(found.ids.reshape(-1).tolist(),
                          [u for row in found.uris for u in row], strict=True))  # fmt: skip

        def ref_name(rid: int) -> str:
            uri = uri_of.get(rid) or local.uri_of([rid]).get(rid)
            return name(rid, uri)

        out.verified, out.verify_info = _verify_all(
            cfg, local, queries, q_ids, found.ids, found.raw_scores, ref_name,
            local.has_recall and cfg.local_recall,
        )  # fmt: skip
        out.verify_info.update(fused="index", fused_fit=local.section["fused_fit"].get("how"))
    return out


def _local_features(uris: list[str], cfg, workers: int) -> dict[int, object]:
    """`{position: stored-form LocalFeatures}` of `uris`, extracted in threads; files that fail
    are left out (they verify with zero inliers)."""
    from concurrent.futures import ThreadPoolExecutor

    from rdcd.decode import DecodeError
    from rdcd.index import stored_form
    from rdcd.local import extract_uri

    def one(uri: str):
        try:
            return stored_form(extract_uri(uri, cfg))
        except (DecodeError, rio.StorageError) as exc:
            log.warning("no local features for %s: %s", uri, exc)
            return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        feats = list(pool.map(one, uris))
    return {i: f for i, f in enumerate(feats) if f is not None}


def _verify_all(
    cfg: EvalConfig,
    local,
    queries: EmbeddedSet,
    q_ids: list[str],
    ids: np.ndarray,
    raw: np.ndarray,
    ref_name,
    recall: bool | None = None,
) -> tuple[list[Match], dict]:
    """Verified predictions of every query (`rdcd.index.verify_row`) and what it cost."""
    from rdcd.index import verify_row

    recall = cfg.local_recall if recall is None else recall
    t0 = time.perf_counter()
    q_feats = _local_features(queries.uris, local.config, cfg.workers)
    t_extract = time.perf_counter()
    out: list[Match] = []
    n_recalled = 0
    for row, qid in enumerate(q_ids):
        query = q_feats.get(row)
        if query is None:
            from rdcd.local import LocalFeatures

            query = LocalFeatures.empty(1, 1)
        verified = verify_row(local, query, ids[row], raw[row], cfg.k, recall)
        proposed = {int(i) for i in ids[row].tolist() if i >= 0}
        n_recalled += sum(1 for c in verified if c.id not in proposed)
        out += [Match(qid, ref_name(int(c.id)), float(c.score)) for c in verified]
    n = max(1, len(q_ids))
    info = {
        "local_recall": bool(recall and local.has_recall),
        "query_features_ms": round(1000 * (t_extract - t0) / n, 2),
        "verify_ms_per_query": round(1000 * (time.perf_counter() - t_extract) / n, 2),
        "recalled_candidates": n_recalled,
        "min_inliers": local.config.min_inliers,
    }
    return out, info


def evaluate(cfg: EvalConfig) -> dict:
    """Run the evaluation and write its files under `cfg.out`; returns the metrics dict."""
    t_start = time.perf_counter()
    if cfg.index and cfg.whiten:
        raise LayoutError("--whiten cannot apply to --index: the index holds unwhitened vectors")
    layout = resolve_layout(cfg)
    gt: GroundTruth = read_ground_truth(layout.ground_truth)
    query_files = _list_images(layout.queries, "queries")
    index = None
    if cfg.index:
        from rdcd.index import LocalData, load_index, read_manifest

        index = load_index(cfg.index)
        manifest = read_manifest(cfg.index, index.version)
        index.info.update(root=rio.canonical(cfg.index), manifest=manifest)
        if cfg.verify:  # refused before embedding anything
            LocalData(rio.canonical(cfg.index), manifest)
    model = load_model(cfg.model, teacher=cfg.teacher, precision=cfg.precision,
                       backend=cfg.backend)  # fmt: skip
    if index is not None:  # refuse before embedding anything
        check_fingerprint(index.fingerprint, model.fingerprint, f"index {cfg.index}")
    log.info("evaluating %s (%s) on %s", model.name, model.fingerprint[:12], layout)

    def run(files: list[str], what: str) -> EmbeddedSet:
        return embed_files(
            model,
            files,
            batch_size=cfg.batch_size,
            workers=cfg.workers,
            progress=cfg.progress,
            desc=what,
        )

    queries = run(query_files, "queries")
    if index is None:
        found = _search_flat(cfg, layout, run, queries)
    else:
        found = _search_index(cfg, model, queries, index)

    rio.makedirs(cfg.out)
    write_predictions(rio.join(cfg.out, "predictions.csv"), found.raw)
    metrics = evaluate_predictions(found.raw, gt)
    result: dict = {
        "uap": metrics["uap"],
        "uap_sn": None,
        "recall_at_p90": metrics["recall_at_p90"],
        "threshold_at_p90": metrics["threshold_at_p90"],
        "recall_at_1": metrics["recall_at_1"],
    }
    if found.verified is not None:
        write_predictions(rio.join(cfg.out, "predictions_verified.csv"), found.verified)
        ver = evaluate_predictions(found.verified, gt)
        result["verified"] = {
            "uap": ver["uap"],
            "recall_at_p90": ver["recall_at_p90"],
            "threshold_at_p90": ver["threshold_at_p90"],
            "recall_at_1": ver["recall_at_1"],
            **(found.verify_info or {}),
        }
    if found.normalised is not None:
        write_predictions(rio.join(cfg.out, "predictions_sn.csv"), found.normalised)
        sn = evaluate_predictions(found.normalised, gt)
        result.update(
            uap_sn=sn["uap"],
            recall_at_p90_sn=sn["recall_at_p90"],
            threshold_at_p90_sn=sn["threshold_at_p90"],
        )
    embedded = [queries, *found.embedded]
    errors = {u: e for s in embedded for u, e in s.errors.items()}
    total_images = sum(len(s.uris) for s in embedded)
    embed_seconds = sum(s.seconds for s in embedded)
    result.update(
        model={**model.describe(), "spec": cfg.model},
        counts={
            "references": found.references,
            "queries": len(queries.uris),
            "background": found.background,
            "errors": len(errors),
            "gt_pairs": metrics["n_gt_pairs"],
            "gt_queries": metrics["n_queries"],
            "predictions": metrics["n_predictions"],
        },
        timings={
            "embed_seconds": round(embed_seconds, 3),
            "images_per_second": round(total_images / embed_seconds, 2) if embed_seconds else None,
            "search_seconds": round(found.search_seconds, 3),
            "total_seconds": round(time.perf_counter() - t_start, 3),
        },
        layout=asdict(layout),
        config={k: v for k, v in asdict(cfg).items() if k != "progress"},
        errors=[{"uri": u, "error": e} for u, e in sorted(errors.items())],
    )
    if index is not None:
        info = {k: v for k, v in index.info.items() if k not in ("manifest", "root")}
        result["index"] = {"root": cfg.index, "version": index.version, **info}
    rio.write_text(rio.join(cfg.out, "metrics.json"), json.dumps(result, indent=2))
    return result
