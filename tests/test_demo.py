"""`rdcd demo` end to end in its reduced setting (`--quick`): fine-tune, Ray Data embedding, a
sharded index, Ray Serve answering real HTTP queries, evaluation through the index and the report,
on the photos that scikit-image and matplotlib ship. Plus the inputs it must refuse."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from rdcd.cli import main
from rdcd.demo import DemoConfig, bundled_photos, train_sizes


def _serve_running() -> bool:
    from ray.serve.context import _get_global_client

    return _get_global_client(raise_if_no_controller_running=False) is not None


def test_demo_end_to_end_reduced(ray_local, teacher, tmp_path, capsys):
    assert not _serve_running()
    out = tmp_path / "demo"
    (out / "data").mkdir(parents=True)
    (out / "data" / "stale.jpg").write_bytes(b"left by an earlier run")
    (out / "mine.txt").write_text("not the demo's")
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "demo.json").read_text())

    # every stage ran, in order, on the Ray instance that was already there (left running)
    assert [s["stage"] for s in result["stages"]] == [
        "data", "fine-tune", "choose", "embed", "index", "serve", "evaluate", "report"
    ]  # fmt: skip
    assert result["ray_started_here"] is False and ray_local.is_initialized()
    assert not _serve_running()  # the demo started Serve, so it shut it down
    assert not (out / "data" / "stale.jpg").exists() and (out / "mine.txt").exists()

    # a real fine-tune with a loss per step, and both students evaluated before choosing
    ft = result["fine_tune"]
    assert ft["steps"] == 3 and len(ft["history"]) == 3
    assert all(h["loss"] > 0 for h in ft["history"])
    assert set(result["flat_evaluations"]) == {"start", "fine-tuned"}
    assert result["served"]["which"] in ("start", "fine-tuned")

    # embedding parts, two index shards, every query answered over HTTP
    assert len(list((out / "embeddings" / "references" / "_commits").glob("*.json"))) == 2
    manifest = json.loads((out / "index" / "v1" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 2 and manifest["background"] is not None
    n = result["demo_set"]
    http = result["http"]
    assert http["queries"] == http["answered"] == n["queries"]
    assert http["agree_with_offline"] == http["answered"]  # HTTP == the offline search path
    served = json.loads((out / "served.json").read_text())
    assert {r["status"] for r in served} == {200}
    assert all(r["answer"]["index_version"] == 1 for r in served)

    # the copies are found, and the evaluation through the index says so too
    assert result["outcome"]["found"] >= n["copies"] // 2
    ev = result["evaluation"]
    assert ev["uap"] > 0.8 and ev["index"]["version"] == 1
    assert ev["counts"]["references"] == n["references"]

    # the report: files, and every figure the demo printed
    report = out / "report" / "report.html"
    assert f"report: {report}" in printed
    for name in ("precision_recall.png", "scores.png", "gallery-1.png", "training.png"):
        with Image.open(out / "report" / name) as img:
            assert img.format == "PNG" and img.width > 300
    page = report.read_text()
    figures = re.findall(r"\b\d\.\d{4}\b", printed)
    assert len(figures) >= 8
    missing = [f for f in figures if f not in page]
    assert not missing, missing
    labels = ("copies found over HTTP", "false positives over HTTP",
              "HTTP answers equal to offline search", "HTTP latency, median")  # fmt: skip
    seen = 0
    for line in printed.splitlines():
        for label in labels:
            if line.startswith(label):
                seen += 1
                assert f"<td>{label}</td><td" in page and line[len(label) :].strip() in page
    assert seen == len(labels)
    assert f"{ev['uap']:.4f}" in page and "Found " in page


def test_demo_refuses_bad_input_clearly(tmp_path, capsys):
    few = tmp_path / "few"
    few.mkdir()
    for p in bundled_photos()[:3]:
        Image.open(p).convert("RGB").save(few / (p.rsplit("/", 1)[-1] + ".jpg"))
    (few / "broken.jpg").write_bytes(b"<html>not a photo</html>")
    assert main(["demo", "--images", str(few), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "at least 6 photos" in err
    assert main(["demo", "--images", str(tmp_path / "nothing-here"), "--out",
                 str(tmp_path / "o")]) == 2  # fmt: skip
    assert "cannot list" in capsys.readouterr().err
    assert main(["demo", "--out", "s3://bucket/demo"]) == 2
    assert "local --out" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_photos"):
        DemoConfig(max_photos=3).validate()


def test_fine_tune_sizes_respect_the_queue_guard():
    for n in (4, 7, 14, 26, 100, 1000):
        batch, queue, memory = train_sizes(n, 8)
        assert 2 <= batch <= 8 and queue % batch == 0 and memory % batch == 0
        assert queue <= n // 2  # list_training_images refuses a queue over half the images
    with pytest.raises(ValueError, match="at least 4"):
        train_sizes(3, 8)
