"""Build time, memory, recall@10 and queries/s of `rdcd index` factories beside exact search.

    python benchmarks/index.py [--sizes 100000,1000000] [--model default] [--queries 500]
                               [--nprobes 8,16,32,64,128] [--skip-flat-above 1000000]

Vectors. Real descriptors first: the model (default: the shipped 256-d student) embeds
../shared/data (photos, imagenet_dev, copy-pair originals) as references, and seeded edited copies
of the photos (rdcd.edits.random_copy) as queries. Millions of real images are not at hand, so the
rest of each set is synthetic but drawn to look like the real ones: a Gaussian with the real
references' mean and covariance (same anisotropic spectrum, which is what IVF and PQ are sensitive
to), plus near-duplicate clusters (a tenth of the vectors are noisy copies of others, at the
similarity real copies have to their originals). The script prints both sets' similarity
statistics side by side so the resemblance can be judged. Queries: the real edited copies plus
synthetic copies of random references, as many as `--queries` in all.

Each setting is built with `build_index` (Ray tasks, files on local disk, hashes verified) and
searched through `load_index(...).search`, exactly as Serve and `rdcd match` do:

    exact          faiss.IndexFlatIP over every vector, in this process: the baseline
    Flat           the sharded path with exact codes (1 shard and 4 shards)
    IVF-SQ8        IVF lists, 8-bit scalar codes, no re-rank (approximate scores)
    IVF-SQ8+RFlat  the default beyond 250k: SQ8 candidates re-ranked with exact inner products
    IVF-PQ         IVF lists, PQ codes of dim/8 bytes (the smallest), no re-rank

Figures: build seconds (sample + train + add + write + verify), bytes on disk, resident memory
added by loading the index, recall@10 against exact search, queries/s in one batch of all queries
(2 FAISS threads, the machine's cores) and one query at a time (1 FAISS thread, as in Serve),
and the speed-up over exact. The load average is printed with each size: on a shared machine
the absolute rates drop, the comparisons within one size stay meaningful.
Then a sweep of nprobe on the default factory. Figures only, never asserts.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rdcd import index as rindex  # noqa: E402
from rdcd import store  # noqa: E402
from rdcd.search import knn  # noqa: E402

DATA = Path(os.environ.get("RDCD_SHARED_DATA", REPO.parent / "shared" / "data"))
CACHE = REPO / "runs" / "cache"


def rss() -> int:
    """Resident bytes of this process (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def real_descriptors(model: str, n_queries: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Real reference descriptors and descriptors of edited copies of the photos (cached)."""
    import hashlib

    from PIL import Image

    from rdcd.edits import random_copy
    from rdcd.embed import embed_files
    from rdcd.models.resolve import load_model

    embedder = load_model(model)
    key = hashlib.sha256(f"{embedder.fingerprint}:{n_queries}".encode()).hexdigest()[:12]
    cache = CACHE / f"index-bench-{key}.npz"
    if cache.exists():
        z = np.load(cache)
        return z["refs"], z["queries"], embedder.fingerprint
    photos = sorted((DATA / "photos").glob("*.jpg"))
    if not photos:
        sys.exit(f"no photos under {DATA}/photos: set RDCD_SHARED_DATA")
    refs = photos + sorted((DATA / "imagenet_dev").glob("*.*"))
    refs += sorted({DATA / r.split(",")[0] for r in (DATA / "copy_pairs.csv").read_text()
                    .splitlines()[1:]})  # fmt: skip
    print(f"embedding {len(refs)} real references with {model} (cached afterwards) ...")
    r = embed_files(embedder, [str(p) for p in refs], progress=False).embeddings
    rng = random.Random(0)
    tmp = Path(tempfile.mkdtemp())
    edited = []
    for i, p in enumerate(rng.sample(photos, min(len(photos), n_queries))):
        img, _ = random_copy(Image.open(p).convert("RGB"), rng)
        edited.append(tmp / f"q{i}.jpg")
        img.convert("RGB").save(edited[-1], quality=85)
    q = embed_files(embedder, [str(p) for p in edited], progress=False).embeddings
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(cache, refs=r, queries=q)
    return r, q, embedder.fingerprint


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class Synth:
    """Vectors drawn like the real ones: a Gaussian mixture fitted to the real references (64
    spherical k-means centres, the pooled within-cluster covariance, so both the cluster
    structure and the anisotropic spectrum carry over), widened to the real similarity
    statistics, normalised, with a tenth of the vectors
    noisy copies of others at the similarity real copies have to their originals."""

    def __init__(self, refs: np.ndarray, copy_cos: float, clusters: int = 64, spread: float = 1.4,
                 seed: int = 0):  # fmt: skip
        km = faiss.Kmeans(refs.shape[1], clusters, niter=25, seed=seed, spherical=True)
        km.train(np.ascontiguousarray(refs))
        _, assign = km.index.search(refs, 1)
        self.centres = km.centroids
        self.weights = np.bincount(assign[:, 0], minlength=clusters) / len(refs)
        resid = refs - self.centres[assign[:, 0]]
        cov = np.cov(resid, rowvar=False)
        cov += 1e-3 * np.trace(cov) / len(cov) * np.eye(len(cov))  # shrink: few rows per dim
        # 64 centres fitted to 1.4k vectors sit too close to them: widening the clusters by
        # `spread` makes the synthetic set's nearest-neighbour and random-pair similarities
        # match the real set's at equal size (printed by `similarity_stats`).
        self.chol = (spread * np.linalg.cholesky(cov).T).astype(np.float32)
        self.copy_cos = copy_cos
        self.rng = np.random.default_rng(seed)

    def _centred(self, n: int) -> np.ndarray:
        z = self.rng.standard_normal((n, len(self.chol))).astype(np.float32)
        return z @ self.chol

    def draw(self, n: int) -> np.ndarray:
        c = self.rng.choice(len(self.centres), n, p=self.weights)
        return _unit(self.centres[c] + self._centred(n))

    def copies(self, of: np.ndarray) -> np.ndarray:
        """Noisy copies with cosine about `copy_cos` to `of` (noise shaped like the data)."""
        noise = _unit(self._centred(len(of)))
        t = np.sqrt(1 / self.copy_cos**2 - 1)
        return _unit(of + t * noise)

    def references(self, n: int, real: np.ndarray, chunk: int = 100_000) -> np.ndarray:
        out = np.empty((n, len(self.chol)), np.float32)
        out[: len(real)] = real
        pos = len(real)
        while pos < n:
            m = min(chunk, n - pos)
            block = self.draw(m)
            dup = self.rng.random(m) < 0.1
            src = self.rng.integers(0, max(1, pos), int(dup.sum()))
            block[dup] = self.copies(out[src]) if pos else block[dup]
            out[pos : pos + m] = block
            pos += m
        return out


def similarity_stats(x: np.ndarray, sample: int = 1000) -> tuple[float, float]:
    """Mean cosine to the nearest other vector, and mean cosine between random pairs."""
    rng = np.random.default_rng(1)
    pick = rng.choice(len(x), min(sample, len(x)), replace=False)
    s, _ = knn(x[pick], x, 2)
    pairs = rng.choice(len(x), (sample, 2))
    return float(s[:, 1].mean()), float(
        np.einsum("nd,nd->n", x[pairs[:, 0]], x[pairs[:, 1]]).mean()
    )


def top1_agreement(got: np.ndarray, want: np.ndarray) -> float:
    """How often the best match is exact search's best match: for copy detection the neighbour
    that matters is the top one (the original of a copy), not the 9 distractors behind it."""
    return float(np.mean(got[:, 0] == want[:, 0]))


def recall_at(got: np.ndarray, want: np.ndarray) -> float:
    k = want.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, want, strict=True)]))


def timed_queries(search, queries: np.ndarray, singles: int) -> tuple[float, float, np.ndarray]:
    """(batch queries/s, one-at-a-time queries/s, ids of the batch search)."""
    search(queries[:4])  # warm up
    t = time.perf_counter()
    ids = search(queries)
    batch = len(queries) / (time.perf_counter() - t)
    # One query at a time as a server sees them: one FAISS thread per query (parallelism comes
    # from concurrent requests), so OpenMP start-up and barriers do not dominate.
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    t = time.perf_counter()
    for q in queries[:singles]:
        search(q[None])
    single = singles / (time.perf_counter() - t)
    faiss.omp_set_num_threads(threads)
    return batch, single, ids


def bench_setting(name: str, run: str, root: str, factory: str | None, shards: int,
                  fingerprint: str, queries: np.ndarray, want: np.ndarray, exact_qps: tuple,
                  singles: int) -> dict:  # fmt: skip
    t = time.perf_counter()
    manifest = rindex.build_index(rindex.IndexConfig(run, root, factory=factory, shards=shards,
                                                     task_cpus=1.0))  # fmt: skip
    build = time.perf_counter() - t
    disk = sum(f.stat().st_size for f in Path(root, f"v{manifest['version']}").iterdir())
    gc.collect()
    before = rss()
    ix = rindex.load_index(root)
    loaded = rss() - before
    batch, single, ids = timed_queries(
        lambda q: ix.search(q, 10, fingerprint=fingerprint).ids, queries, singles
    )
    row = {
        "setting": name, "factory": manifest["factory"], "shards": len(manifest["shards"]),
        "build_s": round(build, 1), "train_s": manifest["build"]["train_seconds"],
        "disk_mb": round(disk / 2**20, 1), "rss_mb": round(loaded / 2**20, 1),
        "recall@10": round(recall_at(ids, want), 4), "top1": round(top1_agreement(ids, want), 4),
        "qps_batch": round(batch, 1), "qps_single": round(single, 1),
        "speedup_batch": round(batch / exact_qps[0], 1),
        "speedup_single": round(single / exact_qps[1], 1),
        "nprobe": manifest["search"]["nprobe"],
    }  # fmt: skip
    print_row(row)
    return {"row": row, "index": ix}


COLUMNS = ("setting", "factory", "shards", "build_s", "disk_mb", "rss_mb", "recall@10", "top1",
           "qps_batch", "speedup_batch", "qps_single", "speedup_single", "nprobe")  # fmt: skip


def print_row(row: dict) -> None:
    print("  ".join(f"{str(row.get(c, '')):>{max(len(c), 8)}}" for c in COLUMNS), flush=True)


def sweep_nprobe(ix, nprobes: list[int], fingerprint: str, queries: np.ndarray, want: np.ndarray,
                 exact_qps: tuple, singles: int) -> list[dict]:  # fmt: skip
    rows = []
    print(f"\n  nprobe sweep on {ix.info['factory']} ({len(ix.shards)} shard(s))")
    print("    nprobe  recall@10    top1  qps_batch  speedup  qps_single  speedup")
    for nprobe in nprobes:
        for s in ix.shards:
            rindex.tune(s.index, nprobe, None)
        batch, single, ids = timed_queries(
            lambda q: ix.search(q, 10, fingerprint=fingerprint).ids, queries, singles
        )
        r = {"nprobe": nprobe, "recall@10": round(recall_at(ids, want), 4),
             "top1": round(top1_agreement(ids, want), 4),
             "qps_batch": round(batch, 1), "qps_single": round(single, 1),
             "speedup_batch": round(batch / exact_qps[0], 1),
             "speedup_single": round(single / exact_qps[1], 1)}  # fmt: skip
        print(f"    {nprobe:>6}  {r['recall@10']:>9}  {r['top1']:>6}  {r['qps_batch']:>9}  "
              f"{r['speedup_batch']:>6}x  {r['qps_single']:>10}  {r['speedup_single']:>6}x",
              flush=True)  # fmt: skip
        rows.append(r)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--model", default="default")
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--singles", type=int, default=100, help="queries timed one at a time")
    ap.add_argument("--nprobes", default="8,16,32,64,128")
    ap.add_argument("--skip-flat-above", type=int, default=1_000_000)
    ap.add_argument("--settings", help="only these settings, comma-separated (e.g. IVF-SQ8+RFlat)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    import ray

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False,
             object_store_memory=512 * 2**20, logging_level="ERROR")  # fmt: skip
    real_refs, real_q, fingerprint = real_descriptors(args.model, args.queries)
    dim = real_refs.shape[1]
    copy_cos = float(np.median(knn(real_q, real_refs, 1)[0]))
    synth = Synth(real_refs, copy_cos)
    print(f"machine: {os.cpu_count()} CPUs, FAISS {faiss.__version__}, model {args.model} "
          f"({dim}-d, {fingerprint[:12]})")  # fmt: skip
    print(f"real: {len(real_refs)} references, {len(real_q)} edited copies "
          f"(median cosine to the nearest reference {copy_cos:.3f})")  # fmt: skip
    results: dict = {"machine": {"cpus": os.cpu_count(), "faiss": faiss.__version__},
                     "model": args.model, "sizes": {}}  # fmt: skip
    for n in [int(s) for s in args.sizes.split(",")]:
        work = Path(tempfile.mkdtemp(prefix=f"rdcd-index-bench-{n}-"))
        refs = synth.references(n, real_refs)
        extra = max(0, args.queries - len(real_q))
        src = np.random.default_rng(2).integers(0, n, extra)
        queries = np.concatenate([real_q, synth.copies(refs[src])])[: args.queries]
        nn_r, pair_r = similarity_stats(real_refs)
        nn_s, pair_s = similarity_stats(refs[len(real_refs) :][:20_000])
        print(f"\n== {n:,} vectors x {dim} dims ({n * dim * 4 / 2**30:.2f} GiB float32), "
              f"load average {os.getloadavg()[0]:.1f} ==")  # fmt: skip
        print(f"similarity   nearest-other  random-pair   (real {len(real_refs)} | synthetic)")
        print(f"             {nn_r:.3f} | {nn_s:.3f}  {pair_r:.3f} | {pair_s:.3f}")
        t = time.perf_counter()
        part = max(5_000, n // 20)  # 20 parts: groups for 1 to 4 shards
        ident = store.RunIdentity(fingerprint, args.model, dim, 288, "fp32", part)
        run = str(work / "run")
        store.write_embeddings(run, [f"ref/{i:08d}.jpg" for i in range(n)], refs, ident)
        print(f"embedding run written in {time.perf_counter() - t:.1f} s")
        exact = faiss.IndexFlatIP(dim)
        exact.add(refs)

        def exact_ids(q: np.ndarray, index: faiss.Index = exact) -> np.ndarray:
            return index.search(q, 10)[1]

        e_batch, e_single, want = timed_queries(exact_ids, queries, args.singles)
        row = {"setting": "exact", "factory": "IndexFlatIP", "shards": 1, "build_s": "-",
               "disk_mb": "-", "rss_mb": round(n * dim * 4 / 2**20, 1),
               "recall@10": 1.0, "top1": 1.0,
               "qps_batch": round(e_batch, 1), "qps_single": round(e_single, 1),
               "speedup_batch": 1.0, "speedup_single": 1.0, "nprobe": "-"}  # fmt: skip
        del exact, exact_ids
        auto = rindex.choose_factory(n, dim)
        print(f"automatic choice: {auto.factory} ({auto.reason})")
        print("  ".join(f"{c:>{max(len(c), 8)}}" for c in COLUMNS))
        print_row(row)
        rows = [row]
        nlist = rindex.ivf_lists(n)
        pq = dim // 8
        settings = [
            ("Flat", "Flat", 1),
            ("Flat x4", "Flat", 4),
            ("IVF-SQ8", f"IVF{nlist},SQ8", 1),
            ("IVF-PQ", f"IVF{nlist},PQ{pq}x8", 1),
            ("IVF-SQ8+RFlat", f"IVF{nlist},SQ8,RFlat", 1),  # the automatic choice beyond 250k
            ("IVF-SQ8+RFlat x4", f"IVF{nlist},SQ8,RFlat", 4),
        ]
        if args.settings:
            settings = [s for s in settings if s[0] in args.settings.split(",")]
        if n > args.skip_flat_above:
            settings = [s for s in settings if s[1] != "Flat"]
        kept = None
        for name, factory, shards in settings:
            root = str(work / name.replace(" ", "_").replace("+", "_"))
            out = bench_setting(name, run, root, factory, shards, fingerprint, queries, want,
                                (e_batch, e_single), args.singles)  # fmt: skip
            rows.append(out["row"])
            if name == "IVF-SQ8+RFlat" and "IVF" in out["row"]["factory"]:
                kept = out["index"]
            del out
            gc.collect()
        sweep = []
        if kept is not None:
            sweep = sweep_nprobe(kept, [int(x) for x in args.nprobes.split(",")], fingerprint,
                                 queries, want, (e_batch, e_single), args.singles)  # fmt: skip
        results["sizes"][str(n)] = {"rows": rows, "nprobe_sweep": sweep,
                                    "similarity": {"real": [nn_r, pair_r],
                                                   "synthetic": [nn_s, pair_s]}}  # fmt: skip
        del kept, refs
        gc.collect()
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    ray.shutdown()


if __name__ == "__main__":
    main()
