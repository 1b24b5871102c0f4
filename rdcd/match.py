"""Offline matching: a whole query set against a published index, as DISC2021 predictions.

`rdcd match` embeds the queries with the bulk embedding job (Ray Data, resumable Parquet parts
under `--embeddings`), searches the index with `ShardedIndex.search` (per-shard top-k, merge, score
normalisation against the index's background set: the very code the Serve ingress finishes its
searchers' answers with) and writes one row per (query, reference) candidate:

    query_id,reference_id,score

`score` is what `/v1/match` calls `score` (score-normalised when the index holds a background
set, else the cosine similarity); `--raw-scores` writes the cosine instead. `--threshold T` keeps
the rows that `/v1/match` would flag `is_copy` at threshold T; without it every top-k candidate is
written, which is what µAP wants. `--max-predictions N` keeps the N best rows over all queries
(the DISC2021 challenge allowed 500,000).

With `--verify` the queries' local features are extracted by the same embedding job
(`--local-features`), each query's global top-k (plus, with local recall, the references its
keypoints vote for) is verified against the index's stored local features and rescored with the
index's fused score (`rdcd.index.verify_row`, what `/v1/match?verify=true` runs): `score` is then
the fused score, and `<out without suffix>.verified.jsonl` holds every written row with its
`inliers`, `region`, `transform` and global `raw_score`, as the HTTP answer carries them.

Ids follow DISC2021: a query's id is its file name without extension (`Q00042.jpg` -> `Q00042`),
and so is a reference's, from the URI the index holds for it (`--reference-ids id` writes the
index's integer ids instead, `uri` the full URI). `rdcd evaluate --index` builds its predictions
with the same functions, so evaluation measures exactly what matching and serving return.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from rdcd import io as rio
from rdcd.metrics import Match
from rdcd.search import Matches, ShardedIndex, check_fingerprint

log = logging.getLogger(__name__)

REFERENCE_ID_KINDS = ("stem", "id", "uri")
OUTPUT_SUFFIXES = (".csv", ".parquet")
SEARCH_BATCH = 8192  # queries per FAISS call: bounds memory for DISC-sized query sets
CHALLENGE_CAP = 500_000  # the DISC2021 matching track's limit on predictions


class MatchError(ValueError):
    """A matching request that cannot be answered; the message says why and what to do."""


@dataclass
class MatchConfig:
    """`rdcd match` settings. `queries`, `index` and `out` have no default that runs."""

    queries: str = ""  # folder, s3:// prefix or manifest file (.txt/.lst/.parquet) of query images
    index: str = ""  # index root (`rdcd index --out`)
    out: str = ""  # predictions: .csv or .parquet (local path or s3:// URI)
    model: str = "default"  # must be the index's model (its fingerprint is checked)
    teacher: str | None = None  # teacher file when model is `sscd`
    k: int = 10  # candidates per query
    threshold: float | None = None  # keep rows with score >= threshold (is_copy in /v1/match)
    max_predictions: int | None = None  # keep the best N rows over all queries
    raw_scores: bool = False  # write cosine similarities instead of normalised scores
    reference_ids: str = "stem"  # stem | id | uri
    embeddings: str | None = None  # query embedding run; default `<out stem>-query-embeddings`
    batch_size: int = 32
    # Compute precision of the queries (rdcd.models.runtime); any precision may search an index
    # built in another: they share the model's fingerprint.
    precision: str = "auto"
    shard_size: int = 10_000
    actors: int | None = None
    cpus_per_actor: float | None = None
    gpus_per_actor: float | None = None
    verify: bool = False  # local verification of the candidates (the index needs local data)
    local_recall: bool | None = None  # add local-recall candidates; None: when the index can
    progress: bool = True

    def validate(self) -> None:
        if not self.queries or not self.index or not self.out:
            raise MatchError("match needs --queries URI, --index URI and --out FILE")
        if not self.out.lower().endswith(OUTPUT_SUFFIXES):
            raise MatchError(f"--out {self.out!r}: predictions are written as .csv or .parquet")
        if self.k < 1:
            raise MatchError(f"--k must be >= 1, got {self.k}")
        if self.max_predictions is not None and self.max_predictions < 1:
            raise MatchError(f"--max-predictions must be >= 1, got {self.max_predictions}")
        if self.threshold is not None and not np.isfinite(self.threshold):
            raise MatchError(f"--threshold must be finite, got {self.threshold}")
        if self.verify and self.raw_scores:
            raise MatchError("--raw-scores writes global cosines; with --verify the score is the "
                             "fused one (the cosine is in the .verified.jsonl rows)")  # fmt: skip
        if self.local_recall and not self.verify:
            raise MatchError("--local-recall adds candidates to verify: it needs --verify")
        if self.reference_ids not in REFERENCE_ID_KINDS:
            raise MatchError(
                f"--reference-ids must be one of {', '.join(REFERENCE_ID_KINDS)}, "
                f"not {self.reference_ids!r}"
            )

    def verified_uri(self) -> str:
        """Where `--verify` writes the per-row verification records."""
        return f"{self.out.rsplit('.', 1)[0]}.verified.jsonl"

    def embeddings_uri(self) -> str:
        if self.embeddings:
            return self.embeddings
        base = self.out.rsplit(".", 1)[0]
        return f"{base}-query-embeddings"


# ---- the search path shared by `rdcd match`, `rdcd evaluate --index` and the demo ------------


def search_index(
    index: ShardedIndex, vectors: np.ndarray, k: int, fingerprint: str | None
) -> Matches:
    """`index.search` in bounded batches; the results are those of one call."""
    check_fingerprint(index.fingerprint, fingerprint, f"index version {index.version}")
    n = len(vectors)
    if n <= SEARCH_BATCH:
        return index.search(vectors, k, fingerprint=fingerprint)
    parts = [
        index.search(vectors[i : i + SEARCH_BATCH], k, fingerprint=fingerprint)
        for i in range(0, n, SEARCH_BATCH)
    ]
    return Matches(
        np.concatenate([p.ids for p in parts]),
        [row for p in parts for row in p.uris],
        np.concatenate([p.raw_scores for p in parts]),
        np.concatenate([p.scores for p in parts]),
        tuple(sorted({s for p in parts for s in p.missing_shards})),
    )


def reference_namer(index: ShardedIndex, kind: str = "stem"):
    """A function (id, uri) -> the reference id written in predictions. For `stem`, two
    references of the index with the same file name would be indistinguishable in DISC-format
    output: that is refused up front, with the way out."""
    if kind == "id":
        return lambda rid, uri: str(int(rid))
    if kind == "uri":
        return lambda rid, uri: str(uri)
    seen: dict[str, str] = {}
    for shard in index.shards:
        for uri in shard.uris:
            s = rio.stem(uri)
            other = seen.setdefault(s, uri)
            if other != uri:
                raise MatchError(
                    f"two references of the index share the id {s!r} ({other} and {uri}): "
                    "DISC ids are file names without extension. Use --reference-ids uri or id"
                )
    return lambda rid, uri: rio.stem(uri)


def to_predictions(
    query_ids: list[str],
    found: Matches,
    *,
    name=lambda rid, uri: rio.stem(uri),
    threshold: float | None = None,
    raw: bool = False,
) -> list[Match]:
    """One `Match` per (query, candidate) of `found`, best first within a query. `threshold`
    applies to the written score (as `/v1/match` decides `is_copy` on its `score`)."""
    if len(query_ids) != len(found.ids):
        raise ValueError(f"{len(query_ids)} query ids for {len(found.ids)} rows of results")
    scores = found.raw_scores if raw else found.scores
    out: list[Match] = []
    for row, qid in enumerate(query_ids):
        for col in range(found.ids.shape[1]):
            rid = int(found.ids[row, col])
            if rid < 0:
                continue
            score = float(scores[row, col])
            if threshold is not None and float(found.scores[row, col]) < threshold:
                continue
            out.append(Match(qid, name(rid, found.uris[row][col]), score))
    return out


def cap_predictions(predictions: list[Match], limit: int | None) -> list[Match]:
    """The `limit` best rows over all queries (ties broken by ids, so the cut is reproducible),
    in their original order."""
    if limit is None or len(predictions) <= limit:
        return predictions
    order = sorted(
        range(len(predictions)),
        key=lambda i: (-predictions[i].score, predictions[i].query_id, predictions[i].reference_id),
    )
    keep = sorted(order[:limit])
    return [predictions[i] for i in keep]


def write_predictions_file(uri: str, predictions: list[Match]) -> None:
    """`query_id,reference_id,score` as CSV (the DISC2021 format) or Parquet (same columns)."""
    if uri.lower().endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table(
            {
                "query_id": pa.array([p.query_id for p in predictions], pa.string()),
                "reference_id": pa.array([p.reference_id for p in predictions], pa.string()),
                "score": pa.array([p.score for p in predictions], pa.float64()),
            }
        )
        buf = io.BytesIO()
        pq.write_table(table, buf)
        rio.write_bytes(uri, buf.getvalue())
        return
    from rdcd.metrics import write_predictions

    write_predictions(uri, predictions)


def read_predictions_file(uri: str) -> list[Match]:
    """Predictions written by `write_predictions_file` (or any DISC2021 CSV)."""
    if uri.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        t = pq.read_table(io.BytesIO(rio.read_bytes(uri)))
        cols = [t.column(c).to_pylist() for c in ("query_id", "reference_id", "score")]
        return [Match(q, r, float(s)) for q, r, s in zip(*cols, strict=True)]
    from rdcd.metrics import read_predictions

    return read_predictions(uri)


def query_ids_of(uris: list[str]) -> list[str]:
    """DISC query ids (file names without extension); two queries with one id are refused."""
    ids = [rio.stem(u) for u in uris]
    if len(set(ids)) != len(ids):
        seen: dict[str, str] = {}
        for i, u in zip(ids, uris, strict=True):
            if i in seen:
                raise MatchError(
                    f"two queries share the id {i!r} ({seen[i]} and {u}): query ids are file "
                    "names without extension"
                )
            seen[i] = u
    return ids


# ---- the job --------------------------------------------------------------------------------


def read_query_features(emb: str) -> dict[int, Any]:
    """`{run id: LocalFeatures}` of every committed query of the embedding run `emb`."""
    from rdcd import store

    feats: dict[int, Any] = {}
    for commit in store.committed_parts(emb).values():
        if int(commit["embedded"]):
            feats.update(store.read_local_part(emb, commit))
    return feats


def verify_predictions(
    local: Any,
    query_ids: list[str],
    run_ids: np.ndarray,
    found: Matches,
    features: dict[int, Any],
    k: int,
    recall: bool,
    name=lambda rid, uri: rio.stem(uri),
    threshold: float | None = None,
) -> tuple[list[Match], list[dict[str, Any]]]:
    """Verified predictions of every query (`rdcd.index.verify_row`: what `/v1/match?verify=true`
    answers), and one JSON-ready record per row with what the HTTP answer carries."""
    from rdcd.index import verified_matches, verify_row

    cut = local.fused.threshold if threshold is None else threshold
    out: list[Match] = []
    records: list[dict[str, Any]] = []
    for row, (qid, rid) in enumerate(zip(query_ids, run_ids.tolist(), strict=True)):
        query = features.get(int(rid))
        if query is None:
            raise MatchError(f"query {qid}: no local features in the query run")
        ids, raw = found.ids[row], found.raw_scores[row]
        verified = verify_row(local, query, ids, raw, k, recall)
        uris = {int(i): u for i, u in zip(ids.tolist(), found.uris[row], strict=True) if i >= 0}
        extra = [c.id for c in verified if c.id not in uris]
        uris.update(local.uri_of(extra) if extra else {})
        for m in verified_matches(verified, ids, uris, cut):
            if threshold is not None and not m["is_copy"]:
                continue
            written = name(m["reference_id"], m["uri"])
            out.append(Match(qid, written, float(m["score"])))
            records.append({"query_id": qid, "written_id": written, **m})
    return out, records


def run_match(cfg: MatchConfig) -> dict[str, Any]:
    """Embed `cfg.queries` (Ray Data), search `cfg.index`, write `cfg.out`; returns a summary.

    The model is checked against the index before any image is embedded, and again on the
    descriptors read back: a query set embedded by another model is refused, never searched."""
    from rdcd import store
    from rdcd.embed import EmbedJobConfig, load_embedder, run_embed_job
    from rdcd.index import load_index, read_manifest

    cfg.validate()
    t0 = time.perf_counter()
    manifest = read_manifest(cfg.index)
    model = load_embedder(cfg.model, teacher=cfg.teacher, device="cpu", threads=1,
                          precision="fp32", backend="torch")  # fmt: skip
    check_fingerprint(
        manifest["fingerprint"], model.fingerprint, f"index {cfg.index} v{manifest['version']}"
    )
    del model
    local = None
    if cfg.verify:  # refused before any image is embedded when the index cannot verify
        from rdcd.index import LocalData

        local = LocalData(rio.canonical(cfg.index), manifest)
        if cfg.local_recall and not local.has_recall:
            raise MatchError(f"index {cfg.index} v{manifest['version']} has no local-recall "
                             "index; run without --local-recall")  # fmt: skip
    recall = bool(local is not None and (cfg.local_recall is not False) and local.has_recall)
    emb = cfg.embeddings_uri()
    earlier = store.committed_parts(emb)
    if earlier and any(store.has_local(c) for c in earlier.values()) != (local is not None):
        had = "with" if local is None else "without"
        raise MatchError(
            f"the query embeddings at {emb} were made {had} local features (an earlier "
            f"`rdcd match` {'with' if local is None else 'without'} --verify); give another "
            "--embeddings, or delete that folder"
        )
    run = run_embed_job(
        EmbedJobConfig(
            images=cfg.queries,
            out=emb,
            model=cfg.model,
            teacher=cfg.teacher,
            shard_size=cfg.shard_size,
            batch_size=cfg.batch_size,
            precision=cfg.precision,
            actors=cfg.actors,
            cpus_per_actor=cfg.cpus_per_actor,
            gpus_per_actor=cfg.gpus_per_actor,
            local_features=local is not None,
            local_config=local.config.to_dict() if local is not None else {},
            progress=cfg.progress,
        )
    )
    t_embed = time.perf_counter()
    queries = store.read_embeddings(emb)
    failed = store.read_errors(emb)
    index = load_index(cfg.index, int(manifest["version"]))
    t_load = time.perf_counter()
    qids = query_ids_of(queries.uris)
    found = search_index(index, queries.embeddings, cfg.k, queries.meta["fingerprint"])
    name = reference_namer(index, cfg.reference_ids)
    records: list[dict[str, Any]] = []
    if local is None:
        predictions = to_predictions(qids, found, name=name, threshold=cfg.threshold,
                                     raw=cfg.raw_scores)  # fmt: skip
    else:
        predictions, records = verify_predictions(
            local, qids, queries.ids, found, read_query_features(emb), cfg.k, recall,
            name, cfg.threshold,
        )  # fmt: skip
    before_cap = len(predictions)
    predictions = cap_predictions(predictions, cfg.max_predictions)
    if local is not None:  # the rows the cap kept, in the order written
        kept = {(p.query_id, p.reference_id) for p in predictions}
        records = [r for r in records if (r["query_id"], r["written_id"]) in kept]
    t_search = time.perf_counter()
    write_predictions_file(cfg.out, predictions)
    if local is not None:
        rio.write_text(cfg.verified_uri(),
                       "".join(json.dumps(r) + "\n" for r in records))  # fmt: skip
    summary: dict[str, Any] = {
        "out": cfg.out,
        "embeddings": emb,
        "index": cfg.index,
        "index_version": index.version,
        "model": run["model"],
        "fingerprint": run["fingerprint"],
        "score": "fused"
        if local is not None
        else ("raw" if cfg.raw_scores or index.normalizer is None else "normalised"),
        "verify": None
        if local is None
        else {
            "records": cfg.verified_uri(),
            "local_recall": recall,
            "verified": sum(1 for r in records if r["inliers"] >= local.config.min_inliers),
            "recalled": sum(1 for r in records if r["raw_score"] is None),
            "fused": local.fused.to_dict(),
        },
        "counts": {
            "queries": len(queries.uris) + len(failed),
            "embedded": len(queries.uris),
            "errors": len(failed),
            "references": index.ntotal,
            "predictions": len(predictions),
            "dropped_by_cap": before_cap - len(predictions),
            "queries_with_predictions": len({p.query_id for p in predictions}),
        },
        "timings": {
            "embed_seconds": round(t_embed - t0, 3),
            "load_index_seconds": round(t_load - t_embed, 3),
            "search_seconds": round(t_search - t_load, 3),
            "total_seconds": round(time.perf_counter() - t0, 3),
        },
        "errors": [{"uri": u, "error": e} for _, u, e in failed],
        "config": asdict(cfg),
    }
    log.info("match summary: %s", json.dumps(summary["counts"]))
    return summary


__all__ = [
    "CHALLENGE_CAP",
    "MatchConfig",
    "MatchError",
    "cap_predictions",
    "query_ids_of",
    "read_predictions_file",
    "reference_namer",
    "run_match",
    "search_index",
    "read_query_features",
    "to_predictions",
    "verify_predictions",
    "write_predictions_file",
]
