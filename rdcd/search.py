"""The query path: nearest references by inner product, score normalisation, whitening.

Serve, offline matching and evaluation all call this module, so a score means the same thing
wherever it is computed. Descriptors are L2-normalised, so inner product = cosine similarity.

Score normalisation (SSCD, Pizzi et al. 2022): a query that resembles everything (a blank sky, a
screenshot template) gets high raw similarities to many references. Subtracting `beta` times the
mean of its top-`n` similarities to a background set of unrelated images makes one threshold work
for all queries, which is what a global metric such as µAP (and a production threshold) needs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import faiss
import numpy as np

from rdcd.local import FusedScore, LocalConfig, LocalFeatures, Verification, verify

log = logging.getLogger(__name__)


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-d array of descriptors, got shape {x.shape}")
    return x


def knn(queries: np.ndarray, references: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-`k` references per query by inner product.

    Returns (scores, indices), both (n_queries, min(k, n_refs)), best first.
    """
    q, r = _as_matrix(queries, "queries"), _as_matrix(references, "references")
    if q.shape[1] != r.shape[1]:
        raise ValueError(
            f"dimension mismatch: queries are {q.shape[1]}-d, references {r.shape[1]}-d"
        )
    k = min(k, len(r))
    if k == 0 or len(q) == 0:
        return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
    index = faiss.IndexFlatIP(r.shape[1])
    index.add(r)
    scores, ids = index.search(q, k)
    return scores, ids


@dataclass
class ScoreNormalizer:
    """score' = score - beta * mean(top-n similarities of the query to the background)."""

    background: np.ndarray
    beta: float = 1.0
    n: int = 3

    def __post_init__(self) -> None:
        self.background = _as_matrix(self.background, "background")
        if len(self.background) == 0:
            raise ValueError("score normalisation needs a non-empty background set")
        self._index = faiss.IndexFlatIP(self.background.shape[1])
        self._index.add(self.background)

    def bias(self, queries: np.ndarray) -> np.ndarray:
        """beta * mean top-n background similarity, one value per query."""
        n = min(self.n, len(self.background))
        sims, _ = self._index.search(_as_matrix(queries, "queries"), n)
        return self.beta * sims.mean(axis=1)

    def normalize(self, queries: np.ndarray, scores: np.ndarray) -> np.ndarray:
        return scores - self.bias(queries)[:, None]


@dataclass
class Whitening:
    """PCA whitening fitted on a background set, followed by L2 normalisation.

    Descriptors of a new domain are often anisotropic (a few directions dominate every cosine);
    whitening spreads the variance so that similarities use all dimensions.
    """

    mean: np.ndarray
    projection: np.ndarray  # (d_in, d_out)

    @classmethod
    def fit(cls, background: np.ndarray, dim: int | None = None, eps: float = 1e-6,
            power: float = 0.5) -> Whitening:  # fmt: skip
        """`power` 0.5 is PCA whitening (unit variance per axis); smaller powers whiten only
        partly (0: a rotation), which keeps low-variance noise axes from being blown up."""
        x = _as_matrix(background, "background").astype(np.float64)
        if len(x) < 2:
            raise ValueError("whitening needs at least two background descriptors")
        mean = x.mean(axis=0)
        cov = np.cov(x - mean, rowvar=False)
        eigval, eigvec = np.linalg.eigh(cov)
        order = np.argsort(eigval)[::-1]
        eigval, eigvec = eigval[order], eigvec[:, order]
        dim = min(dim or x.shape[1], x.shape[1], len(x) - 1)
        proj = eigvec[:, :dim] / (np.clip(eigval[:dim], 0.0, None) + eps) ** power
        return cls(mean.astype(np.float32), proj.astype(np.float32))

    def apply(self, x: np.ndarray) -> np.ndarray:
        y = (_as_matrix(x, "descriptors") - self.mean) @ self.projection
        return (y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)).astype(np.float32)


@dataclass(frozen=True)
class Neighbours:
    """Search results for a batch of queries; row i belongs to query i."""

    indices: np.ndarray  # (n_queries, k) int64 reference row numbers, -1 = none
    raw_scores: np.ndarray  # (n_queries, k) cosine similarities
    scores: np.ndarray  # (n_queries, k) after score normalisation (= raw_scores without it)


def search(
    queries: np.ndarray,
    references: np.ndarray,
    k: int = 10,
    normalizer: ScoreNormalizer | None = None,
) -> Neighbours:
    """Top-`k` references per query, with normalised scores when a normaliser is given."""
    raw, idx = knn(queries, references, k)
    scores = normalizer.normalize(queries, raw) if normalizer is not None else raw
    return Neighbours(idx, raw, scores)


