"""The sharded, versioned FAISS index: built with real Ray tasks from real embedding runs (Parquet
on disk or on moto's S3 server), searched across shards and checked against exact search."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rdcd import index as rindex
from rdcd import store
from rdcd.cli import main
from rdcd.search import FingerprintMismatchError, knn

REPO = Path(__file__).resolve().parents[1]
FP = "a" * 64
DIM = 32


def _vectors(n: int, seed: int, dim: int = DIM, clusters: int = 40) -> np.ndarray:
    """Unit vectors around a few centres: clustered like real descriptors, so IVF is tested on
    data with structure (and exact ties are vanishingly rare)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _run(out: str, x: np.ndarray, prefix: str, fingerprint: str = FP, shard: int = 500) -> str:
    ident = store.RunIdentity(fingerprint, "synthetic", x.shape[1], 224, "fp32", shard)
    store.write_embeddings(out, [f"{prefix}/{i:06d}.jpg" for i in range(len(x))], x, ident)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("index")
    x = _vectors(3000, 0)
    return {"dir": d, "x": x, "run": _run(str(d / "run"), x, "ref")}


def test_choose_factory_by_size_and_budget():
    small = rindex.choose_factory(10_000, 256)
    assert small.factory == "Flat" and small.nprobe is None
    big = rindex.choose_factory(1_000_000, 256)
    assert big.factory.startswith("IVF") and big.factory.endswith(",SQ8,RFlat")
    assert big.nprobe is not None and big.nprobe >= 8
    assert "budget" in big.reason
    # 1M x 256-d float32 alone is 1 GiB: a 600 MiB budget drops the float re-rank vectors.
    tight = rindex.choose_factory(1_000_000, 256, memory_budget=600 * 2**20)
    assert "RFlat" not in tight.factory and tight.factory.startswith("IVF")
    tiny = rindex.choose_factory(1_000_000, 256, memory_budget=80 * 2**20)
    assert "PQ" in tiny.factory
    with pytest.raises(rindex.IndexStoreError, match="memory-budget"):
        rindex.choose_factory(1_000_000, 256, memory_budget=2**20)


def test_ivf_pq_trains_without_polysemous_codes():
    """Polysemous training (Hamming filtering, never used here) made IVF-PQ training take
    minutes; the codec is trained without it."""
    import faiss

    index = rindex._empty_index("IVF16,PQ8x8", DIM)  # owns the IVF below: keep it alive
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    assert isinstance(ivf, faiss.IndexIVFPQ)
    assert not ivf.do_polysemous_training


def test_sharded_flat_equals_single_index_and_exact_search(ray_local, base):
    d, x = base["dir"], base["x"]
    one = rindex.build_index(rindex.IndexConfig(base["run"], str(d / "one"), shards=1,
                                                task_cpus=0.5))  # fmt: skip
    three = rindex.build_index(rindex.IndexConfig(base["run"], str(d / "three"), shards=3,
                                                  task_cpus=0.5))  # fmt: skip
    assert one["factory"] == three["factory"] == "Flat"
    assert [s["ntotal"] for s in three["shards"]] == [1000, 1000, 1000]
    q = _vectors(64, 99)
    a = rindex.load_index(str(d / "one")).search(q, 10, fingerprint=FP)
    b = rindex.load_index(str(d / "three")).search(q, 10, fingerprint=FP)
    scores, ids = knn(q, x, 10)
    np.testing.assert_array_equal(a.ids, ids)
    np.testing.assert_array_equal(b.ids, ids)
    np.testing.assert_allclose(b.raw_scores, scores, atol=1e-5)
    assert b.uris[0][0] == f"ref/{ids[0, 0]:06d}.jpg"
    assert not b.missing_shards


