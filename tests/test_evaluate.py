"""`rdcd evaluate` end to end on small DISC-layout folders of real photos."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from rdcd import io as rio
from rdcd.cli import main
from rdcd.demo import build_demo_set, bundled_photos
from rdcd.evaluate import EvalConfig, LayoutError, evaluate, resolve_layout
from rdcd.metrics import micro_average_precision, read_ground_truth, read_predictions


def _source_photos(request) -> list[str]:
    try:
        photos = request.getfixturevalue("photos")
        return [str(p) for p in photos[:24]]
    except pytest.skip.Exception:
        return bundled_photos()


@pytest.fixture(scope="module")
def disc_root(tmp_path_factory, request) -> str:
    root = str(tmp_path_factory.mktemp("disc") / "data")
    counts = build_demo_set(_source_photos(request), root, copies=2, seed=1)
    assert counts["copies"] > 5 and counts["distractors"] >= 1
    return root


def test_evaluate_teacher_end_to_end(teacher, disc_root, tmp_path, capsys):
    out = str(tmp_path / "eval")
    assert (
        main(
            ["evaluate", "--disc-root", disc_root, "--model", "sscd", "--out", out, "--no-progress"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    assert f"{m['uap']:.4f}" in printed and f"{m['uap_sn']:.4f}" in printed
    gt = read_ground_truth(os.path.join(disc_root, "ground_truth.csv"))
    # metrics.json agrees with the ISC definition recomputed from the written predictions
    assert micro_average_precision(read_predictions(os.path.join(out, "predictions.csv")), gt) == (
        pytest.approx(m["uap"])
    )
    sn = read_predictions(os.path.join(out, "predictions_sn.csv"))
    assert micro_average_precision(sn, gt) == pytest.approx(m["uap_sn"])
    assert m["counts"]["queries"] == len(gt.queries) and m["counts"]["errors"] == 0
    assert m["counts"]["predictions"] == m["counts"]["queries"] * 10
    assert m["model"]["name"] == "sscd-onnx"
    # the teacher finds edited copies of real photos
    assert m["uap"] > 0.8 and m["recall_at_1"] > 0.8


def test_evaluate_student_with_bad_files_and_whitening(tiny_student, disc_root, tmp_path):
    root = str(tmp_path / "data")
    shutil.copytree(disc_root, root)
    (tmp_path / "data" / "queries" / "Q99998.jpg").write_bytes(b"")
    (tmp_path / "data" / "queries" / "Q99999.jpg").write_bytes(b"<html>oops</html>")
    out = str(tmp_path / "eval")
    m = evaluate(
        EvalConfig(disc_root=root, model=tiny_student, out=out, whiten=True, k=3, progress=False)
    )
    assert m["counts"]["errors"] == 2
    reasons = {os.path.basename(e["uri"]): e["error"] for e in m["errors"]}
    assert "zero-byte" in reasons["Q99998.jpg"] and "not an image" in reasons["Q99999.jpg"]
    preds = read_predictions(os.path.join(out, "predictions.csv"))
    assert len(preds) == 3 * m["counts"]["queries"]
    assert 0.0 <= m["uap"] <= 1.0 and m["model"]["dim"] == 64


def test_real_disc_names_are_found(tmp_path):
    for d in ("references", "dev_queries", "final_queries", "training"):
        (tmp_path / d).mkdir()
    (tmp_path / "final_ground_truth.csv").write_text("query_id,reference_id\n")
    (tmp_path / "dev_ground_truth.csv").write_text("query_id,reference_id\n")
    layout = resolve_layout(EvalConfig(disc_root=str(tmp_path)))
    assert layout.queries.endswith("dev_queries") and layout.background.endswith("training")
    assert layout.ground_truth.endswith("dev_ground_truth.csv")
    layout = resolve_layout(
        EvalConfig(disc_root=str(tmp_path), queries=str(tmp_path / "final_queries"))
    )
    assert layout.ground_truth.endswith("final_ground_truth.csv")


def test_layout_errors_are_clear(tmp_path, capsys):
    (tmp_path / "references").mkdir()
    (tmp_path / "queries").mkdir()
    with pytest.raises(LayoutError, match="ground-truth"):
        resolve_layout(EvalConfig(disc_root=str(tmp_path)))
    assert main(["evaluate", "--disc-root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "ground-truth" in capsys.readouterr().err


def test_evaluate_from_s3(tiny_student, disc_root, s3_bucket, tmp_path):
    base = f"s3://{s3_bucket}/disc"
    for f in rio.list_files(disc_root):
        rel = os.path.relpath(f.uri, disc_root)
        rio.write_bytes(f"{base}/{rel}", rio.read_bytes(f.uri))
    local = evaluate(
        EvalConfig(disc_root=disc_root, model=tiny_student, out=str(tmp_path / "a"), progress=False)
    )
    remote = evaluate(
        EvalConfig(disc_root=base, model=tiny_student, out=f"{base}/eval", progress=False)
    )
    assert remote["uap"] == pytest.approx(local["uap"])
    assert remote["counts"] == local["counts"]
    assert json.loads(rio.read_text(f"{base}/eval/metrics.json"))["uap"] == pytest.approx(
        local["uap"]
    )