# ---- sharded indexes ------------------------------------------------------------------------


class FingerprintMismatchError(ValueError):
    """Descriptors of one model searched against an index of another: the scores would be noise."""


def check_fingerprint(expected: str, found: str | None, where: str) -> None:
    """Refuse `found` descriptors for an index (or shard) built from the model `expected`."""
    if found is None:
        raise FingerprintMismatchError(
            f"{where}: the query descriptors carry no model fingerprint; the index holds model "
            f"{expected[:12]} and refuses descriptors it cannot attribute"
        )
    if found != expected:
        raise FingerprintMismatchError(
            f"{where} was built from model {expected[:12]}, the query descriptors come from "
            f"model {found[:12]}: embed the queries with the index's model, or build an index of "
            "this model"
        )


def merge_topk(
    parts: list[tuple[np.ndarray, np.ndarray]], k: int, n_queries: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard `(scores, ids)` into the global top-`k` per query (ids -1 = no result)."""
    if not parts:
        return np.full((n_queries, 0), -np.inf, np.float32), np.full((n_queries, 0), -1, np.int64)
    scores = np.concatenate([p[0] for p in parts], axis=1).astype(np.float32)
    ids = np.concatenate([p[1] for p in parts], axis=1).astype(np.int64)
    scores = np.where(ids < 0, -np.inf, scores)
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


@dataclass
class Shard:
    """One loaded FAISS shard: the index (reference ids as FAISS labels), the id -> URI table and
    the ids deleted since it was built (tombstones), which searches skip."""

    name: str
    index: faiss.Index
    ids: np.ndarray  # int64, sorted: the reference ids this shard holds
    uris: list[str]  # uris[i] belongs to ids[i]
    tombstones: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # sorted

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def live(self) -> int:
        return self.ntotal - len(self.tombstones)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` live references of this shard, (scores, ids), -1 ids where there are fewer.

        It asks FAISS for `k` + (tombstones in this shard) results, so deleted references can
        never push a live one out of the top `k`."""
        q = _as_matrix(queries, "queries")
        want = min(self.ntotal, k + len(self.tombstones))
        if want == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        scores, ids = self.index.search(q, want)
        if len(self.tombstones):
            dead = np.isin(ids, self.tombstones)
            ids = np.where(dead, -1, ids)
        scores = np.where(ids < 0, -np.inf, scores)
        order = np.argsort(ids < 0, axis=1, kind="stable")[:, :k]
        scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
        if ids.shape[1] < k:
            pad = k - ids.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        return scores.astype(np.float32), ids.astype(np.int64)

    def uri_of(self, ids: np.ndarray) -> list[str | None]:
        """The URI of each id, None where this shard does not hold it."""
        ids = np.asarray(ids, np.int64)
        if not len(self.ids):
            return [None] * len(ids)
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        found = self.ids[pos] == ids
        return [
            self.uris[p] if f else None for p, f in zip(pos.tolist(), found.tolist(), strict=True)
        ]


@dataclass(frozen=True)
class Matches:
    """Results of a sharded search; row i belongs to query i, best first, ids -1 = none."""

    ids: np.ndarray  # (n, k) int64 reference ids
    uris: list[list[str | None]]
    raw_scores: np.ndarray  # (n, k) cosine similarities (exact when the index re-ranks)
    scores: np.ndarray  # (n, k) after score normalisation (= raw_scores without it)
    missing_shards: tuple[str, ...] = ()


@dataclass
class ShardedIndex:
    """Every shard of one published index version, searched as one index.

    The query path is: each shard's top-k (FAISS; an IVF shard re-ranks its candidates with exact
    inner products from its refine stage) -> merge -> score normalisation against the background
    set -> the caller's threshold. Descriptors of another model are refused, never searched."""

    shards: list[Shard]
    fingerprint: str
    version: int
    dim: int
    normalizer: ScoreNormalizer | None = None
    info: dict = field(default_factory=dict)

    @property
    def ntotal(self) -> int:
        return sum(s.live for s in self.shards)

    def search(self, queries: np.ndarray, k: int = 10, *, fingerprint: str | None) -> Matches:
        check_fingerprint(self.fingerprint, fingerprint, f"index version {self.version}")
        q = _as_matrix(queries, "queries")
        if q.shape[1] != self.dim:
            raise ValueError(f"queries are {q.shape[1]}-d, the index is {self.dim}-d")
        raw, ids = merge_topk([s.search(q, k) for s in self.shards], k, len(q))
        return self.finish(q, raw, ids)

    def finish(self, queries: np.ndarray, raw: np.ndarray, ids: np.ndarray,
               missing: tuple[str, ...] = ()) -> Matches:  # fmt: skip
        """Score-normalise merged results and attach URIs (also used by Serve's ingress)."""
        scores = raw
        if self.normalizer is not None and raw.shape[1]:
            scores = np.where(ids < 0, -np.inf, self.normalizer.normalize(queries, raw))
        return Matches(ids, [self.uris_of(row) for row in ids], raw, scores, missing)

    def uris_of(self, ids: np.ndarray) -> list[str | None]:
        ids = np.asarray(ids, np.int64)
        out: list[str | None] = [None] * len(ids)
        for shard in self.shards:
            for i, uri in enumerate(shard.uri_of(ids)):
                if uri is not None and ids[i] >= 0:
                    out[i] = uri
        return out


# ---- local verification (global + local, the ISC2021 matching-track design) -----------------


@dataclass(frozen=True)
class VerifiedCandidate:
    """One candidate reference of a query after local verification."""

    id: int
    global_score: float  # the global (possibly score-normalised) similarity it was proposed with
    inliers: int
    score: float  # FusedScore of (global_score, inliers): higher = more similar, in (0, 1)
    verification: Verification
    votes: int = 0  # local-recall votes (0: proposed by the global search only)

    def to_dict(self) -> dict:
        return {"reference_id": int(self.id), "score": float(self.score),
                "global_score": float(self.global_score), "votes": int(self.votes),
                **self.verification.to_dict()}  # fmt: skip


def verify_candidates(
    query: LocalFeatures,
    candidates: Sequence[int],
    global_scores: Sequence[float],
    features_of: Callable[[Sequence[int]], dict[int, LocalFeatures]],
    fused: FusedScore,
    cfg: LocalConfig,
    votes: dict[int, int] | None = None,
) -> list[VerifiedCandidate]:
    """Verify each candidate (ids < 0 are padding and skipped, a repeated id keeps its first,
    best-ranked global score) and rescore it with `fused`; sorted by fused score, best first,
    ties by global score then id, so every query path orders results the same way.

    `features_of(ids)` returns the stored local features of those references; a reference it
    does not return (features never extracted, an image that failed) is kept with zero inliers:
    verification can only add evidence, so a missing feature set falls back to the global score
    alone."""
    if len(candidates) != len(global_scores):
        raise ValueError(f"{len(candidates)} candidates but {len(global_scores)} global scores")
    seen: dict[int, float] = {}
    for rid, g in zip(candidates, global_scores, strict=True):
        rid = int(rid)
        if rid >= 0 and rid not in seen and np.isfinite(g):
            seen[rid] = float(g)
    if not seen:
        return []
    ids = list(seen)
    feats = features_of(ids)
    missing = [r for r in ids if r not in feats]
    if missing:
        log.warning("no local features for %d of %d candidates (e.g. %s): global score only",
                    len(missing), len(ids), missing[:3])  # fmt: skip
    checks = [verify(query, feats[r], cfg) if r in feats else Verification.none() for r in ids]
    inl = np.array([v.inliers for v in checks], np.float64)
    scores = fused(np.array([seen[r] for r in ids]), inl)
    out = [
        VerifiedCandidate(r, seen[r], v.inliers, float(s), v, int((votes or {}).get(r, 0)))
        for r, v, s in zip(ids, checks, scores.tolist(), strict=True)
    ]
    out.sort(key=lambda c: (-c.score, -c.global_score, c.id))
    return out


def local_recall(
    global_ids: Sequence[int],
    global_scores: Sequence[float],
    voted: Sequence[tuple[int, int]],
    score_of: Callable[[Sequence[int]], dict[int, float]] | None = None,
    floor: float | None = None,
) -> tuple[list[int], list[float], dict[int, int]]:
    """The global candidates plus the references local recall voted for, as (ids, global scores,
    votes by id) ready for `verify_candidates`.

    A voted reference outside the global top-k has no global score. `score_of(ids)` supplies one
    when the caller can (the query's cosine to the stored descriptors of those references);
    otherwise it gets `floor`, by default the lowest global score of the candidates: a reference
    missing from the top-k scores at most that, so the bound keeps its global evidence no better
    than the weakest candidate's, and only its inliers can lift it."""
    ids = [int(i) for i in global_ids]
    scores = [float(s) for s in global_scores]
    have = {i for i in ids if i >= 0}
    extra = [int(r) for r, _ in voted if int(r) not in have]
    finite = [s for i, s in zip(ids, scores, strict=True) if i >= 0 and np.isfinite(s)]
    bound = floor if floor is not None else (min(finite) if finite else 0.0)
    known = score_of(extra) if (score_of is not None and extra) else {}
    for r in extra:
        ids.append(r)
        scores.append(float(known.get(r, bound)))
    return ids, scores, {int(r): int(v) for r, v in voted}