def test_ids_and_uris_survive_parquet_and_faiss(ray_local, photos, tmp_path):
    """A real `rdcd embed` run with undecodable files in it has ids with gaps; each reference
    found by its own descriptor must come back with its own id and URI."""
    import torch

    from rdcd.embed import EmbedJobConfig, run_embed_job
    from rdcd.models.checkpoint import save_checkpoint
    from rdcd.models.student import StudentConfig, StudentNet

    torch.manual_seed(0)
    model = tmp_path / "tiny.pt"
    save_checkpoint(StudentNet(StudentConfig("mobilenetv3_small_050", 32, image_size=64)),
                    str(model))  # fmt: skip
    images = tmp_path / "images"
    images.mkdir()
    for i, p in enumerate(photos[:10]):
        Image.open(p).convert("RGB").resize((96, 72)).save(images / f"p{i:02d}.jpg")
        if i % 3 == 0:  # undecodable files between photos: their ids are skipped
            (images / f"p{i:02d}_bad.jpg").write_bytes(b"not an image")
    run = str(tmp_path / "run")
    run_embed_job(EmbedJobConfig(images=str(images), out=run, model=str(model), shard_size=4,
                                 batch_size=4, progress=False))  # fmt: skip
    emb = store.read_embeddings(run)
    ids, uris, vecs = emb.ids, emb.uris, emb.embeddings
    assert len(ids) == 10 and ids.max() > 9  # gaps where the bad files were
    root = str(tmp_path / "idx")
    manifest = rindex.build_index(rindex.IndexConfig(run, root, shards=2, task_cpus=0.5))
    assert (
        manifest["ntotal"] == 10 and manifest["next_id"] == 14
    )  # every input's id, failed ones too
    found = rindex.load_index(root).search(vecs, 1, fingerprint=manifest["fingerprint"])
    np.testing.assert_array_equal(found.ids[:, 0], ids)
    assert [u[0] for u in found.uris] == list(uris)


def test_fingerprint_mismatch_is_refused(ray_local, base):
    d = base["dir"]
    root = str(d / "fp")
    rindex.build_index(rindex.IndexConfig(base["run"], root, shards=2, task_cpus=0.5))
    published = rindex.current_version(root)
    ix = rindex.load_index(root)
    with pytest.raises(FingerprintMismatchError, match="bbbbbbbbbbbb"):
        ix.search(base["x"][:2], 5, fingerprint="b" * 64)
    other = _run(str(d / "other-model"), _vectors(50, 3), "o", fingerprint="b" * 64)
    with pytest.raises(FingerprintMismatchError, match="bbbbbbbbbbbb"):
        rindex.add_references(root, other)
    assert rindex.current_version(root) == published
    with pytest.raises(FingerprintMismatchError, match="bbbbbbbbbbbb"):
        rindex.build_index(rindex.IndexConfig(base["run"], str(d / "fp2"), background=other))
    assert rindex.current_version(str(d / "fp2")) is None


