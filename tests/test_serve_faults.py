"""The Serve app under faults, over real HTTP on a local Ray: replicas killed under load and
restarted while `CURRENT` names a version the app refuses, slow clients over real sockets, costly
and oversized uploads, and what `/v1/health` tells a load balancer meanwhile. Every load loop is
bounded in count and time and talks only to 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import free_port, start_serve_app
from PIL import Image
from test_serve import _copy_of, _embed_run, _jpeg

N_REFS = 12
TOKEN = "fault-token-Zq81-for-tests"
TOKEN_ENV = "RDCD_TEST_FAULT_TOKEN"


@pytest.fixture(scope="module")
def app(ray_local, photos, tmp_path_factory):
    """v1 of N_REFS photos in two shards, served with a token and short deadlines."""
    from ray import serve

    from rdcd.index import IndexConfig, build_index
    from rdcd.models.resolve import load_model
    from rdcd.serve import ServeConfig

    if len(photos) < 3 * N_REFS:
        pytest.skip("not enough shared photos")
    model = load_model("default")
    tmp = tmp_path_factory.mktemp("faults")
    refs = photos[:N_REFS]
    run = _embed_run(model, refs, tmp / "run")
    root = str(tmp / "index")
    build_index(IndexConfig(embeddings=run, out=root, shards=2, task_cpus=0.5))
    os.environ[TOKEN_ENV] = TOKEN
    cfg = ServeConfig(
        index=root,
        model="default",
        port=free_port(),
        poll_interval_s=0.5,
        token_env=TOKEN_ENV,
        embedder_cpus=0.5,
        max_upload_bytes=2_000_000,
        body_timeout_s=3.0,
        request_timeout_s=20.0,
        health_timeout_s=1.0,
        max_ongoing_requests=80,
        layout="sharded",  # the faults are replicas of the embedder and searcher deployments
        name="rdcd-faults",
    )
    url = start_serve_app(cfg, timeout_s=120)
    os.environ.pop(TOKEN_ENV, None)  # the ingress must not need the driver's environment
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {TOKEN}"
    yield {"url": url, "http": http, "root": root, "refs": refs, "model": model, "tmp": tmp}
    serve.shutdown()


def _query(app, ref: int = 3) -> bytes:
    return _copy_of(Image.open(app["refs"][ref]))


def _post(app, data: bytes, timeout: float = 60, **params) -> requests.Response:
    return app["http"].post(f"{app['url']}/v1/match", data=data, params=params, timeout=timeout)


def _health(app) -> requests.Response:
    return requests.get(f"{app['url']}/v1/health", timeout=10)


def _replicas(deployment: str) -> list[tuple[str, str]]:
    import ray

    return [
        (a["name"], a["namespace"])
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA") and f"#{deployment}#" in a["name"]
    ]


def _kill(deployment: str) -> None:
    import ray

    found = _replicas(deployment)
    assert found, f"no replica of {deployment}"
    for name, namespace in found:
        ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)


def _wait_answering(app, ref: int, timeout_s: float = 90) -> dict:
    """The first complete answer: a 200 that covers every shard (while a killed searcher is
    being replaced, answers are 200s that name its shards in `missing_shards`)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = _post(app, _query(app, ref), timeout=30)
            if last.status_code == 200 and not last.json()["missing_shards"]:
                return last.json()
        except requests.RequestException:
            pass
        time.sleep(0.5)
    pytest.fail(f"no 200 within {timeout_s} s after a restart: {last and last.text[:300]}")


def test_token_is_not_in_rays_logs_and_docs_need_it(app):
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    leaked = []
    for path in session.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            try:
                if TOKEN.encode() in path.read_bytes():
                    leaked.append(str(path))
            except OSError:
                continue
    assert not leaked, f"the bearer token is written in clear in {leaked[:5]}"
    url = app["url"]
    for route in ("/docs", "/redoc", "/openapi.json"):
        assert requests.get(url + route, timeout=10).status_code in (401, 404), route
    assert requests.get(f"{url}/v1/openapi.json", timeout=10).status_code == 401
    schema = app["http"].get(f"{url}/v1/openapi.json", timeout=10)
    assert schema.status_code == 200 and "/v1/match" in schema.json()["paths"]
    assert _post(app, _query(app)).status_code == 200  # the digest still authorises


