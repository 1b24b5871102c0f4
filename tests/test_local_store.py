"""Local features in the embedding store: `rdcd embed --local-features` over a real S3 API (moto),
resumed after a killed driver, and refused when damaged or mixed.

Real parts only: photos from ../shared/data, OpenCV SIFT, Parquet, Ray Data, moto's S3 server, a
tiny random student (the descriptors do not matter here; the local files do)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_student
from PIL import Image

from rdcd import io as rio
from rdcd import store
from rdcd.cli import main
from rdcd.embed import CRASH_ENV, EmbedJobConfig, run_embed_job
from rdcd.index import stored_form
from rdcd.local import LocalConfig, extract_bytes

REPO = Path(__file__).resolve().parents[1]
N_PHOTOS, SHARD, BATCH = 5, 3, 3


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> str:
    return make_tiny_student(tmp_path_factory.mktemp("student") / "tiny.pt", 0, dim=32)


@pytest.fixture(scope="module")
def inputs(s3_server, photos) -> dict:
    """Photos, a blank and a tiny image (defined results: no keypoints) and a broken file on S3."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server)
    bucket = "rdcd-local-store"
    client.create_bucket(Bucket=bucket)
    files = {p.name: p.read_bytes() for p in photos[:N_PHOTOS]}
    files["x_blank.png"] = _png(Image.new("RGB", (320, 240), (128, 128, 128)))
    files["x_tiny.png"] = _png(Image.new("RGB", (8, 6), (10, 200, 30)))
    files["z_broken.jpg"] = b"<html>not an image</html>"
    for name, data in files.items():
        client.put_object(Bucket=bucket, Key=f"images/{name}", Body=data)
    return {"bucket": bucket, "images": f"s3://{bucket}/images/", "files": files}


@pytest.fixture(scope="module")
def reference(ray_local, inputs, student) -> dict:
    """An uninterrupted `--local-features` run over S3, written to S3."""
    out = f"s3://{inputs['bucket']}/runs/reference"
    cfg = EmbedJobConfig(images=inputs["images"], out=out, model=student, shard_size=SHARD,
                         batch_size=BATCH, local_features=True, progress=False)  # fmt: skip
    return {"out": out, "run": run_embed_job(cfg)}


def _argv(inputs: dict, student: str, out: str, *extra: str) -> list[str]:
    return ["--images", inputs["images"], "--model", student, "--out", out,
            "--shard-size", str(SHARD), "--batch-size", str(BATCH), "--no-progress",
            *extra]  # fmt: skip


def test_local_features_survive_the_s3_round_trip(reference, inputs):
    out, run = reference["out"], reference["run"]
    commits = store.committed_parts(out)
    counts = run["counts"]
    assert (counts["images"], counts["embedded"], counts["errors"]) == (8, 7, 1)
    feats: dict[int, object] = {}
    for commit in commits.values():
        assert commit["local"].startswith("local/") and commit["local_sha256"]
        part = store.read_local_part(out, commit)
        assert len(part) == commit["embedded"]  # one row per embedded image, none for errors
        assert not set(part) & set(feats)
        feats.update(part)
    ids, uris, _, _ = store.read_embeddings(out)
    assert sorted(feats) == ids.tolist()  # shards and local files hold the same ids
    cfg = LocalConfig.from_dict(commits[0]["local_config"])
    for rid, uri in zip(ids.tolist(), uris, strict=True):
        name = uri.rsplit("/", 1)[-1]
        got = feats[rid]
        want = stored_form(extract_bytes(inputs["files"][name], cfg))
        assert (got.width, got.height) == (want.width, want.height), name
        np.testing.assert_array_equal(got.keypoints, want.keypoints, err_msg=name)
        np.testing.assert_array_equal(got.descriptors, want.descriptors, err_msg=name)
        if name.startswith("x_"):  # blank and tiny: a defined result, not an error
            assert len(got) == 0, name
        else:
            assert len(got) > 50, name


