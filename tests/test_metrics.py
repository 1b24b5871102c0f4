"""DISC2021 micro-AP and friends on hand-built cases, and against a second formulation."""

from __future__ import annotations

import random

import numpy as np
import pytest

from rdcd.metrics import (
    GroundTruth,
    Match,
    MetricError,
    evaluate_predictions,
    micro_average_precision,
    read_ground_truth,
    read_predictions,
    recall_at_1,
    recall_at_precision,
    write_ground_truth,
    write_predictions,
)

GT = GroundTruth.from_rows([("q1", "r1"), ("q2", "r2"), ("q3", None)])


def test_hand_computed_uap():
    preds = [
        Match("q1", "r1", 0.9),
        Match("q3", "r9", 0.8),
        Match("q2", "r2", 0.7),
        Match("q2", "r5", 0.6),
    ]
    # ranks: T F T F -> precision at the hits 1/1 and 2/3 -> (1 + 2/3) / 2
    assert micro_average_precision(preds, GT) == pytest.approx((1 + 2 / 3) / 2)
    assert recall_at_1(preds, GT) == 1.0
    r, t = recall_at_precision(preds, GT, 0.9)
    assert r == 0.5 and t == pytest.approx(0.9)


def test_ties_rank_negatives_first():
    gt = GroundTruth.from_rows([("q1", "r1"), ("q3", None)])
    preds = [Match("q1", "r1", 0.8), Match("q3", "r9", 0.8)]
    assert micro_average_precision(preds, gt) == pytest.approx(0.5)
    # the order of the input does not matter
    assert micro_average_precision(preds[::-1], gt) == pytest.approx(0.5)
    # recall@1 is pessimistic too
    tie = [Match("q1", "r1", 0.5), Match("q1", "r2", 0.5)]
    assert recall_at_1(tie, gt) == 0.0


def test_missing_predictions_count_in_denominator():
    preds = [Match("q1", "r1", 0.9)]
    assert micro_average_precision(preds, GT) == pytest.approx(0.5)
    assert recall_at_1(preds, GT) == 0.5
    assert micro_average_precision([], GT) == 0.0


def test_distractor_predictions_only_hurt():
    clean = [Match("q1", "r1", 0.9), Match("q2", "r2", 0.8)]
    assert micro_average_precision(clean, GT) == 1.0
    noisy = clean + [Match("q3", "r1", 0.95)]
    assert micro_average_precision(noisy, GT) == pytest.approx((1 / 2 + 2 / 3) / 2)
    r, _ = recall_at_precision(noisy, GT, 0.9)
    assert r == 0.0


def test_threshold_cannot_split_equal_scores():
    gt = GroundTruth.from_rows([("q1", "r1"), ("q2", "r2")])
    preds = [Match("q1", "r1", 0.9), Match("q2", "r2", 0.5), Match("q2", "r7", 0.5)]
    # keeping 0.5 keeps both tied predictions: precision 2/3 < 0.9
    assert recall_at_precision(preds, gt, 0.9) == (0.5, 0.9)


def test_duplicates_are_rejected():
    preds = [Match("q1", "r1", 0.9), Match("q1", "r1", 0.3)]
    with pytest.raises(MetricError, match="duplicate"):
        micro_average_precision(preds, GT)
    with pytest.raises(MetricError, match="duplicate"):
        recall_at_1(preds, GT)


def test_non_finite_scores_are_rejected():
    with pytest.raises(MetricError, match="non-finite"):
        micro_average_precision([Match("q1", "r1", float("nan"))], GT)


def _isc_style_uap(preds: list[Match], gt: GroundTruth) -> float:
    """Second formulation: sum over ranks of (recall_i - recall_{i-1}) * precision_i, after a
    stable sort by (score desc, correct asc)."""
    rows = sorted(preds, key=lambda p: (-p.score, (p.query_id, p.reference_id) in gt.pairs))
    tp, prev_recall, ap = 0, 0.0, 0.0
    for i, p in enumerate(rows, start=1):
        tp += (p.query_id, p.reference_id) in gt.pairs
        recall = tp / len(gt.pairs)
        ap += (recall - prev_recall) * (tp / i)
        prev_recall = recall
    return ap


def test_agrees_with_second_formulation_on_random_cases():
    rng = random.Random(0)
    for trial in range(50):
        n_q, n_r = rng.randint(2, 30), rng.randint(2, 30)
        rows = [
            (f"q{i}", f"r{rng.randrange(n_r)}" if rng.random() < 0.6 else None) for i in range(n_q)
        ]
        gt = GroundTruth.from_rows(rows)
        if not gt.pairs:
            continue
        preds = []
        for q, _ in rows:
            for r in rng.sample(range(n_r), rng.randint(0, min(5, n_r))):
                preds.append(Match(q, f"r{r}", float(rng.randint(0, 6))))  # many ties
        assert micro_average_precision(preds, gt) == pytest.approx(_isc_style_uap(preds, gt)), trial


def test_perfect_and_worst():
    preds = [Match("q1", "r1", 1.0), Match("q2", "r2", 0.9), Match("q3", "r3", 0.1)]
    assert micro_average_precision(preds, GT) == 1.0
    worst = [Match("q3", "r3", 1.0), Match("q1", "r1", 0.1)]
    assert micro_average_precision(worst, GT) == pytest.approx(0.5 * 0.5)
    with pytest.raises(MetricError, match="no positive"):
        micro_average_precision(preds, GroundTruth.from_rows([("q9", None)]))


def test_csv_round_trip(tmp_path):
    preds = [Match("Q00001", "R000002", 0.123456789), Match("Q00002", "R000003", -0.5)]
    write_predictions(str(tmp_path / "p.csv"), preds)
    back = read_predictions(str(tmp_path / "p.csv"))
    assert [(p.query_id, p.reference_id) for p in back] == [
        ("Q00001", "R000002"),
        ("Q00002", "R000003"),
    ]
    assert np.allclose([p.score for p in back], [0.123456789, -0.5], atol=1e-8)
    write_ground_truth(str(tmp_path / "gt.csv"), [("Q1", "R1"), ("Q2", None)])
    gt = read_ground_truth(str(tmp_path / "gt.csv"))
    assert gt.pairs == {("Q1", "R1")} and gt.queries == {"Q1", "Q2"}
    assert (tmp_path / "gt.csv").read_text().splitlines()[2] == "Q2,"


def test_bad_prediction_rows(tmp_path):
    (tmp_path / "p.csv").write_text("query_id,reference_id,score\nQ1,R1,high\n")
    with pytest.raises(MetricError, match="non-numeric"):
        read_predictions(str(tmp_path / "p.csv"))
    (tmp_path / "p.csv").write_text("Q1,R1\n")
    with pytest.raises(MetricError, match="query_id,reference_id,score"):
        read_predictions(str(tmp_path / "p.csv"))


def test_evaluate_predictions_keys():
    m = evaluate_predictions([Match("q1", "r1", 0.9)], GT)
    assert m["n_gt_pairs"] == 2 and m["n_queries"] == 3 and m["uap"] == 0.5
