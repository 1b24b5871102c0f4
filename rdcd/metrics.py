"""DISC2021 / ISC2021 matching-track metrics, and the CSV formats they read.

Micro average precision (µAP) ranks every prediction of every query in one global list by score.
With n_gt ground-truth pairs and the list sorted by decreasing score,

    µAP = (1 / n_gt) * sum over correct predictions at rank i of precision@i

Ties are broken pessimistically (a wrong prediction ranks before a right one of equal score), so
a constant-score submission cannot look good by luck. Ground-truth pairs that are never predicted
add nothing to the sum but still count in n_gt. Queries whose ground truth is empty (distractors)
only contribute false positives. Duplicate (query, reference) predictions are an error, as in the
challenge's submission check.
"""

from __future__ import annotations

import csv
import io as _io
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from rdcd import io as rio


class MetricError(ValueError):
    """Predictions or ground truth that cannot be scored (duplicates, bad rows)."""


class Match(NamedTuple):
    query_id: str
    reference_id: str
    score: float


@dataclass(frozen=True)
class GroundTruth:
    """`pairs`: the (query, reference) copies; `queries`: every query, distractors included."""

    pairs: frozenset[tuple[str, str]]
    queries: frozenset[str]

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[str, str | None]]) -> GroundTruth:
        pairs, queries = set(), set()
        for q, r in rows:
            queries.add(q)
            if r:
                pairs.add((q, r))
        return cls(frozenset(pairs), frozenset(queries))


@dataclass(frozen=True)
class PrecisionRecall:
    """The curve over the global ranking: one point per prediction, in rank order."""

    precision: np.ndarray
    recall: np.ndarray
    scores: np.ndarray
    correct: np.ndarray


def check_unique(predictions: list[Match]) -> None:
    seen: set[tuple[str, str]] = set()
    for p in predictions:
        key = (p.query_id, p.reference_id)
        if key in seen:
            raise MetricError(f"duplicate prediction for query {key[0]!r}, reference {key[1]!r}")
        seen.add(key)


def precision_recall(predictions: list[Match], gt: GroundTruth) -> PrecisionRecall:
    """Precision and recall after each prediction of the pessimistic global ranking."""
    check_unique(predictions)
    for p in predictions:
        if not math.isfinite(p.score):
            raise MetricError(f"non-finite score {p.score} for {p.query_id},{p.reference_id}")
    scores = np.array([p.score for p in predictions], dtype=np.float64)
    correct = np.array([(p.query_id, p.reference_id) in gt.pairs for p in predictions], dtype=bool)
    # lexsort: last key is primary. Decreasing score; among equal scores, wrong (False) first.
    order = np.lexsort((correct, -scores))
    scores, correct = scores[order], correct[order]
    tp = np.cumsum(correct)
    ranks = np.arange(1, len(correct) + 1)
    n_gt = max(len(gt.pairs), 1)
    precision = tp / np.maximum(ranks, 1) if len(correct) else np.zeros(0)
    return PrecisionRecall(precision, tp / n_gt, scores, correct)


def micro_average_precision(predictions: list[Match], gt: GroundTruth) -> float:
    if not gt.pairs:
        raise MetricError("ground truth has no positive pairs: µAP is undefined")
    pr = precision_recall(predictions, gt)
    return float(pr.precision[pr.correct].sum() / len(gt.pairs))


def recall_at_precision(
    predictions: list[Match], gt: GroundTruth, min_precision: float = 0.9
) -> tuple[float, float | None]:
    """Highest recall over the thresholds whose precision is at least `min_precision`, with that
    threshold (the score of the last prediction kept); (0.0, None) if no threshold qualifies."""
    pr = precision_recall(predictions, gt)
    # Only cut between distinct scores: a threshold keeps every prediction of equal score.
    last_of_score = np.ones(len(pr.scores), dtype=bool)
    if len(pr.scores) > 1:
        last_of_score[:-1] = pr.scores[:-1] != pr.scores[1:]
    ok = np.flatnonzero(last_of_score & (pr.precision >= min_precision))
    if len(ok) == 0:
        return 0.0, None
    best = ok[np.argmax(pr.recall[ok])]
    return float(pr.recall[best]), float(pr.scores[best])


def recall_at_1(predictions: list[Match], gt: GroundTruth) -> float:
    """Share of ground-truth pairs whose reference is its query's top-scored prediction
    (ties broken pessimistically, as for µAP)."""
    if not gt.pairs:
        raise MetricError("ground truth has no positive pairs: recall@1 is undefined")
    check_unique(predictions)
    best: dict[str, tuple[float, bool, str]] = {}
    for p in predictions:
        is_right = (p.query_id, p.reference_id) in gt.pairs
        cur = best.get(p.query_id)
        # Higher score wins; at equal score a wrong prediction wins (pessimistic).
        if cur is None or p.score > cur[0] or (p.score == cur[0] and cur[1] and not is_right):
            best[p.query_id] = (p.score, is_right, p.reference_id)
    hits = sum(1 for q, r in gt.pairs if q in best and best[q][2] == r)
    return hits / len(gt.pairs)


def evaluate_predictions(
    predictions: list[Match], gt: GroundTruth
) -> dict[str, float | int | None]:
    """All matching metrics in one dict, as `metrics.json` stores them."""
    r90, t90 = recall_at_precision(predictions, gt, 0.9)
    return {
        "uap": micro_average_precision(predictions, gt),
        "recall_at_p90": r90,
        "threshold_at_p90": t90,
        "recall_at_1": recall_at_1(predictions, gt),
        "n_predictions": len(predictions),
        "n_gt_pairs": len(gt.pairs),
        "n_queries": len(gt.queries),
    }


# ---- CSV formats -------------------------------------------------------------------------


def _rows(text: str, uri: str) -> list[list[str]]:
    rows = [r for r in csv.reader(_io.StringIO(text)) if r and any(c.strip() for c in r)]
    if rows and rows[0] and rows[0][0].strip().lower() == "query_id":
        rows = rows[1:]
    return rows


def read_ground_truth(uri: str) -> GroundTruth:
    """DISC2021 ground truth: `query_id,reference_id`; an empty reference marks a distractor."""
    out = []
    for i, row in enumerate(_rows(rio.read_text(uri), uri), start=1):
        if len(row) < 1 or not row[0].strip():
            raise MetricError(f"{uri}: row {i} has no query_id: {row}")
        ref = row[1].strip() if len(row) > 1 else ""
        out.append((row[0].strip(), ref or None))
    return GroundTruth.from_rows(out)


def read_predictions(uri: str) -> list[Match]:
    """`query_id,reference_id,score` CSV (header optional)."""
    out = []
    for i, row in enumerate(_rows(rio.read_text(uri), uri), start=1):
        if len(row) != 3:
            raise MetricError(f"{uri}: row {i} needs query_id,reference_id,score, got {row}")
        try:
            score = float(row[2])
        except ValueError as exc:
            raise MetricError(f"{uri}: row {i} has a non-numeric score {row[2]!r}") from exc
        out.append(Match(row[0].strip(), row[1].strip(), score))
    return out


def write_predictions(uri: str, predictions: Iterable[Match]) -> None:
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["query_id", "reference_id", "score"])
    for p in predictions:
        w.writerow([p.query_id, p.reference_id, f"{p.score:.9g}"])
    rio.write_text(uri, buf.getvalue())


def write_ground_truth(uri: str, rows: Iterable[tuple[str, str | None]]) -> None:
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["query_id", "reference_id"])
    for q, r in rows:
        w.writerow([q, r or ""])
    rio.write_text(uri, buf.getvalue())
