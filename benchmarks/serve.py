"""Serve latency and throughput: HTTP + Ray Serve against the same search path called in-process.

    python benchmarks/serve.py [--model default] [--refs 100] [--requests 40,120,200]

Builds a 2-shard index of real photos (../shared/data/photos) with the model, then sends edited
copies of the references (JPEG bytes, the same for every setting) at concurrency 1, 8 and 32:

    in-process         decode + embed + ShardedIndex.search in this process (threads), no HTTP
    batched <layout>   POST /v1/match on 127.0.0.1, embedder max_batch_size 16
    unbatched <layout> the same application with max_batch_size 1

for each Serve layout of `--layouts` (`sharded`: ingress, embedder and searcher deployments;
`local`: one ingress replica that embeds and searches in-process), and prints p50/p99 latency,
requests/s and where the median request spent its time (outside the ingress: HTTP, the proxy and
its hop; inside: embedding, searching), the HTTP+Serve overhead at p50 against in-process, and
the batched/unbatched throughput ratio. The model runs in `--precision` (default: the CPU
default, int8 onnxruntime for a student), in-process and in Serve alike.

Then the fault scenarios (`--faults`, on by default; `--no-faults` skips them), each a window of
`--fault-seconds` of the same query load (concurrency 4) against the batched app, side by side
with a clean window: a replica killed (`ray.kill`) two seconds in (embedder, one searcher, the
ingress), 70 slow clients trickling a byte every 2 s, and 6 clients looping on a costly image (a
7999x7999 PNG of ~200 KB). It prints req/s, p50/p99 and the status codes each window got (`-1`:
no HTTP answer at all). Figures, never asserts.
"""

from __future__ import annotations

import argparse
import collections
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


def _fault_window(url: str, queries: list[bytes], seconds: float, disturb) -> dict:
    """`seconds` of concurrency-4 load (at most 2000 requests) while `disturb(stop)` runs in a
    thread; returns req/s, p50/p99 of the 200s and the count of each status code."""
    codes: collections.Counter = collections.Counter()
    lat: list[float] = []
    lock = threading.Lock()
    stop = threading.Event()
    deadline = time.monotonic() + seconds
    local = threading.local()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        local.session = requests.Session()
        while time.monotonic() < deadline:
            with lock:
                if sum(codes.values()) >= 2000:
                    return
            t = time.perf_counter()
            try:
                code = local.session.post(url, data=rng.choice(queries), timeout=60).status_code
            except requests.RequestException:
                code = -1
            with lock:
                codes[code] += 1
                if code == 200:
                    lat.append((time.perf_counter() - t) * 1000)

    extra = threading.Thread(target=disturb, args=(stop,), daemon=True)
    t0 = time.perf_counter()
    extra.start()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(worker, range(4)))
    wall = time.perf_counter() - t0
    stop.set()
    extra.join(timeout=60)
    arr = np.array(lat) if lat else np.array([np.nan])
    return {"rps": codes[200] / wall, "p50": float(np.percentile(arr, 50)),
            "p99": float(np.percentile(arr, 99)), "codes": dict(sorted(codes.items()))}  # fmt: skip


def _kill_after(deployment: str, delay: float):
    def disturb(stop: threading.Event) -> None:
        import ray

        if stop.wait(delay):
            return
        for a in ray.util.list_named_actors(all_namespaces=True):
            if a["name"].startswith("SERVE_REPLICA") and f"#{deployment}#" in a["name"]:
                ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)
                return

    return disturb


def _clients(n: int, loop, join_s: float):
    """A disturbance of `n` threads each running `loop(stop)` until the window ends."""

    def disturb(stop: threading.Event) -> None:
        threads = [threading.Thread(target=loop, args=(stop,), daemon=True) for _ in range(n)]
        for t in threads:
            t.start()
        stop.wait()
        for t in threads:
            t.join(timeout=join_s)

    return disturb


