"""Images/s and memory of the bulk embedding job (`rdcd embed`) beside a plain single-process loop.

    python benchmarks/embed_job.py [--images DIR] [--n 200] [--model sscd] [--batch-size 32]
                                   [--cores 1,2] [--repeats 1]

Both sides embed the same images with the same decoder (`load_for_model`), the same model and the
same batch size:

  plain loop  - one process, no Ray, no threads: read, decode, resize a batch, embed it, repeat
                (model loaded before the clock starts); its own process, so its peak RSS is its own
  job         - `run_embed_job` on a local Ray instance limited to `--cores` CPUs, writing Parquet
                parts to a temporary folder; timed end to end (listing, manifest, actor start-up
                and model load, writes) and in steady state (from the first embedded batch on)

Memory of the job is the peak sum of proportional set sizes (PSS, so the shared object store is
not counted once per process) of the driver and every Ray process it started.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from rdcd import io as rio
from rdcd.decode import load_for_model


def default_images() -> str:
    shared = os.environ.get("RDCD_SHARED_DATA", os.path.join("..", "shared", "data"))
    return os.path.join(shared, "photos")


def plain_loop(uris: list[str], model_spec: str, batch_size: int) -> dict:
    """The baseline: the simplest correct loop a user would write, in this process."""
    from rdcd.embed import load_embedder

    model = load_embedder(model_spec)
    model.embed(np.zeros((1, model.image_size, model.image_size, 3), np.uint8))  # warm-up
    t0 = time.perf_counter()
    done = 0
    for start in range(0, len(uris), batch_size):
        pixels = []
        for uri in uris[start : start + batch_size]:
            try:
                pixels.append(load_for_model(rio.read_bytes(uri), model.image_size))
            except Exception:  # noqa: BLE001 - the baseline skips what it cannot decode
                continue
        if pixels:
            model.embed(np.stack(pixels))
            done += len(pixels)
    seconds = time.perf_counter() - t0
    return {
        "images": done,
        "seconds": seconds,
        "images_per_second": done / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "model": model.name,
    }


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemory:
    """Samples the PSS of this process and all its descendants (Ray's raylet, GCS, workers)."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.peak_kb = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids, frontier = [], [os.getpid()]
            while frontier:
                pid = frontier.pop()
                pids.append(pid)
                frontier += _children(pid)
            self.peak_kb = max(self.peak_kb, sum(_pss_kb(p) for p in pids))
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def job(images_manifest: str, model: str, batch_size: int, shard_size: int, cores: int) -> dict:
    """One run of the job on a fresh local Ray instance with `cores` CPUs."""
    import logging

    import ray

    from rdcd.embed import EmbedJobConfig, run_embed_job

    ray.init(num_cpus=cores, include_dashboard=False, logging_level=logging.ERROR)
    try:
        with tempfile.TemporaryDirectory() as out, TreeMemory() as mem:
            cfg = EmbedJobConfig(images=images_manifest, out=out, model=model,
                                 batch_size=batch_size, shard_size=shard_size,
                                 progress=False)  # fmt: skip
            t0 = time.perf_counter()
            run = run_embed_job(cfg)
            wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    n = run["counts"]["images"]
    attempt = run["attempts"][-1]
    return {
        "images": n,
        "errors": run["counts"]["errors"],
        "wall_seconds": wall,
        "images_per_second": n / wall,
        "steady_images_per_second": attempt.get("steady_images_per_second"),
        "first_result_seconds": attempt.get("first_result_seconds"),
        "peak_pss_mb": mem.peak_kb / 1024,
        "plan": attempt.get("plan"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", default=default_images(), help="folder of images")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--model", default="sscd", help="`sscd` or a student checkpoint")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--cores", default="1,2", help="Ray CPU counts to run the job with")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--plain-only", help=argparse.SUPPRESS)  # internal: the baseline subprocess
    args = p.parse_args()

    if args.plain_only:
        uris = rio.read_text(args.plain_only).split()
        print(json.dumps(plain_loop(uris, args.model, args.batch_size)))
        return

    uris = [f.uri for f in rio.list_files(args.images, rio.IMAGE_SUFFIXES)][: args.n]
    tmp = tempfile.mkdtemp(prefix="rdcd-bench-")
    listing = os.path.join(tmp, "images.txt")
    rio.write_text(listing, "\n".join(uris) + "\n")
    cores = [int(c) for c in args.cores.split(",") if c]
    print(f"{len(uris)} images from {args.images}, model {args.model}, batch {args.batch_size}, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"load average {os.getloadavg()[0]:.1f} at start")  # fmt: skip
    plain_runs, job_runs = [], {c: [] for c in cores}
    for _ in range(args.repeats):  # interleaved, so drifting background load hits both sides
        out = subprocess.run(
            [sys.executable, __file__, "--plain-only", listing, "--model", args.model,
             "--batch-size", str(args.batch_size)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        plain_runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        for c in cores:
            job_runs[c].append(job(listing, args.model, args.batch_size, args.shard_size, c))
    plain = max(plain_runs, key=lambda r: r["images_per_second"])
    print(f"load average {os.getloadavg()[0]:.1f} at the end; best of {args.repeats} run(s) each\n")
    head = (f"{'':<26}{'img/s':>8}{'steady':>9}{'x plain':>9}{'x plain':>10}{'first':>8}"
            f"{'peak MB':>9}")  # fmt: skip
    print(head)
    print(f"{'':<26}{'(wall)':>8}{'img/s':>9}{'(wall)':>9}{'(steady)':>10}{'batch':>8}"
          f"{'':>9}")  # fmt: skip
    print(f"{'plain loop (1 process)':<26}{plain['images_per_second']:>8.1f}{'':>9}{1.0:>9.2f}"
          f"{1.0:>10.2f}{'':>8}{plain['peak_rss_mb']:>9.0f}")  # fmt: skip
    for c in cores:
        r = max(job_runs[c], key=lambda r: r["steady_images_per_second"] or 0)
        steady = r["steady_images_per_second"] or 0.0
        plan = r["plan"] or {}
        label = f"job, {c} CPU ({plan.get('actors')}x{plan.get('threads')}thr)"
        print(f"{label:<26}{r['images_per_second']:>8.1f}{steady:>9.1f}"
              f"{r['images_per_second'] / plain['images_per_second']:>9.2f}"
              f"{steady / plain['images_per_second']:>10.2f}{r['first_result_seconds']:>7.1f}s"
              f"{r['peak_pss_mb']:>9.0f}")  # fmt: skip
    print("\nplain peak = its process's max RSS; job peak = max PSS summed over the driver and all "
          "Ray processes (raylet, GCS, workers, object store). 'first batch' = seconds until the "
          "first embedded batch reached the driver (Ray worker start-up, model load).")  # fmt: skip


if __name__ == "__main__":
    main()
