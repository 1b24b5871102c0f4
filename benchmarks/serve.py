"""Serve latency and throughput: HTTP + Ray Serve against the same search path called in-process.

    python benchmarks/serve.py [--model default] [--refs 100] [--requests 40,120,200]

Builds a 2-shard index of real photos (../shared/data/photos) with the model, then sends edited
copies of the references (JPEG bytes, the same for every setting) at concurrency 1, 8 and 32:

    in-process      decode + embed + ShardedIndex.search in this process (threads), no HTTP
    http batched    POST /v1/match on 127.0.0.1, embedder max_batch_size 16
    http unbatched  the same application with max_batch_size 1 (changed live via user_config)

and prints p50/p99 latency and requests/s per setting, the HTTP+Serve overhead at p50 against
in-process, and the batched/unbatched throughput ratio. Figures, never asserts.
"""

from __future__ import annotations

import argparse
import io
import random
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CONCURRENCY = (1, 8, 32)


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _queries(paths: list[Path], n: int, seed: int = 0) -> list[bytes]:
    from rdcd.edits import random_copy

    rng = random.Random(seed)
    out = []
    for i in range(n):
        img = Image.open(paths[i % len(paths)]).convert("RGB")
        img.thumbnail((640, 640))
        out.append(_jpeg(random_copy(img, rng)[0]))
    return out


def _build_index(model, paths: list[Path], tmp: Path) -> str:
    from rdcd.decode import load_for_model
    from rdcd.index import IndexConfig, build_index
    from rdcd.store import RunIdentity, write_embeddings

    arrays = [load_for_model(p.read_bytes(), model.image_size) for p in paths]
    vectors = np.concatenate(
        [model.embed(np.stack(arrays[i : i + 16])) for i in range(0, len(arrays), 16)]
    )
    shard_size = (len(paths) + 1) // 2
    ident = RunIdentity(
        model.fingerprint, model.name, model.dim, model.image_size, "fp32", shard_size
    )
    write_embeddings(str(tmp / "run"), [str(p) for p in paths], vectors, ident)
    build_index(
        IndexConfig(embeddings=str(tmp / "run"), out=str(tmp / "index"), shards=2, task_cpus=0.5)
    )
    return str(tmp / "index")


def _load(call, queries: list[bytes], concurrency: int, n: int, budget_s: float) -> dict:
    """`n` calls (fewer if `budget_s` runs out) from `concurrency` threads; latency per call."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    counter = iter(range(n))
    deadline = time.monotonic() + budget_s

    def worker() -> None:
        nonlocal errors
        while time.monotonic() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t = time.perf_counter()
            ok = call(queries[i % len(queries)])
            dt = time.perf_counter() - t
            with lock:
                latencies.append(dt)
                errors += not ok

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {
        "n": len(lat),
        "errors": errors,
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
        "rps": len(lat) / wall,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--photos", default=str(REPO.parent / "shared" / "data" / "photos"))
    p.add_argument("--refs", type=int, default=100, help="references in the index")
    p.add_argument("--requests", default="40,120,200", help="requests at concurrency 1,8,32")
    p.add_argument("--budget", type=float, default=60.0, help="seconds at most per setting")
    p.add_argument("--threads", type=int, default=2, help="torch threads, in-process and Serve")
    args = p.parse_args()
    counts = [int(x) for x in args.requests.split(",")]

    import ray
    import torch
    from ray import serve

    from rdcd.decode import load_for_model
    from rdcd.index import load_index
    from rdcd.models.resolve import load_model
    from rdcd.serve import ServeConfig, build_app

    photos = sorted(Path(args.photos).glob("*.jpg"))
    if len(photos) < args.refs:
        print(f"need {args.refs} photos under {args.photos}, found {len(photos)}")
        return 1
    torch.set_num_threads(args.threads)
    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="rdcd-serve-bench-"))
    model = load_model(args.model)
    root = _build_index(model, photos[: args.refs], tmp)
    queries = _queries(photos[: args.refs], 64)
    index = load_index(root)
    results: dict[str, dict[int, dict]] = {}

    def in_process(data: bytes) -> bool:
        q = model.embed(load_for_model(data, model.image_size)[None])
        index.search(q, 10, fingerprint=model.fingerprint)
        return True

    in_process(queries[0])
    results["in-process"] = {
        c: _load(in_process, queries, c, n, args.budget)
        for c, n in zip(CONCURRENCY, counts, strict=True)
    }

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/v1/match"
    local = threading.local()

    def over_http(data: bytes) -> bool:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        r = local.session.post(url, data=data, timeout=120)
        return r.status_code == 200

    for label, batch in (("http batched", 16), ("http unbatched", 1)):
        cfg = ServeConfig(
            index=root,
            model=args.model,
            port=port,
            max_batch_size=batch,
            embed_threads=args.threads,
            embedder_cpus=1.0,
            max_queued_requests=1024,
            name="bench",
        )
        serve.run(build_app(cfg), name="bench", route_prefix="/", blocking=False)
        for _ in range(4):
            over_http(queries[0])
        results[label] = {
            c: _load(over_http, queries, c, n, args.budget)
            for c, n in zip(CONCURRENCY, counts, strict=True)
        }
    serve.shutdown()
    ray.shutdown()

    print(
        f"\nmodel {model.name} ({model.image_size}px, {model.dim}-d), {args.refs} references "
        f"in 2 shards, torch threads {args.threads}, {len(queries)} distinct query JPEGs"
    )
    print(f"{'setting':<16}{'conc':>5}{'n':>6}{'err':>5}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>8}")
    for label, by_c in results.items():
        for c, r in by_c.items():
            print(
                f"{label:<16}{c:>5}{r['n']:>6}{r['errors']:>5}{r['p50']:>9.1f}{r['p99']:>9.1f}"
                f"{r['rps']:>8.1f}"
            )
    base, hb, hu = results["in-process"], results["http batched"], results["http unbatched"]
    print(
        f"HTTP+Serve overhead at p50, concurrency 1: batched {hb[1]['p50'] - base[1]['p50']:+.1f}"
        f" ms, unbatched {hu[1]['p50'] - base[1]['p50']:+.1f} ms (aim: within 15 ms)"
    )
    for c in (8, 32):
        print(
            f"batching at concurrency {c}: {hb[c]['rps'] / hu[c]['rps']:.2f}x the unbatched "
            f"req/s; HTTP batched vs in-process {hb[c]['rps'] / base[c]['rps']:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
