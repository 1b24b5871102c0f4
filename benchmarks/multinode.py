"""Multi-node figures: a two-node Ray cluster that loses its worker mid-job, and the embed driver's
memory per input image.

    python benchmarks/multinode.py [--images 160] [--shard-size 16] [--batch-size 8]
                                   [--model default] [--driver-images 1000000] [--skip-cluster]

Cluster (the scenario of tests/test_multinode.py, on more images): `ray start --head` (1 CPU:
drivers and decode tasks) and `ray start --address` (3 CPUs: the model actor) as separate process
trees; `ray job submit -- python -m jobs.embed` over real photos; the worker node is SIGKILLed
once it has embedded a batch and a replacement joins; then `python -m jobs.build_index`. Printed:
the time from submission to the worker's first batch (driver start, runtime env, actor start and
model load), from the kill to the replacement joining and to the job's end, model batches per
node, rows delivered twice and dropped, and the index job's wall time. Baseline: the job's own
rate from run.json (first to last model batch, so it includes the loss), to set beside the
single-node rates of benchmarks/embed_job.py.

Driver memory: the embed job's driver holds the input manifest (URI, size, ETag per image) and the
list of model batches; both grow with the input. Measured for `--driver-images` synthetic S3 URIs
beside a bare Python list of the same URIs (the floor), it sets how many images one run can take
(docs/scaling.md). Figures only, never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))  # LocalCluster and the scenario live there


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def driver_memory(n: int, shard_size: int = 10_000, batch_size: int = 128) -> None:
    from rdcd import store
    from rdcd.embed import _group_items

    base = _rss()
    uris = [f"s3://your-bucket/disc21/references/R{i:010d}.jpg" for i in range(n)]
    bare = _rss() - base
    versions = [f'"{i:032x}"' for i in range(n)]  # ETags: 32 hex digits in quotes
    manifest = store.Manifest(uris, np.full(n, 100_000, np.int64), versions, "s3://your-bucket/")
    with_manifest = _rss() - base
    t0 = time.perf_counter()
    parts = list(range(store.num_parts(n, shard_size)))
    items = _group_items(manifest, parts, shard_size, batch_size)
    group_seconds = time.perf_counter() - t0
    total = _rss() - base
    print(f"\nembed driver memory for {n:,} images (shard {shard_size:,}, batch {batch_size}):")
    print(f"  bare list of URIs (floor)        {bare / n:6.0f} B/image")
    print(f"  manifest (URI, size, ETag)       {with_manifest / n:6.0f} B/image")
    print(f"  + model batches ({len(items):,} groups)   {total / n:6.0f} B/image "
          f"({group_seconds:.1f} s to plan)")  # fmt: skip
    for scale in (10_000_000, 100_000_000, 1_000_000_000):
        print(f"  -> {scale:>13,} images in one run: {total / n * scale / 1024**3:7.1f} GiB")


def cluster_run(args: argparse.Namespace) -> None:
    from test_multinode import (
        _count_by_node,
        build_index_job,
        embed_with_node_loss,
        start_cluster,
    )

    from rdcd import io as rio
    from rdcd import store

    shared = os.path.abspath(
        os.environ.get("RDCD_SHARED_DATA", os.path.join(REPO, "..", "shared", "data"))
    )
    photos = sorted(f.uri for f in rio.list_files(os.path.join(shared, "photos"), (".jpg",)))
    if len(photos) < args.images:
        print(f"cluster run skipped: {len(photos)} photos under {shared}, {args.images} wanted")
        return
    work = tempfile.mkdtemp(prefix="rdcd-mn-bench-")
    t0 = time.monotonic()
    cluster = start_cluster()
    try:
        ready = time.monotonic() - t0
        out = os.path.join(work, "emb")
        run = embed_with_node_loss(cluster, photos[: args.images], out, shard=args.shard_size,
                                   batch=args.batch_size, model=args.model)  # fmt: skip
        index = build_index_job(cluster, out, os.path.join(work, "index"))
    finally:
        cluster.close()
    record = json.loads(rio.read_text(rio.join(out, "run.json")))
    ids = store.read_embeddings(out).ids
    names = {v: k for k, v in run["nodes"].items()}
    per_node = {names.get(k, k[:8]): v for k, v in _count_by_node(run["tasks"]).items()}
    attempt = record["attempts"][-1]
    print(f"\ntwo-node cluster, {args.images} photos, model {args.model}, shard {args.shard_size},"
          f" batch {args.batch_size} (load average {os.getloadavg()[0]:.1f}):")  # fmt: skip
    print(f"  head + worker ready                 {ready:6.1f} s")
    for key, value in run["timings"].items():
        print(f"  {key.removesuffix('_s').replace('_', ' '):35s} {value:6.1f} s")
    print(f"  embed job                           {run['status']}, {len(ids)} rows, ids unique: "
          f"{len(set(ids.tolist())) == len(ids)}, parts committed before the kill: "
          f"{run['parts_before_kill']}")  # fmt: skip
    print(f"  model batches per node              {per_node}")
    print(f"  rows delivered twice and dropped    {attempt.get('duplicates_dropped')}")
    print(f"  job rate, first to last batch       {attempt.get('steady_images_per_second')} img/s"
          f" (across the loss; whole job {attempt.get('images_per_second')} img/s)")  # fmt: skip
    print(f"  index job (2 shard tasks)           {index['status']} in {index['seconds']} s")
    print(f"  leftover processes                  {cluster.leftovers or 'none'}")
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=160)
    p.add_argument("--shard-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--model", default="default")
    p.add_argument("--driver-images", type=int, default=1_000_000)
    p.add_argument("--skip-cluster", action="store_true")
    args = p.parse_args()
    if not args.skip_cluster:
        cluster_run(args)
    driver_memory(args.driver_images)


if __name__ == "__main__":
    main()
