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
from dataclasses import dataclass

import faiss
import numpy as np

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
    def fit(cls, background: np.ndarray, dim: int | None = None, eps: float = 1e-6) -> Whitening:
        x = _as_matrix(background, "background").astype(np.float64)
        if len(x) < 2:
            raise ValueError("whitening needs at least two background descriptors")
        mean = x.mean(axis=0)
        cov = np.cov(x - mean, rowvar=False)
        eigval, eigvec = np.linalg.eigh(cov)
        order = np.argsort(eigval)[::-1]
        eigval, eigvec = eigval[order], eigvec[:, order]
        dim = min(dim or x.shape[1], x.shape[1], len(x) - 1)
        proj = eigvec[:, :dim] / np.sqrt(eigval[:dim] + eps)
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