@pytest.mark.parametrize("point", ["after-shards", "before-manifest", "before-current"])
def test_crashed_build_leaves_the_published_version_searchable(ray_local, base, point):
    root = str(base["dir"] / f"crash-{point}")
    rindex.build_index(rindex.IndexConfig(base["run"], root, shards=2, task_cpus=0.5))
    before = rindex.read_manifest(root)
    code = (
        "from rdcd import index as r; "
        f"r.build_index(r.IndexConfig({base['run']!r}, {root!r}, shards=3, task_cpus=0.5))"
    )
    env = {**os.environ, rindex.CRASH_ENV: point,
           "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, timeout=300,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 17, proc.stderr[-2000:]
    assert rindex.current_version(root) == before["version"] == 1
    assert 2 in rindex.versions(root)  # the crashed build's files are there, unpublished
    assert rindex.read_manifest(root) == before
    q = base["x"][:5]
    res = rindex.load_index(root).search(q, 1, fingerprint=FP)
    np.testing.assert_array_equal(res.ids[:, 0], np.arange(5))
    after = rindex.build_index(rindex.IndexConfig(base["run"], root, shards=3, task_cpus=0.5))
    assert after["version"] == 3 and rindex.current_version(root) == 3
    assert len(rindex.load_index(root).shards) == 3


def test_delta_and_tombstones_show_up_and_compaction_folds_them(ray_local, base):
    d, x = base["dir"], base["x"]
    root = str(d / "updates")
    rindex.build_index(rindex.IndexConfig(base["run"], root, shards=2, task_cpus=0.5))
    y = _vectors(200, 7)
    added = rindex.add_references(root, _run(str(d / "new"), y, "new", shard=64), cpus=0.5)
    assert [s["name"] for s in added["shards"]][-1] == "delta-000"
    assert added["ntotal"] == 3200 and added["version"] == 2
    ix = rindex.load_index(root)
    res = ix.search(y[:5], 1, fingerprint=FP)
    np.testing.assert_array_equal(res.ids[:, 0], 3000 + np.arange(5))  # ids past the base
    assert res.uris[0][0] == "new/000000.jpg"
    with pytest.raises(rindex.IndexStoreError, match="already"):
        rindex.add_references(root, str(d / "new"))

    manifest, counts = rindex.remove_references(root, ["0", "ref/000001.jpg", "3002", "nope.jpg"])
    assert counts == {"removed": 3, "already": 0, "unknown": 1}
    assert manifest["version"] == 3 and manifest["tombstones"]["count"] == 3
    _, again = rindex.remove_references(root, ["0"])
    assert again == {"removed": 0, "already": 1, "unknown": 0}
    assert rindex.current_version(root) == 3  # nothing new to publish

    alive = np.concatenate([x, y])
    keep = np.ones(len(alive), bool)
    keep[[0, 1, 3002]] = False
    q = np.concatenate([x[:4], y[:4]])
    want_s, want_i = knn(q, alive[keep], 5)
    want_ids = np.flatnonzero(keep)[want_i]
    got = rindex.load_index(root).search(q, 5, fingerprint=FP)
    assert not np.isin(got.ids, [0, 1, 3002]).any()
    np.testing.assert_array_equal(got.ids, want_ids)

    compacted = rindex.compact(root, cpus=0.5)
    assert compacted["tombstones"] is None and compacted["ntotal"] == 3197
    assert all(s["name"].startswith("shard-") for s in compacted["shards"])
    after = rindex.load_index(root).search(q, 5, fingerprint=FP)
    np.testing.assert_array_equal(after.ids, want_ids)
    np.testing.assert_allclose(after.raw_scores, want_s, atol=1e-5)
    assert sorted(rindex.versions(root)) == [1, 2, 3, 4]
    assert rindex.read_manifest(root, 1)["ntotal"] == 3000  # old versions stay readable


def test_ivf_with_exact_rerank_is_close_to_exact_search(ray_local, tmp_path):
    x = _vectors(20_000, 1, dim=64, clusters=200)
    run = _run(str(tmp_path / "run"), x, "ref", shard=5000)
    root = str(tmp_path / "ivf")
    m = rindex.build_index(rindex.IndexConfig(run, root, factory="IVF64,SQ8,RFlat", shards=2,
                                              nprobe=8, task_cpus=0.5))  # fmt: skip
    assert m["exact_scores"] and m["search"]["nprobe"] == 8 and m["trained"]["train_rows"] > 0
    q = x[np.random.default_rng(5).choice(len(x), 200, replace=False)] + 0.05
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    want_s, want_i = knn(q, x, 10)
    got = rindex.load_index(root).search(q, 10, fingerprint=FP)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.ids, want_i, strict=True)])
    assert recall >= 0.9, recall
    # the scores returned are exact inner products of the ids returned (re-ranked from float32)
    exact = np.einsum("qd,qkd->qk", q, x[got.ids])
    np.testing.assert_allclose(got.raw_scores, exact, atol=1e-5)


