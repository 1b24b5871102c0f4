"""Exact k-NN, score normalisation and whitening against plain numpy."""

from __future__ import annotations

import numpy as np
import pytest

from rdcd.search import ScoreNormalizer, Whitening, knn, search


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_knn_matches_brute_force():
    q, r = _unit(20, 32, 0), _unit(300, 32, 1)
    scores, idx = knn(q, r, 5)
    sims = q @ r.T
    expect = np.argsort(-sims, axis=1)[:, :5]
    assert np.array_equal(idx, expect)
    assert np.allclose(scores, np.take_along_axis(sims, expect, 1), atol=1e-5)


def test_knn_edge_cases():
    q, r = _unit(3, 8, 0), _unit(2, 8, 1)
    s, i = knn(q, r, 10)
    assert s.shape == (3, 2)  # k capped at the number of references
    with pytest.raises(ValueError, match="dimension mismatch"):
        knn(q, _unit(4, 16, 2), 1)


def test_score_normalisation_formula():
    q, r, bg = _unit(10, 16, 0), _unit(50, 16, 1), _unit(40, 16, 2)
    norm = ScoreNormalizer(bg, beta=0.7, n=3)
    found = search(q, r, 4, norm)
    top3 = np.sort(q @ bg.T, axis=1)[:, -3:].mean(axis=1)
    assert np.allclose(found.scores, found.raw_scores - 0.7 * top3[:, None], atol=1e-5)
    # normalisation shifts each query's scores by a constant: its ranking is unchanged
    assert np.array_equal(np.argsort(-found.scores, 1), np.argsort(-found.raw_scores, 1))


def test_score_normalisation_demotes_generic_queries():
    """A query close to everything (a 'generic' image) gets a larger penalty."""
    rng = np.random.default_rng(0)
    common = _unit(1, 16, 9)[0]
    bg = _unit(30, 16, 3) * 0.3 + common
    bg /= np.linalg.norm(bg, axis=1, keepdims=True)
    generic, specific = common[None], _unit(1, 16, 4)
    norm = ScoreNormalizer(bg)
    assert norm.bias(generic)[0] > norm.bias(specific)[0] + 0.3
    assert rng is not None


def test_whitening_decorrelates():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 8)) @ rng.normal(size=(8, 8))
    w = Whitening.fit(x)
    y = (x - w.mean) @ w.projection
    assert np.allclose(np.cov(y, rowvar=False), np.eye(8), atol=0.05)
    out = w.apply(x[:5])
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert Whitening.fit(x, dim=4).apply(x[:3]).shape == (3, 4)
