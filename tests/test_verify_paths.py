"""Verification through every query path: `rdcd match --verify` equals `/v1/match?verify=true`
over real HTTP against Ray Serve, tombstoned references never come back (not even through local
recall, before or after compaction), and a version without local data refuses to verify.

Real parts only: photos from ../shared/data with real edits (small crops, mirrors, rotations) as
queries, `rdcd embed --local-features` (Ray Data), a 2-shard index with local features, a fitted
fused score and a local-recall index, one Serve app on 127.0.0.1. The descriptor model is a tiny
random student on purpose: its global ranking is noise, so what finds the copies here is local
recall and verification."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import free_port, start_serve_app
from PIL import Image

from rdcd.cli import main

N_REFS, K = 8, 2


def _queries(refs: list[Path], unrelated: Path, folder: Path) -> dict[str, int | None]:
    """Edited copies of the first five references (what a global descriptor misses: a small
    crop, a mirror, a rotation, a crop under a colour change) and one unrelated photo."""
    folder.mkdir(parents=True)
    truth: dict[str, int | None] = {}
    for i, path in enumerate(refs[:5]):
        img = Image.open(path).convert("RGB")
        w, h = img.size
        if i == 0:
            img = img.crop((w // 3, h // 3, w // 3 + w // 3, h // 3 + h // 3))
        elif i == 1:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        elif i == 2:
            img = img.rotate(90, expand=True)
        elif i == 3:
            img = img.crop((0, 0, w // 2, h // 2)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            img = img.convert("L").convert("RGB").resize((w // 2, h // 2))
        img.save(folder / f"Q{i:05d}.jpg", quality=85)
        truth[f"Q{i:05d}"] = i
    Image.open(unrelated).convert("RGB").save(folder / "Q00099.jpg", quality=85)
    truth["Q00099"] = None
    return truth


@pytest.fixture(scope="module")
def world(ray_local, tiny_student, photos, tmp_path_factory):
    """References embedded with local features, a published 2-shard index of them, and the Serve
    app over that index (one start-up for the module)."""
    from ray import serve

    from rdcd.embed import EmbedJobConfig, run_embed_job
    from rdcd.index import IndexConfig, build_index
    from rdcd.serve import ServeConfig

    tmp = tmp_path_factory.mktemp("verify")
    refs_dir = tmp / "references"
    refs_dir.mkdir()
    refs = []
    for i, src in enumerate(photos[20 : 20 + N_REFS]):
        path = refs_dir / f"R{i:06d}.jpg"
        Image.open(src).convert("RGB").save(path, quality=92)
        refs.append(path)
    truth = _queries(refs, photos[40], tmp / "queries")
    run = str(tmp / "run-refs")
    run_embed_job(EmbedJobConfig(images=str(refs_dir), out=run, model=tiny_student, shard_size=4,
                                 batch_size=4, local_features=True, progress=False))  # fmt: skip
    root = str(tmp / "index")
    manifest = build_index(IndexConfig(embeddings=run, out=root, shards=2, task_cpus=0.5))
    # the sharded layout: query features travel from the Embedder deployment through a handle
    cfg = ServeConfig(index=root, model=tiny_student, port=free_port(), embedder_cpus=0.5,
                      name="rdcd-verify-test", poll_interval_s=1.0, layout="sharded")  # fmt: skip
    url = start_serve_app(cfg, timeout_s=180)
    yield {"tmp": tmp, "root": root, "url": url, "truth": truth, "model": tiny_student,
           "queries": str(tmp / "queries"), "emb": str(tmp / "query-embeddings"),
           "manifest": manifest, "run": run}  # fmt: skip
    serve.shutdown()


def _match(world, out: Path, *extra: str) -> list[dict]:
    """`rdcd match --verify` (k=K, integer reference ids); its per-row verification records."""
    argv = ["match", "--queries", world["queries"], "--index", world["root"], "--model",
            world["model"], "--out", str(out), "--embeddings", world["emb"], "--k", str(K),
            "--reference-ids", "id", "--verify", "--no-progress", *extra]  # fmt: skip
    assert main(argv) == 0
    lines = Path(str(out).rsplit(".", 1)[0] + ".verified.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _http(world, qid: str, **params) -> requests.Response:
    data = (Path(world["queries"]) / f"{qid}.jpg").read_bytes()
    return requests.post(f"{world['url']}/v1/match", data=data, timeout=120,
                         params={"k": K, **params})  # fmt: skip


def _wait_for_version(world, version: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = requests.get(f"{world['url']}/v1/index", timeout=10).json()
        if info["version"] == version:
            return
        time.sleep(0.5)
    pytest.fail(f"the ingress did not switch to v{version} within {timeout_s:.0f} s")


def test_match_verify_equals_http(world, tmp_path, capsys):
    records = _match(world, tmp_path / "preds.csv")
    by_query: dict[str, list[dict]] = {}
    for r in records:
        by_query.setdefault(r["query_id"], []).append(r)
    assert sorted(by_query) == sorted(world["truth"])
    for qid in world["truth"]:
        answer = _http(world, qid, verify="true")
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["verified"] and body["score"] == "fused"
        assert body["threshold"] == world["manifest"]["local"]["fused"]["threshold"]
        served, offline = body["matches"], by_query[qid]
        assert [m["reference_id"] for m in served] == [r["reference_id"] for r in offline], qid
        assert [m["inliers"] for m in served] == [r["inliers"] for r in offline], qid
        for m, r in zip(served, offline, strict=True):
            assert abs(m["score"] - r["score"]) <= 1e-6, (qid, m, r)
            assert (m["raw_score"] is None) == (r["raw_score"] is None), (qid, m, r)
            if m["raw_score"] is not None:
                assert abs(m["raw_score"] - r["raw_score"]) <= 1e-6
            assert m["region"] == r["region"] and m["is_copy"] == r["is_copy"]
    # not only equal plumbing: the edited copies verify against their originals (found by local
    # recall where the noise of the random global descriptor missed them), the unrelated does not
    min_inliers = world["manifest"]["local"]["config"]["min_inliers"]
    found = 0
    for qid, ref in world["truth"].items():
        top = by_query[qid][0]
        if ref is None:
            assert top["inliers"] < min_inliers and not top["is_copy"], top
        elif top["reference_id"] == ref and top["inliers"] >= min_inliers and top["is_copy"]:
            found += 1
    assert found >= 4, by_query
    assert any(r["raw_score"] is None and r["votes"] > 0 for r in records)  # local recall ran
    flipped = by_query["Q00001"][0]
    assert flipped["reference_id"] == 1 and "flip" in flipped["transform"]
    # a batch answers each image as a single request does
    names = ["Q00001", "Q00099"]
    files = [("images", (f"{q}.jpg", (Path(world["queries"]) / f"{q}.jpg").read_bytes()))
             for q in names]  # fmt: skip
    batch = requests.post(f"{world['url']}/v1/match/batch", files=files, timeout=120,
                          params={"k": K, "verify": "true"})  # fmt: skip
    assert batch.status_code == 200, batch.text
    for q, result in zip(names, batch.json()["results"], strict=True):
        assert result["matches"] == _http(world, q, verify="true").json()["matches"], q
    # the query run was made with local features: matching without --verify into it is refused
    argv = ["match", "--queries", world["queries"], "--index", world["root"], "--model",
            world["model"], "--out", str(tmp_path / "plain.csv"), "--embeddings", world["emb"],
            "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    assert "made with local features" in capsys.readouterr().err
    # without verify the same endpoint answers global scores only
    plain = _http(world, "Q00000").json()
    assert not plain["verified"] and "inliers" not in plain["matches"][0]


def test_evaluate_verify_in_process_and_through_the_index(world, tmp_path):
    """`rdcd evaluate --verify`: in-process (reference features extracted on the fly, default
    fused score) and with `--index` (the index's features and fitted score); both lift µAP over
    the random global descriptor, and the index path ranks exactly as `rdcd match --verify`."""
    from rdcd.metrics import read_predictions, write_ground_truth

    gt = str(tmp_path / "gt.csv")
    write_ground_truth(gt, [(q, None if r is None else f"R{r:06d}")
                            for q, r in world["truth"].items()])  # fmt: skip
    common = ["evaluate", "--queries", world["queries"], "--ground-truth", gt, "--model",
              world["model"], "--k", str(K), "--verify", "--no-progress"]  # fmt: skip
    flat, indexed = tmp_path / "flat", tmp_path / "indexed"
    refs = str(Path(world["tmp"]) / "references")
    assert main([*common, "--references", refs, "--out", str(flat)]) == 0
    assert main([*common, "--index", world["root"], "--out", str(indexed)]) == 0
    for out in (flat, indexed):
        m = json.loads((out / "metrics.json").read_text())
        assert m["verified"]["uap"] >= 0.75 > m["uap"], (out, m["verified"], m["uap"])
        assert m["verified"]["local_recall"]
    served = {}
    for r in _match(world, tmp_path / "m.csv"):
        served.setdefault(r["query_id"], []).append((f"R{r['reference_id']:06d}", r["score"]))
    mine = {}
    for p in read_predictions(str(indexed / "predictions_verified.csv")):
        mine.setdefault(p.query_id, []).append((p.reference_id, p.score))
    assert sorted(mine) == sorted(served)
    for q in mine:
        assert [r for r, _ in mine[q]] == [r for r, _ in served[q]], q
        assert np.allclose([s for _, s in mine[q]], [s for _, s in served[q]], atol=1e-6), q


def test_tombstoned_references_never_come_back(world, tmp_path):
    records = _match(world, tmp_path / "before.csv")
    recalled = [r for r in records if r["raw_score"] is None and r["inliers"] > 0]
    assert recalled, "no reference came through local recall: the test would prove nothing"
    dead = recalled[0]["reference_id"]
    listing = tmp_path / "remove.txt"
    listing.write_text(f"{dead}\n")
    assert main(["index", "--out", world["root"], "--remove", str(listing)]) == 0
    removed = int(Path(world["root"], "CURRENT").read_text().strip()[1:])
    for step in ("removed", "compacted"):
        after = _match(world, tmp_path / f"{step}.csv")
        assert dead not in {r["reference_id"] for r in after}, step
        assert len(after) >= len(world["truth"])  # the other references still answer
        version = int(Path(world["root"], "CURRENT").read_text().strip()[1:])
        _wait_for_version(world, version)
        for qid in world["truth"]:
            body = _http(world, qid, verify="true").json()
            assert dead not in [m["reference_id"] for m in body["matches"]], (step, qid)
        if step == "removed":
            assert main(["index", "--out", world["root"], "--compact", "--task-cpus", "0.5"]) == 0
    assert version > removed


def test_a_version_without_local_data_refuses_verify(world, tmp_path, capsys):
    """Last in this module: it publishes a version without local data over the served root."""
    from rdcd.embed import EmbedJobConfig, run_embed_job
    from rdcd.index import IndexConfig, build_index, read_manifest

    plain = str(tmp_path / "run-plain")
    refs = str(Path(world["tmp"]) / "references")
    run_embed_job(EmbedJobConfig(images=refs, out=plain, model=world["model"], shard_size=4,
                                 batch_size=4, progress=False))  # fmt: skip
    other = str(tmp_path / "index-plain")
    build_index(IndexConfig(embeddings=plain, out=other, task_cpus=0.5))
    out, emb = tmp_path / "p.csv", tmp_path / "emb"
    argv = ["match", "--queries", world["queries"], "--index", other, "--model", world["model"],
            "--out", str(out), "--embeddings", str(emb), "--verify", "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "holds no local features" in err and "--local-features" in err
    assert not out.exists() and not emb.exists()  # refused before embedding anything
    # over HTTP: the served root moves to a version without local data
    manifest = build_index(IndexConfig(embeddings=plain, out=world["root"], task_cpus=0.5))
    assert manifest["local"] is None and read_manifest(world["root"])["local"] is None
    _wait_for_version(world, int(manifest["version"]))
    refused = _http(world, "Q00000", verify="true")
    assert refused.status_code == 409
    assert "holds no local features" in refused.json()["error"]
    assert _http(world, "Q00000").status_code == 200  # global search still answers
    assert _http(world, "Q00000", verify="maybe").status_code == 400
    info = requests.get(f"{world['url']}/v1/index", timeout=10).json()
    assert info["local"] is None
    assert np.isfinite(_http(world, "Q00000").json()["matches"][0]["score"])