def test_index_written_to_and_read_back_from_s3(ray_local, s3_bucket, base):
    run = _run(f"s3://{s3_bucket}/runs/ref", base["x"][:1200], "ref")
    root = f"s3://{s3_bucket}/indexes/ref"
    m = rindex.build_index(rindex.IndexConfig(run, root, shards=2, task_cpus=0.5))
    assert rindex.current_version(root) == m["version"] == 1
    q = base["x"][:20]
    got = rindex.load_index(root).search(q, 3, fingerprint=FP)
    np.testing.assert_array_equal(got.ids, knn(q, base["x"][:1200], 3)[1])
    rindex.remove_references(root, ["5"])
    assert rindex.load_index(root).search(q[5:6], 1, fingerprint=FP).ids[0, 0] != 5


def test_cli_builds_updates_and_reports(ray_local, base, tmp_path, capsys):
    root = str(tmp_path / "cli")
    assert main(["index", "--embeddings", base["run"], "--out", root, "--shards", "2",
                 "--task-cpus", "0.5"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "Flat" in out and "3000 in 2 shards" in out and "v1" in out
    listing = tmp_path / "remove.txt"
    listing.write_text("7\nref/000008.jpg\n")
    assert main(["index", "--out", root, "--remove", str(listing)]) == 0
    assert "removed          2" in capsys.readouterr().out
    assert main(["index", "--out", root, "--show"]) == 0
    assert "2 tombstoned" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "cli" / "v2" / "manifest.json").read_text())
    assert manifest["tombstones"]["count"] == 2
    # bad input: a missing run, a factory FAISS does not know, a size it cannot parse
    assert main(["index", "--embeddings", str(tmp_path / "nothing"), "--out", root]) == 2
    assert main(["index", "--embeddings", base["run"], "--out", root, "--factory", "Bogus"]) == 2
    err = capsys.readouterr().err
    assert "rdcd index: error" in err and "Bogus" in err
    assert rindex.current_version(root) == 2
    with pytest.raises(SystemExit):
        main(["index", "--embeddings", base["run"], "--out", root, "--memory-budget", "lots"])


# ---- publication that cannot lose data ------------------------------------------------------


def _sha_file(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_relative_root_gets_new_versions_not_an_overwrite(ray_local, base, tmp_path, monkeypatch):
    """README's own `--out idx/r1`: every update must make a new version and move CURRENT; it
    used to find no versions under a relative root and rewrite v1 in place."""
    monkeypatch.chdir(tmp_path)
    rindex.build_index(rindex.IndexConfig(base["run"], "idx/r1", shards=2, task_cpus=0.5))
    v1 = tmp_path / "idx" / "r1" / "v1" / "manifest.json"
    before = _sha_file(v1)
    assert rindex.versions("idx/r1") == [1] == rindex.versions(str(tmp_path / "idx" / "r1"))
    _, counts = rindex.remove_references("./idx/r1/", ["7"])
    assert counts["removed"] == 1
    assert rindex.current_version("idx/r1") == 2 and rindex.versions("idx/r1") == [1, 2]
    assert _sha_file(v1) == before, "the published v1 was rewritten"
    hit = rindex.load_index("idx/r1").search(base["x"][7:8], 1, fingerprint=FP)
    assert hit.ids[0, 0] != 7
    old = rindex.load_index(str(tmp_path / "idx" / "r1"), version=1)
    assert old.search(base["x"][7:8], 1, fingerprint=FP).ids[0, 0] == 7


def _remove_in_process(root: str, ids: list[int], pause_s: float, tmp: Path) -> subprocess.Popen:
    listing = tmp / f"remove-{'-'.join(map(str, ids))}.txt"
    listing.write_text("".join(f"{i}\n" for i in ids))
    env = {**os.environ, rindex.PAUSE_ENV: f"before-current:{pause_s}"}
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.build_index", "--out", root, "--remove", str(listing)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_concurrent_updates_in_real_processes_all_take_effect(ray_local, base, tmp_path):
    """Two `rdcd index --remove` processes that start from the same version and publish at about
    the same time: both removals must end up in CURRENT (one used to overwrite the other's
    manifest in the same v<N> and the removal was lost)."""
    root = str(tmp_path / "race")
    rindex.build_index(rindex.IndexConfig(base["run"], root, shards=1, task_cpus=0.5))
    procs = [
        _remove_in_process(root, [5, 6], 3.0, tmp_path),
        _remove_in_process(root, [7], 3.0, tmp_path),
    ]
    outputs = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-2000:]
    manifest = rindex.read_manifest(root)
    dead = rindex._read_tombstones(root, manifest)
    assert dead.tolist() == [5, 6, 7], manifest["tombstones"]
    # the writers claimed v2 and v3; the loser's claim stays unpublished and its second
    # attempt, on top of the winner, is v4
    assert manifest["version"] == 4 and manifest["parent"] in (2, 3)
    assert rindex.published_versions(root) == [1, manifest["parent"], 4]
    assert rindex.versions(root) == [1, 2, 3, 4]
    joined = " ".join(err for _, err in outputs)
    assert "applying --remove again" in joined