def test_too_many_batch_files_is_413(app):
    img = _jpeg(Image.open(app["refs"][0]).resize((64, 64)))
    files = [("images", (f"{i}.jpg", img)) for i in range(40)]
    r = app["http"].post(f"{app['url']}/v1/match/batch", files=files, timeout=60)
    assert r.status_code == 413, r.text
    assert "32" in r.json()["error"]


def test_costly_png_is_refused_before_it_is_decoded(app):
    """A 7999x7999 flat PNG is ~200 KB but 64 MP to decode: refused in the header check."""
    import io

    buf = io.BytesIO()
    Image.new("L", (7999, 7999), 128).save(buf, "PNG", compress_level=9)
    assert len(buf.getvalue()) < 2_000_000
    t0 = time.monotonic()
    r = _post(app, buf.getvalue())
    assert r.status_code == 413, r.text[:300]
    assert time.monotonic() - t0 < 5
    assert _post(app, _query(app)).status_code == 200


class _SlowClient(threading.Thread):
    """An upload that sends its body one byte every `gap_s` seconds (bounded by `max_s`)."""

    def __init__(self, port: int, gap_s: float, max_s: float):
        super().__init__(daemon=True)
        self.port, self.gap_s, self.max_s = port, gap_s, max_s
        self.answer = b""

    def run(self) -> None:
        t0 = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=self.max_s) as s:
                s.settimeout(self.gap_s)
                head = (
                    "POST /v1/match HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"Authorization: Bearer {TOKEN}\r\nContent-Length: 100000\r\n\r\n"
                )
                s.sendall(head.encode())
                while time.monotonic() - t0 < self.max_s:
                    try:
                        s.sendall(b"x")
                        chunk = s.recv(65536)
                        if not chunk:
                            break
                        self.answer += chunk
                        if b"\r\n\r\n" in self.answer:
                            break
                    except TimeoutError:
                        continue
                    except OSError:
                        break
        except OSError:
            pass


def test_slow_clients_do_not_starve_normal_queries(app):
    """70 connections trickling a byte every 2 s: normal queries still answer, and the slow ones
    get a JSON 503 with Retry-After once their body deadline (3 s here) passes."""
    port = int(app["url"].rsplit(":", 1)[1])
    slow = [_SlowClient(port, gap_s=2.0, max_s=25.0) for _ in range(70)]
    for c in slow:
        c.start()
    time.sleep(1.0)
    latencies = []
    try:
        for i in range(6):
            t0 = time.monotonic()
            r = _post(app, _query(app, i), timeout=30)
            latencies.append(time.monotonic() - t0)
            assert r.status_code == 200, r.text[:300]
            assert r.json()["matches"][0]["reference_id"] == i
    finally:
        for c in slow:
            c.join(timeout=30)
    assert max(latencies) < 10, latencies
    answered = [c.answer for c in slow if c.answer]
    assert len(answered) >= 60, f"only {len(answered)} of 70 slow uploads were answered"
    for raw in answered[:10]:
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), head[:100]
        assert b"retry-after" in head.lower()