def _slow_clients(port: int, n: int = 70, gap_s: float = 2.0):
    def one(stop: threading.Event) -> None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"POST /v1/match HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          b"Content-Length: 100000\r\n\r\n")  # fmt: skip
                s.settimeout(gap_s)
                while not stop.is_set():
                    s.sendall(b"x")
                    try:
                        if s.recv(4096):
                            return  # answered (the body deadline passed)
                    except TimeoutError:
                        pass
        except OSError:
            return

    def loop(stop: threading.Event) -> None:
        while not stop.is_set():  # each slow client comes back as soon as it is answered
            one(stop)

    return _clients(n, loop, join_s=10)


def _costly_clients(url: str, n: int = 6):
    buf = io.BytesIO()
    Image.new("L", (7999, 7999), 128).save(buf, "PNG", compress_level=9)
    data = buf.getvalue()

    def loop(stop: threading.Event) -> None:
        session = requests.Session()
        while not stop.is_set():
            try:
                session.post(url, data=data, timeout=60)
            except requests.RequestException:
                time.sleep(0.1)

    return _clients(n, loop, join_s=70), len(data)


def _wait_healthy(base: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{base}/v1/health", timeout=5).json().get("status") == "ok":
                return
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.5)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--photos", default=str(REPO.parent / "shared" / "data" / "photos"))
    p.add_argument("--refs", type=int, default=100, help="references in the index")
    p.add_argument("--requests", default="40,120,200", help="requests at concurrency 1,8,32")
    p.add_argument("--budget", type=float, default=60.0, help="seconds at most per setting")
    p.add_argument("--threads", type=int, default=2, help="torch threads, in-process and Serve")
    p.add_argument("--faults", action=argparse.BooleanOptionalAction, default=True,
                   help="run the fault scenarios after the latency settings")  # fmt: skip
    p.add_argument("--fault-seconds", type=float, default=15.0, help="length of each window")
    p.add_argument("--only-faults", action="store_true", help="skip the latency settings")
    p.add_argument("--ingress-replicas", type=int, default=1)
    p.add_argument("--layouts", default="sharded,local",
                   help="Serve layouts to measure side by side (faults: sharded only)")  # fmt: skip
    p.add_argument("--precision", default="auto",
                   help="compute precision of the model, in-process and in Serve (auto: the "
                   "CPU default, int8 onnxruntime for students)")  # fmt: skip
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
    model = load_model(args.model, precision=args.precision, backend="auto",
                       threads=args.threads)  # fmt: skip
    root = _build_index(model, photos[: args.refs], tmp)
    queries = _queries(photos[: args.refs], 64)
    index = load_index(root)
    results: dict[str, dict[int, dict]] = {}
    faults: dict[str, dict] = {}

    inline: list[tuple[float, float, float, float]] = []

    def in_process(data: bytes) -> bool:
        t0 = time.perf_counter()
        q = model.embed(load_for_model(data, model.image_size)[None])
        t1 = time.perf_counter()
        index.search(q, 10, fingerprint=model.fingerprint)
        t2 = time.perf_counter()
        inline.append((1000 * (t2 - t0), 1000 * (t2 - t0), 1000 * (t1 - t0), 1000 * (t2 - t1)))
        return True

    in_process(queries[0])
    if not args.only_faults:
        results["in-process"] = {}
        for c, n in zip(CONCURRENCY, counts, strict=True):
            inline.clear()
            results["in-process"][c] = _load(in_process, queries, c, n, args.budget)
            results["in-process"][c]["stages"] = np.median(np.array(inline), axis=0).tolist()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/v1/match"
    local = threading.local()
    # per request: (client ms, ingress took_ms, ingress embed ms, ingress search ms)
    stages: list[tuple[float, float, float, float]] = []

    def over_http(data: bytes) -> bool:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        t = time.perf_counter()
        r = local.session.post(url, data=data, timeout=120)
        ms = 1000 * (time.perf_counter() - t)
        if r.status_code == 200:
            body = r.json()
            stages.append((ms, body["took_ms"], body["timings_ms"]["embed"],
                           body["timings_ms"]["search"]))  # fmt: skip
        return r.status_code == 200

    layouts = ["sharded"] if args.only_faults else args.layouts.split(",")
    settings = [(f"{name} {layout}", batch, layout) for layout in layouts
                for name, batch in (("batched", 16), ("unbatched", 1))]  # fmt: skip
    for label, batch, layout in settings[:1] if args.only_faults else settings:
        cfg = ServeConfig(
            index=root,
            model=args.model,
            port=port,
            max_batch_size=batch,
            embed_threads=args.threads,
            embedder_cpus=1.0,
            max_queued_requests=1024,
            ingress_replicas=args.ingress_replicas,
            precision=args.precision,
            layout=layout,
            name="bench",
        )
        serve.run(build_app(cfg), name="bench", route_prefix="/", blocking=False)
        for _ in range(4):
            over_http(queries[0])
        if not args.only_faults:
            results[label] = {}
            for c, n in zip(CONCURRENCY, counts, strict=True):
                stages.clear()
                results[label][c] = _load(over_http, queries, c, n, args.budget)
                results[label][c]["stages"] = np.median(np.array(stages), axis=0).tolist()
        if label == "batched sharded" and (args.faults or args.only_faults):
            base = f"http://127.0.0.1:{port}"
            costly, costly_bytes = _costly_clients(url)
            scenarios = {
                "clean": lambda stop: stop.wait(),
                "embedder killed": _kill_after("Embedder", 2.0),
                "searcher killed": _kill_after("Searcher0", 2.0),
                "ingress killed": _kill_after("Ingress", 2.0),
                "70 slow clients": _slow_clients(port),
                f"6 x costly PNG ({costly_bytes // 1000} KB, 64 MP)": costly,
            }
            for name, disturb in scenarios.items():
                _wait_healthy(base)
                faults[name] = _fault_window(url, queries, args.fault_seconds, disturb)
    serve.shutdown()
    ray.shutdown()

    if results:
        print(
            f"\nmodel {model.name} ({model.image_size}px, {model.dim}-d, {model.backend} "
            f"{model.precision}), {args.refs} references in 2 shards, threads {args.threads}, "
            f"{len(queries)} distinct query JPEGs"
        )
        print(f"{'setting':<18}{'conc':>5}{'n':>6}{'err':>5}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>8}"
              "   median ms: outside ingress | ingress embed | ingress search")  # fmt: skip
        for label, by_c in results.items():
            for c, r in by_c.items():
                where = ""
                if "stages" in r:  # client - took: HTTP, proxy and the proxy->ingress hop
                    client, took, embed, search = r["stages"]
                    where = f"   {client - took:>8.1f} | {embed:>13.1f} | {search:>14.1f}"
                print(
                    f"{label:<18}{c:>5}{r['n']:>6}{r['errors']:>5}{r['p50']:>9.1f}{r['p99']:>9.1f}"
                    f"{r['rps']:>8.1f}{where}"
                )
    if faults:
        print(f"\nfaults: {args.fault_seconds:.0f} s windows of concurrency-4 load each, "
              f"{args.ingress_replicas} ingress replica(s)")  # fmt: skip
        print(f"{'scenario':<34}{'req/s':>7}{'p50 ms':>9}{'p99 ms':>9}  status codes")
        for name, r in faults.items():
            print(f"{name:<34}{r['rps']:>7.1f}{r['p50']:>9.1f}{r['p99']:>9.1f}  {r['codes']}")
    if args.only_faults:
        return 0
    base = results["in-process"]
    for layout in layouts:
        hb, hu = results[f"batched {layout}"], results[f"unbatched {layout}"]
        print(
            f"{layout}: HTTP+Serve overhead at p50, concurrency 1: batched "
            f"{hb[1]['p50'] - base[1]['p50']:+.1f} ms, unbatched "
            f"{hu[1]['p50'] - base[1]['p50']:+.1f} ms (aim: within 15 ms)"
        )
        for c in (8, 32):
            print(
                f"{layout}: batching at concurrency {c}: {hb[c]['rps'] / hu[c]['rps']:.2f}x the "
                f"unbatched req/s; HTTP batched vs in-process {hb[c]['rps'] / base[c]['rps']:.2f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