def test_resume_after_killed_driver_gives_the_same_local_files(
    reference, ray_local, inputs, student
):
    """Kill a `--local-features` run half-way through its second part, re-run the same command:
    every part committed once, each local file the very bytes of the uninterrupted run."""
    out = f"s3://{inputs['bucket']}/runs/resumed"
    args = _argv(inputs, student, out, "--local-features")
    env = {**os.environ, CRASH_ENV: "1", "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.run([sys.executable, "-m", "jobs.embed", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 17, proc.stderr[-3000:]
    assert len(store.committed_parts(out)) == 1  # parts complete in any order
    assert main(["embed", *args]) == 0
    run = json.loads(rio.read_text(rio.join(out, "run.json")))
    assert run["counts"]["parts_skipped"] == 1 and run["counts"]["parts_written"] == 2
    mine, theirs = store.committed_parts(out), store.committed_parts(reference["out"])
    assert sorted(mine) == sorted(theirs) == [0, 1, 2]
    for part in mine:
        assert mine[part]["local_sha256"] == theirs[part]["local_sha256"], part
        data = rio.read_bytes(store.local_uri(out, part))
        assert data == rio.read_bytes(store.local_uri(reference["out"], part))
        assert len(data) == mine[part]["local_bytes"]
    rows = [r for c in mine.values() for r in store.read_local_part(out, c)]
    assert sorted(rows) == sorted(set(rows)) and len(rows) == run["counts"]["embedded"]


def test_a_resume_with_the_other_setting_is_refused(reference, ray_local, inputs, student, capsys):
    out = reference["out"]
    before = sorted(f.uri for f in rio.list_files(out))
    assert main(["embed", *_argv(inputs, student, out)]) == 2  # without --local-features
    err = capsys.readouterr().err
    assert "without --local-features" in err and "re-run with --local-features" in err
    plain = f"s3://{inputs['bucket']}/runs/plain"
    assert main(["embed", *_argv(inputs, student, plain)]) == 0
    assert main(["embed", *_argv(inputs, student, plain, "--local-features")]) == 2
    err = capsys.readouterr().err
    assert "with --local-features" in err and "have no local features" in err
    args = _argv(inputs, student, out, "--local-features", "--local-max-keypoints", "100")
    assert main(["embed", *args]) == 2
    assert "max_keypoints" in capsys.readouterr().err
    assert sorted(f.uri for f in rio.list_files(out)) == before  # nothing written or deleted


def test_a_damaged_local_part_is_one_line_naming_it(reference, ray_local, inputs, tmp_path, capsys):
    out = f"s3://{inputs['bucket']}/runs/damaged"
    for f in rio.list_files(reference["out"]):  # a copy of the reference run, then damage it
        rio.write_bytes(out + f.uri[len(reference["out"]) :], rio.read_bytes(f.uri))
    uri = store.local_uri(out, 1)
    data = bytearray(rio.read_bytes(uri))
    data[len(data) // 2] ^= 0xFF
    rio.write_bytes(uri, bytes(data))
    commit = store.committed_parts(out)[1]
    with pytest.raises(store.StoreError) as exc:
        store.read_local_part(out, commit)
    text = str(exc.value)
    assert uri in text and "sha256" in text and "\n" not in text
    store.read_local_part(out, store.committed_parts(out)[0])  # the other parts still read
    # the index builder refuses it with the same line, before publishing anything
    root = str(tmp_path / "index")
    assert main(["index", "--embeddings", out, "--out", root, "--task-cpus", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert uri in err and "sha256" in err and len(err.splitlines()) == 1, err
    assert not rio.exists(rio.join(root, "CURRENT"))


def test_the_index_carries_local_features_through_add(reference, ray_local, inputs, tmp_path):
    """`rdcd index` copies the local files into the version; `--add` carries the added run's
    (ids shifted like its descriptors) and refuses a run without them."""
    from rdcd.index import IndexStoreError, LocalData, add_references, read_manifest

    root = str(tmp_path / "index")
    assert main(["index", "--embeddings", reference["out"], "--out", root, "--task-cpus", "0.5",
                 "--shards", "2"]) == 0  # fmt: skip
    manifest = read_manifest(root)
    local = manifest["local"]
    assert local["sizes"]["references"] == 7 and len(local["parts"]) == 3
    assert all(e["file"].startswith("v1/local/") for e in local["parts"])
    stored = {}
    for commit in store.committed_parts(reference["out"]).values():
        stored.update(store.read_local_part(reference["out"], commit))
    data = LocalData(root, manifest)
    got = data.features_of(list(range(20)))
    assert sorted(got) == sorted(stored)
    for rid, f in stored.items():
        np.testing.assert_array_equal(got[rid].descriptors, f.descriptors)
    copy = f"s3://{inputs['bucket']}/runs/copy-for-add"
    for f in rio.list_files(reference["out"]):
        rio.write_bytes(copy + f.uri[len(reference["out"]) :], rio.read_bytes(f.uri))
    child = add_references(root, copy, cpus=0.5)
    offset = int(child["sources"][1]["id_offset"])
    assert offset == 8 and child["local"]["sizes"]["references"] == 14
    added = LocalData(root, child).features_of([rid + offset for rid in stored])
    assert sorted(added) == sorted(rid + offset for rid in stored)
    for rid, f in stored.items():
        np.testing.assert_array_equal(added[rid + offset].keypoints, f.keypoints)
    # a run without local features cannot join an index that verifies
    ids, uris, vectors, _ = store.read_embeddings(reference["out"])
    identity = store.RunIdentity(**{k: store.committed_parts(reference["out"])[0][k] for k in (
        "fingerprint", "model", "dim", "image_size", "precision", "shard_size")})  # fmt: skip
    plain = str(tmp_path / "plain")
    store.write_embeddings(plain, uris, vectors, identity)
    with pytest.raises(IndexStoreError, match="has none"):
        add_references(root, plain, cpus=0.5)
    assert read_manifest(root)["version"] == child["version"]