def test_beyond_the_ingress_limit_is_a_json_503_at_once(app):
    """110 uploads started at once against a limit of 80: the extra ones are refused at once, as
    JSON with Retry-After, not queued at the proxy or answered in its plain text."""
    port = int(app["url"].rsplit(":", 1)[1])
    slow = [_SlowClient(port, gap_s=0.5, max_s=8.0) for _ in range(110)]
    t0 = time.monotonic()
    for c in slow:
        c.start()
    for c in slow:
        c.join(timeout=30)
    refused = [c.answer for c in slow if b"requests in progress" in c.answer]
    assert len(refused) >= 5, [c.answer[:200] for c in slow if c.answer][:3]
    head, _, body = refused[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and b"retry-after" in head.lower()
    assert b"content-type: application/json" in head.lower()
    assert time.monotonic() - t0 < 30
    assert _post(app, _query(app)).status_code == 200


def _load(app, seconds: float, out: list, threads: int = 3, max_requests: int = 400) -> list:
    stop = time.monotonic() + seconds
    lock = threading.Lock()
    query = _query(app, 2)

    def loop() -> None:
        while time.monotonic() < stop:
            with lock:
                if len(out) >= max_requests:
                    return
            t0 = time.monotonic()
            try:
                r = _post(app, query, timeout=30)
                item = (r.status_code, r.headers.get("content-type", ""), r.text[:300],
                        r.headers.get("retry-after"), time.monotonic() - t0)  # fmt: skip
            except requests.RequestException as exc:
                item = (-1, "", repr(exc)[:200], None, time.monotonic() - t0)
            with lock:
                out.append(item)

    workers = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    return workers


def _check_codes(results: list) -> None:
    codes = [c for c, *_ in results]
    assert 500 not in codes and -1 not in codes, [r for r in results if r[0] not in (200, 503)][:3]
    for code, ctype, text, retry, _ in results:
        if code == 503:
            assert "application/json" in ctype and json.loads(text)["error"], text
            assert retry is not None


def test_embedder_killed_under_load_gives_503s_not_500s(app):
    results: list = []
    workers = _load(app, 12.0, results)
    time.sleep(2.0)
    _kill("Embedder")
    seen_unhealthy = False
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not seen_unhealthy:
        r = _health(app)
        seen_unhealthy = r.status_code == 503 and r.json()["status"] == "unhealthy"
        time.sleep(0.3)
    for w in workers:
        w.join(timeout=60)
    _check_codes(results)
    assert seen_unhealthy, "health never said unhealthy while the embedder was down"
    # the kill hit requests in flight: they got a JSON 503, or (when Serve brought the embedder
    # back within the request deadline, as on a quiet machine) waited through the outage for it
    assert any(c == 503 or (c == 200 and took > 5.0) for c, *_, took in results), (
        "the kill was not seen by any request"
    )
    _wait_answering(app, 2)
    assert _health(app).json()["status"] == "ok"


def test_refused_current_degrades_health_and_restarted_replicas_keep_serving(app):
    """CURRENT is made to name another model's build. The ingress keeps v1 and says `degraded`;
    each replica, killed and restarted by Serve, comes back serving v1 (it used to read the
    unchecked CURRENT: the embedder crash-looped, the ingress never answered, a searcher
    dropped its shards), and every answer in the meantime is a 200 or a JSON 503."""
    from rdcd.index import IndexConfig, build_index, current_version
    from rdcd.store import RunIdentity, write_embeddings

    model = app["model"]
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((10, model.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    other = str(app["tmp"] / "other")
    identity = RunIdentity("e" * 64, "other-model", model.dim, model.image_size, "fp32", 10)
    write_embeddings(other, [f"o{i}" for i in range(10)], vectors, identity)
    bad = build_index(
        IndexConfig(embeddings=other, out=app["root"], task_cpus=0.5, allow_model_change=True)
    )
    assert current_version(app["root"]) == bad["version"] == 2
    deadline = time.monotonic() + 30
    body: dict = {}
    while time.monotonic() < deadline:  # "not loaded yet" first, then the refusal
        body = _health(app).json()
        if any("built from model" in r for r in body["reasons"]):
            break
        time.sleep(0.3)
    assert body["status"] == "degraded" and body["index_version"] == 1, body
    assert any("CURRENT names v2" in r and "built from model" in r for r in body["reasons"])

    for deployment in ("Searcher1", "Embedder", "Ingress"):
        results: list = []
        workers = _load(app, 6.0, results, threads=2, max_requests=100)
        time.sleep(1.0)
        _kill(deployment)
        for w in workers:
            w.join(timeout=60)
        answer = _wait_answering(app, 7)
        assert answer["index_version"] == 1 and answer["missing_shards"] == [], deployment
        assert answer["matches"][0]["reference_id"] == 7, deployment
        if deployment != "Ingress":
            # requests in flight on a killed ingress die with the Serve proxy's own answer
            _check_codes(results)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            body = _health(app).json()
            if body["status"] == "degraded" and not body["missing_shards"]:
                break
            time.sleep(0.5)
        assert body["status"] == "degraded" and body["index_version"] == 1, (deployment, body)
