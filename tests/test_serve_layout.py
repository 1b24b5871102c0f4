"""Serve's two layouts: `local` (one ingress replica embeds and searches in-process) for an index
that fits a node, `sharded` (embedder and searcher deployments behind handles) for larger ones,
and the `auto` rule between them."""

from __future__ import annotations

import numpy as np
import pytest
import requests
from conftest import free_port, start_serve_app

from rdcd.serve import ServeConfig, choose_layout


def _manifest(*sizes: int) -> dict:
    return {"shards": [{"name": f"shard-{i:03d}", "bytes": b} for i, b in enumerate(sizes)]}


def test_auto_layout_is_local_for_an_index_that_fits_and_sharded_beyond():
    cfg = ServeConfig(index="x")
    assert choose_layout(cfg, _manifest(10_000, 20_000), gpus=0) == "local"
    assert choose_layout(cfg, _manifest(2 * 1024**3, 1), gpus=0) == "sharded"  # too large
    small = ServeConfig(index="x", local_index_bytes=1000)
    assert choose_layout(small, _manifest(600, 600), gpus=0) == "sharded"
    # knobs of the sharded layout, or a GPU embedder, keep it sharded
    assert choose_layout(cfg, _manifest(10), gpus=1) == "sharded"
    assert choose_layout(ServeConfig(index="x", searchers=2), _manifest(10), gpus=0) == "sharded"
    assert choose_layout(ServeConfig(index="x", embedder_replicas=2), _manifest(10), 0) == "sharded"
    assert choose_layout(ServeConfig(index="x", layout="sharded"), _manifest(10), 0) == "sharded"
    assert choose_layout(ServeConfig(index="x", layout="local"), _manifest(10**12), 0) == "local"
    with pytest.raises(ValueError, match="layout must be one of"):
        ServeConfig(index="x", layout="mesh").validate()


def test_local_layout_serves_from_one_replica(ray_local, tiny_student, photos, tmp_path):
    from ray import serve

    from rdcd.decode import load_for_model
    from rdcd.index import IndexConfig, build_index
    from rdcd.models import load_model
    from rdcd.store import RunIdentity, write_embeddings

    model = load_model(tiny_student, precision="auto", backend="auto")
    refs = [str(p) for p in photos[:12]]
    vectors = model.embed(np.stack([load_for_model(open(p, "rb").read(), 64) for p in refs]))
    ident = RunIdentity(model.fingerprint, model.name, model.dim, model.image_size, "fp32", 6)
    write_embeddings(str(tmp_path / "run"), refs, vectors, ident)
    root = str(tmp_path / "index")
    build_index(IndexConfig(embeddings=str(tmp_path / "run"), out=root, shards=2, task_cpus=0.5))

    cfg = ServeConfig(index=root, model=tiny_student, port=free_port(), embedder_cpus=0.5,
                      name="rdcd-local-test")  # fmt: skip
    url = start_serve_app(cfg, timeout_s=120)
    try:
        deployments = serve.status().applications[cfg.name].deployments
        assert set(deployments) == {"Ingress"}  # no embedder or searcher deployments
        info = requests.get(f"{url}/v1/index", timeout=30).json()
        assert info["layout"] == "local" and info["searchers"][0]["shards"] == info["shards"]
        health = requests.get(f"{url}/v1/health", timeout=30).json()
        assert health["status"] == "ok" and health["model"] in (None, model.fingerprint)
        for i in (0, 7):
            data = open(refs[i], "rb").read()
            r = requests.post(f"{url}/v1/match", data=data, params={"k": 2}, timeout=60)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model"] == model.fingerprint and body["missing_shards"] == []
            assert body["matches"][0]["reference_id"] == i
            assert body["matches"][0]["raw_score"] > 0.999
        files = [("images", ("a.jpg", open(refs[3], "rb").read())),
                 ("images", ("b.txt", b"<html>not an image</html>"))]  # fmt: skip
        r = requests.post(f"{url}/v1/match/batch", files=files, timeout=60)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert results[0]["matches"][0]["reference_id"] == 3 and results[1]["status"] == 415
    finally:
        serve.shutdown()  # the next test module starts Serve on its own port