@pytest.mark.parametrize("where", ["local", "s3"])
def test_version_claims_and_current_swap_are_exclusive(where, tmp_path, request):
    from rdcd import io as rio

    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        root = f"s3://{bucket}/claims"
    else:
        root = str(tmp_path / "claims")
    uri = rio.join(root, "v1", rindex.CLAIM)
    assert rio.create_exclusive(uri, b"a") is True
    assert rio.create_exclusive(uri, b"b") is False
    assert rio.read_bytes(uri) == b"a"
    current = rio.join(root, rindex.CURRENT)
    assert rio.replace_if(current, b"v1\n", None) is True
    assert rio.replace_if(current, b"v9\n", None) is False  # it exists now
    seen = rio.read_versioned(current)
    assert seen.data == b"v1\n"
    assert rio.replace_if(current, b"v2\n", seen.token) is True
    assert rio.replace_if(current, b"v3\n", seen.token) is False  # stale token
    assert rio.read_bytes(current) == b"v2\n"
    assert rindex.versions(root) == [1]


def test_a_build_of_another_model_does_not_replace_a_live_version(ray_local, base, tmp_path):
    root = str(tmp_path / "live")
    rindex.build_index(rindex.IndexConfig(base["run"], root, shards=1, task_cpus=0.5))
    other = _run(str(tmp_path / "other"), _vectors(200, 3), "o", fingerprint="c" * 64)
    with pytest.raises(rindex.IndexStoreError, match="allow-model-change"):
        rindex.build_index(rindex.IndexConfig(other, root, task_cpus=0.5))
    assert rindex.current_version(root) == 1 and rindex.versions(root) == [1]
    m = rindex.build_index(rindex.IndexConfig(other, root, task_cpus=0.5, allow_model_change=True))
    assert m["version"] == 2 and m["fingerprint"] == "c" * 64


def test_more_shards_than_parts_splits_rows(ray_local, tmp_path):
    """`--shards 3` over a run of one Parquet part used to build one shard silently."""
    x = _vectors(300, 5)
    run = _run(str(tmp_path / "one-part"), x, "p", shard=1000)
    assert len(store.committed_parts(run)) == 1
    root = str(tmp_path / "split")
    manifest = rindex.build_index(rindex.IndexConfig(run, root, shards=3, task_cpus=0.5))
    assert [s["ntotal"] for s in manifest["shards"]] == [100, 100, 100]
    idx = rindex.load_index(root)
    res = idx.search(x, 1, fingerprint=FP)
    np.testing.assert_array_equal(res.ids[:, 0], np.arange(300))
    assert sorted(int(i) for s in idx.shards for i in s.ids) == list(range(300))
