"""Sharded, versioned FAISS indexes built from embedding runs.

Layout of `<index>/` (a local path or an `s3://` URI; DESIGN.md, "Index"):

    v<N>/trained.faiss            the trained, empty index (coarse quantizer and codec); shards,
                                  delta shards and compaction all add to copies of it
    v<N>/shard-NNN.faiss          one FAISS shard; its labels are the reference ids
    v<N>/shard-NNN.refs.parquet   `id`, `uri` of the references in that shard
    v<N>/delta-NNN.faiss (+refs)  references added after the base was built
    v<N>/tombstones.parquet       `id`s removed since the base was built; searches skip them
    v<N>/background.npy           descriptors of unrelated images, for score normalisation
    v<N>/manifest.json            written once every file above is verified
    CURRENT                       `v<N>`: the published version, written last
    v<N>/_claim.json              who claimed v<N> (created exclusively, before anything else)
    v<N>/_published.json          written once `CURRENT` has named v<N>

Every function resolves the root to one canonical URI first (`rdcd.io.canonical`), so a relative
root and its absolute spelling are the same index. Two writers never share a version: a build
or update claims `v<N>` by creating `v<N>/_claim.json` exclusively (`O_EXCL` locally, a
conditional PUT on S3) before it writes anything inside, and publishes with a compare-and-swap
of `CURRENT` against the version it started from. An update that loses the race is applied
again on top of the winner (its claimed version is left unpublished), so concurrent `--add` and
`--remove` both take effect. A full build refuses to replace a published version of another
model unless told to (`allow_model_change`): a running Serve of the old model would refuse it.

A version never changes once its manifest exists. An update (delta shard, tombstones, compaction)
writes a new version whose manifest also names the unchanged files of its parent, so a server of
the old version is never disturbed, and publishing is always one small write of `CURRENT`. A build
that dies before that write leaves `CURRENT` (and everything it names) as it was.

The quantizer and codec are trained once, on a uniform random sample of every committed part, and
each shard is one Ray task that streams its group of Parquet parts into a copy of the trained
empty index. Every file is hashed by the task that writes it and read back and re-hashed before
publishing; readers check the hashes again before FAISS deserialises anything.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rdcd import io as rio
from rdcd import store
from rdcd.search import ScoreNormalizer, Shard, ShardedIndex, check_fingerprint

log = logging.getLogger(__name__)

FORMAT = "rdcd-index-v1"
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
TRAINED = "trained.faiss"
TOMBSTONES = "tombstones.parquet"
BACKGROUND = "background.npy"
CLAIM = "_claim.json"
PUBLISHED = "_published.json"
CRASH_ENV = "RDCD_TEST_CRASH_INDEX"  # tests: "before-manifest" or "before-current" -> os._exit
PAUSE_ENV = "RDCD_TEST_PAUSE_INDEX"  # tests: "before-current:SECONDS" widens the race window
UPDATE_ATTEMPTS = 5  # an update that loses a publication race is applied again this many times
FLAT_MAX = 250_000  # up to here exact search is cheap enough: ~10 ms a query on one core
SHARD_TARGET = 1_000_000  # default vectors per shard: one searcher replica's worth
DEFAULT_BUDGET = 8 * 1024**3
LOCAL_DIR = "local"
LOCAL_RECALL_PER_REFERENCE = 256  # descriptors of each reference in the recall index
FUSED_FIT_SAMPLE = 64  # references the build edits into synthetic copies to fit the fused score
FUSED_FIT_MIN = 8  # below this many references the documented default is used
FUSED_FIT_CANDIDATES = 5  # global candidates of each synthetic copy the fit verifies
_VERSION_DIR = re.compile(r"^v(\d+)$")


class IndexStoreError(ValueError):
    """An index that cannot be built, updated or read; the message says why and what to do."""


class ConcurrentUpdateError(IndexStoreError):
    """Another writer published while this one was building; nothing of ours was published."""


# ---- configuration and the choice of factory -------------------------------------------------


@dataclass
class IndexConfig:
    """How to build an index from an embedding run. The defaults build a sensible index of any
    size within 8 GiB; `factory`, `shards` and `nprobe` override the automatic choices."""

    embeddings: str = ""  # the embedding run (`rdcd embed --out`)
    out: str = ""  # the index root
    factory: str | None = None  # FAISS factory string; None = chosen from size and budget
    shards: int | None = None  # None = one per million vectors
    memory_budget: int = DEFAULT_BUDGET  # bytes the whole index may take in memory
    nprobe: int | None = None  # IVF lists searched per query; None = chosen with the factory
    k_factor: int = 4  # candidates per result that an IVF shard re-ranks exactly
    train_sample: int | None = None  # vectors to train on; None = 32 per IVF list, >= 20k
    background: str | None = None  # embedding run of unrelated images (score normalisation)
    max_background: int = 10_000
    beta: float = 1.0  # score-normalisation strength
    background_n: int = 3  # neighbours averaged by score normalisation
    allow_model_change: bool = False  # publish over a live version of another model
    task_cpus: float = 1.0  # CPUs per shard task (also FAISS threads in it)
    gpu: bool | None = None  # train the quantizer on GPU; None = when FAISS sees one
    seed: int = 0
    # local features (runs embedded with --local-features): carried into the version with a
    # local-recall index and a fused score fitted on this many synthetic copies (0: the default)
    local: bool = True
    fused_fit_sample: int = FUSED_FIT_SAMPLE

    def validate(self) -> None:
        if not self.embeddings or not self.out:
            raise ValueError("an index needs --embeddings (an embedding run) and --out")
        if self.shards is not None and self.shards < 1:
            raise ValueError(f"--shards must be >= 1, got {self.shards}")
        if self.memory_budget <= 0:
            raise ValueError(f"--memory-budget must be positive, got {self.memory_budget}")
        if self.k_factor < 1:
            raise ValueError(f"--k-factor must be >= 1, got {self.k_factor}")


@dataclass(frozen=True)
class FactoryChoice:
    factory: str
    nprobe: int | None
    bytes_per_vector: float
    reason: str


def _pow2(x: float) -> int:
    return 1 << max(0, round(math.log2(max(x, 1.0))))


def ivf_lists(n: int) -> int:
    """About 2*sqrt(n) lists (a power of two), with at least 39 training points per list."""
    nlist = _pow2(2 * math.sqrt(n))
    while nlist > 16 and nlist * 39 > n:
        nlist //= 2
    return max(16, min(nlist, 65536))


def default_nprobe(nlist: int) -> int:
    """Lists searched per query: 5/32 of them (320 of 2048 at 1M vectors). Copy-detection
    descriptors are spread almost uniformly over the sphere (random pairs have cosine ~0.01),
    the hard case for IVF: on 1M such vectors `benchmarks/index.py` measures recall@10 of 0.80
    at nlist/64, 0.91 at nlist/16, 0.948 at nlist/8 and 0.958 at 5/32, where one query is still
    8-13x faster than exact search."""
    return max(8, min(nlist, nlist * 5 // 32))


def choose_factory(n: int, dim: int, memory_budget: int = DEFAULT_BUDGET) -> FactoryChoice:
    """The FAISS factory for `n` vectors of `dim` within `memory_budget` bytes, and why.

    Exact search (Flat) up to FLAT_MAX vectors; beyond, an IVF index whose candidates are
    re-ranked with exact inner products (`RFlat`: the float32 vectors are kept), then with fp16
    vectors (scores within ~1e-3 of exact), then SQ8 codes alone, then PQ codes, whichever is
    the first that fits the budget."""
    flat = 4 * dim + 8
    if n <= FLAT_MAX and n * flat <= memory_budget:
        return FactoryChoice(
            "Flat", None, flat, f"{n:,} vectors <= {FLAT_MAX:,}: exact search, nothing to train"
        )
    nlist = ivf_lists(n)
    nprobe = default_nprobe(nlist)
    coarse = nlist * dim * 4
    candidates = [
        (f"IVF{nlist},SQ8,RFlat", dim + 4 * dim + 16, "SQ8 codes, exact re-rank from float32"),
        (f"IVF{nlist},SQ8,Refine(SQfp16)", dim + 2 * dim + 16, "SQ8 codes, fp16 re-rank"),
        (f"IVF{nlist},SQ8", dim + 8, "SQ8 codes, no re-rank (scores approximate)"),
    ]
    for m in (dim // 4, dim // 8, dim // 16):
        if m >= 4 and dim % m == 0:
            candidates.append((f"IVF{nlist},PQ{m}x8", m + 8, f"PQ{m} codes (scores approximate)"))
    for factory, per_vector, what in candidates:
        need = n * per_vector + coarse
        if need <= memory_budget:
            reason = (
                f"{n:,} vectors: {nlist} IVF lists (~2*sqrt(n)), {what}; about "
                f"{need / 1024**3:.2f} GiB of the {memory_budget / 1024**3:.2f} GiB budget"
            )
            return FactoryChoice(factory, nprobe, per_vector, reason)
    smallest = candidates[-1]
    raise IndexStoreError(
        f"{n:,} vectors of {dim} dims do not fit a {memory_budget:,}-byte budget even as "
        f"{smallest[0]} (~{n * smallest[1] + coarse:,} bytes): raise --memory-budget, or pass "
        "a smaller --factory (e.g. fewer PQ bytes)"
    )


def _nlist_of(factory: str) -> int | None:
    m = re.search(r"IVF(\d+)", factory)
    return int(m.group(1)) if m else None


def _empty_index(factory: str, dim: int) -> faiss.Index:
    """The index of `factory` for inner product, wrapped in an id map when it has no ids of its
    own (Flat, refine stages), so every shard's labels are reference ids."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise IndexStoreError(f"FAISS does not understand --factory {factory!r}: {exc}") from exc
    if _nlist_of(factory):
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        if isinstance(ivf, faiss.IndexIVFPQ):
            # Polysemous training only serves Hamming pre-filtering, which searches here never
            # use, and it dominates IVF-PQ training (minutes for PQ32 on 20k vectors).
            ivf.do_polysemous_training = False
    if isinstance(faiss.downcast_index(index), faiss.IndexIVF):
        return index
    return faiss.IndexIDMap(index)


def tune(index: faiss.Index, nprobe: int | None, k_factor: int | None) -> None:
    """Set the search-time parameters of a loaded shard (through id maps and refine stages)."""
    node = faiss.downcast_index(index)
    while True:
        if isinstance(node, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            node = faiss.downcast_index(node.index)
        elif isinstance(node, faiss.IndexRefine):
            if k_factor:
                node.k_factor = float(k_factor)
            node = faiss.downcast_index(node.base_index)
        else:
            break
    if isinstance(node, faiss.IndexIVF) and nprobe:
        node.nprobe = int(nprobe)


def _serialize(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def _deserialize(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- versions and manifests ----------------------------------------------------------------


def versions(root: str) -> list[int]:
    """Every version folder under `root`, published or not (a crashed build leaves one)."""
    root = rio.canonical(root)
    found = (_VERSION_DIR.match(name) for name in rio.list_names(root))
    return sorted(int(m.group(1)) for m in found if m)


def _parse_current(uri: str, data: bytes | None) -> int | None:
    if data is None:
        return None
    text = data.decode("utf-8", "replace").strip()
    m = _VERSION_DIR.match(text)
    if not m:
        raise IndexStoreError(f"{uri} holds {text[:40]!r}, not a version name like 'v3'")
    return int(m.group(1))


def current_version(root: str) -> int | None:
    """The published version named by `CURRENT`, or None when nothing is published."""
    uri = rio.join(rio.canonical(root), CURRENT)
    if not rio.exists(uri):
        return None
    return _parse_current(uri, rio.read_bytes(uri))


def published_versions(root: str) -> list[int]:
    """The versions `CURRENT` has named (each has `_published.json`), plus the one it names now;
    oldest first. A version that lost a publication race, or a crashed build, is not among them."""
    root = rio.canonical(root)
    out = {v for v in versions(root) if rio.exists(rio.join(root, f"v{v}", PUBLISHED))}
    now = current_version(root)
    if now is not None:
        out.add(now)
    return sorted(out)


def read_manifest(root: str, version: int | None = None) -> dict[str, Any]:
    """The manifest of `version` (default: the published one)."""
    root = rio.canonical(root)
    if version is None:
        version = current_version(root)
        if version is None:
            raise IndexStoreError(
                f"{root}: no published index (no {CURRENT}); build one with `rdcd index`"
            )
    uri = rio.join(root, f"v{version}", MANIFEST)
    if not rio.exists(uri):
        raise IndexStoreError(f"{root}: version v{version} has no manifest (an unfinished build)")
    manifest = json.loads(rio.read_text(uri))
    if manifest.get("format") != FORMAT:
        raise IndexStoreError(f"{uri} is not an rdcd index manifest")
    return manifest


def _read_checked(root: str, rel: str, sha256: str) -> bytes:
    data = rio.read_bytes(rio.join(root, *rel.split("/")))
    if _sha(data) != sha256:
        raise IndexStoreError(
            f"{root}/{rel}: sha256 differs from the manifest (damaged or replaced); refusing to "
            "load it. Rebuild the index"
        )
    return data


def _write_parquet(uri: str, table: pa.Table) -> tuple[int, str]:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="snappy")
    data = buf.getvalue()
    rio.write_bytes(uri, data)
    return len(data), _sha(data)


def _crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        log.error("%s=%s: dying on purpose", CRASH_ENV, name)
        os._exit(17)


# ---- the sources: which Parquet parts feed which shard ----------------------------------------


@dataclass(frozen=True)
class PartRef:
    """Rows `[start, start + rows)` of one committed part of one embedding run (the whole part
    unless a shard plan split it); its ids are shifted by `offset` in the index."""

    source: int  # position in the manifest's `sources`
    uri: str  # the embedding run
    part: int
    rows: int  # embedded rows taken from the part
    offset: int
    start: int = 0  # first of them, counted in the part's embedded rows

    @property
    def commit_rel(self) -> str:
        return f"{store.COMMITS_DIR}/{store.part_name(self.part)}.json"


def _source_digest(commits: dict[int, dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for p in sorted(commits):
        h.update(f"{p}:{commits[p]['shard_sha256']}\n".encode())
    return h.hexdigest()


def _describe_source(uri: str, offset: int, position: int) -> tuple[dict[str, Any], list[PartRef]]:
    commits = store.committed_parts(uri)
    meta = store.run_identity(uri, commits)
    refs = [
        PartRef(position, uri, p, int(c["embedded"]), offset) for p, c in sorted(commits.items())
    ]
    max_id = max(int(c["last_id"]) for c in commits.values() if c.get("last_id") is not None)
    entry = {
        "uri": uri,
        "id_offset": offset,
        "fingerprint": meta["fingerprint"],
        "model": meta["model"],
        "dim": int(meta["dim"]),
        "parts": len(commits),
        "embedded": meta["embedded"],
        "max_id": max_id + offset,
        "parts_sha256": _source_digest(commits),
        "local_config": _source_local_config(uri, commits),
    }
    return entry, [r for r in refs if r.rows > 0]


def _check_source_unchanged(entry: dict[str, Any]) -> list[PartRef]:
    commits = store.committed_parts(entry["uri"])
    if not commits or _source_digest(commits) != entry["parts_sha256"]:
        raise IndexStoreError(
            f"the embedding run {entry['uri']} changed (or vanished) since the index was built "
            "from it; compaction re-reads the runs it was built from. Rebuild the index instead"
        )
    return [
        PartRef(-1, entry["uri"], p, int(c["embedded"]), int(entry["id_offset"]))
        for p, c in sorted(commits.items())
        if int(c["embedded"]) > 0
    ]


def plan_groups(parts: list[PartRef], shards: int) -> list[list[PartRef]]:
    """Split the rows of `parts`, in order, into `shards` contiguous groups of equal size (to
    one row), cutting a part in two where a boundary falls inside it: `--shards 3` over a run
    of one part builds three shards. Never more shards than rows."""
    total = sum(p.rows for p in parts)
    shards = max(1, min(shards, total))
    bounds = [total * g // shards for g in range(shards + 1)]
    groups: list[list[PartRef]] = [[] for _ in range(shards)]
    done, g = 0, 0
    for p in parts:
        lo = 0
        while lo < p.rows:
            while done + lo >= bounds[g + 1]:
                g += 1
            hi = min(p.rows, bounds[g + 1] - done)
            groups[g].append(replace(p, start=p.start + lo, rows=hi - lo))
            lo = hi
        done += p.rows
    return [grp for grp in groups if grp]


# ---- the work of one Ray task ----------------------------------------------------------------


def _read_ref(ref: PartRef) -> tuple[np.ndarray, list[str], np.ndarray]:
    commit = json.loads(rio.read_text(rio.join(ref.uri, *ref.commit_rel.split("/"))))
    ids, uris, vectors = store.read_part(ref.uri, commit)
    if ref.start or ref.rows != len(ids):
        cut = slice(ref.start, ref.start + ref.rows)
        ids, uris, vectors = ids[cut], uris[cut], vectors[cut]
    return ids + ref.offset, uris, vectors


def sample_rows(picks: list[tuple[PartRef, np.ndarray]]) -> np.ndarray:
    """The rows `idx` of each part: the training sample, read where the parts are."""
    out = [_read_ref(ref)[2][idx] for ref, idx in picks]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def build_shard(
    trained: bytes,
    root: str,
    rel_base: str,
    parts: list[PartRef],
    exclude: np.ndarray,
    background: np.ndarray | None,
    fingerprint: str,
    threads: int = 1,
) -> dict[str, Any]:
    """Stream `parts` into a copy of the trained empty index; write `<rel_base>.faiss` and
    `<rel_base>.refs.parquet`. Returns the shard's manifest entry (sizes, hashes, id range) and
    the best raw score of each background vector against it (the background statistics)."""
    faiss.omp_set_num_threads(max(1, threads))
    t0 = time.perf_counter()
    index = _deserialize(trained)
    all_ids, all_uris = [], []
    for ref in parts:
        ids, uris, vectors = _read_ref(ref)
        if len(exclude):
            keep = ~np.isin(ids, exclude)
            ids, vectors = ids[keep], vectors[keep]
            uris = [u for u, k in zip(uris, keep.tolist(), strict=True) if k]
        if len(ids):
            index.add_with_ids(np.ascontiguousarray(vectors), ids)
        all_ids.append(ids)
        all_uris += uris
    ids = np.concatenate(all_ids) if all_ids else np.zeros(0, np.int64)
    order = np.argsort(ids, kind="stable")
    refs = pa.table(
        {"id": pa.array(ids[order]), "uri": pa.array([all_uris[i] for i in order], pa.string())}
    ).replace_schema_metadata({store.META_FINGERPRINT: fingerprint})
    data = _serialize(index)
    rio.write_bytes(rio.join(root, *f"{rel_base}.faiss".split("/")), data)
    refs_bytes, refs_sha = _write_parquet(rio.join(root, *f"{rel_base}.refs.parquet".split("/")),
                                          refs)  # fmt: skip
    bg_top1: list[float] = []
    if background is not None and len(background) and index.ntotal:
        bg_top1 = index.search(background, 1)[0][:, 0].tolist()
    return {
        "name": rel_base.rsplit("/", 1)[-1],
        "file": f"{rel_base}.faiss",
        "refs": f"{rel_base}.refs.parquet",
        "ntotal": int(index.ntotal),
        "bytes": len(data),
        "sha256": _sha(data),
        "refs_bytes": refs_bytes,
        "refs_sha256": refs_sha,
        "min_id": int(ids.min()) if len(ids) else None,
        "max_id": int(ids.max()) if len(ids) else None,
        "parts": [
            {"source": p.source, "part": p.part, "start": p.start, "rows": p.rows} for p in parts
        ],  # fmt: skip
        "seconds": round(time.perf_counter() - t0, 3),
        "_bg_top1": bg_top1,
    }


# ---- drivers -------------------------------------------------------------------------------


def _ray_map(fn, calls: list[dict[str, Any]], cpus: float, gpus: float = 0.0) -> list[Any]:
    """Run `fn(**kwargs)` for each call as a Ray task (in parallel) and return the results."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level=logging.WARNING)  # honours RAY_ADDRESS
    # Workers read and write S3 with the driver's AWS settings when it has any.
    aws = {k: os.environ[k] for k in rio.AWS_ENV if os.environ.get(k)}
    options: dict[str, Any] = {"num_cpus": cpus, "max_retries": 2}
    if gpus:
        options["num_gpus"] = gpus
    if aws:
        options["runtime_env"] = {"env_vars": aws}
    remote = ray.remote(fn).options(**options)
    return ray.get([remote.remote(**c) for c in calls])


def _use_gpu(cfg: IndexConfig) -> bool:
    has = faiss.get_num_gpus() > 0
    if cfg.gpu and not has:
        raise IndexStoreError("--gpu asked for, but this FAISS sees no GPU (install faiss-gpu)")
    return bool(has if cfg.gpu is None else cfg.gpu)


def _train(
    factory: str, dim: int, sample: np.ndarray, gpu: bool, threads: int
) -> tuple[faiss.Index, float]:
    faiss.omp_set_num_threads(max(1, threads))
    index = _empty_index(factory, dim)
    t0 = time.perf_counter()
    if not index.is_trained:
        ivf = faiss.extract_index_ivf(index) if _nlist_of(factory) else None
        if gpu and ivf is not None:
            # k-means of the coarse quantizer is the costly part of training; run it on GPU.
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(dim))
        try:
            index.train(np.ascontiguousarray(sample))
        except RuntimeError as exc:
            raise IndexStoreError(
                f"training {factory} on {len(sample)} vectors failed: {exc}"
            ) from exc
        if ivf is not None:
            ivf.clustering_index = None
    return index, time.perf_counter() - t0


def _sample_plan(
    parts: list[PartRef], size: int, seed: int
) -> list[list[tuple[PartRef, np.ndarray]]]:
    """Uniform random rows over all parts, grouped into at most 16 reading tasks."""
    counts = np.array([p.rows for p in parts], np.int64)
    total = int(counts.sum())
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(total, size=min(size, total), replace=False))
    bounds = np.concatenate([[0], np.cumsum(counts)])
    which = np.searchsorted(bounds, rows, side="right") - 1
    picks = [(parts[i], rows[which == i] - bounds[i]) for i in np.unique(which)]
    n_tasks = min(16, len(picks))
    return [picks[i::n_tasks] for i in range(n_tasks)]


def _load_background(cfg: IndexConfig, fingerprint: str) -> np.ndarray | None:
    if not cfg.background:
        return None
    bg = store.read_embeddings(cfg.background)
    check_fingerprint(fingerprint, bg.meta["fingerprint"], f"background run {cfg.background}")
    x = bg.embeddings
    if len(x) > cfg.max_background:
        pick = np.random.default_rng(cfg.seed).choice(len(x), cfg.max_background, replace=False)
        x = x[np.sort(pick)]
    return np.ascontiguousarray(x, np.float32)


def _background_stats(results: list[dict[str, Any]]) -> dict[str, float] | None:
    tops = [np.asarray(r.pop("_bg_top1")) for r in results]
    tops = [t for t in tops if len(t)]
    if not tops:
        return None
    best = np.max(np.stack(tops), axis=0)
    return {
        "queries": int(len(best)),
        "top1_mean": round(float(best.mean()), 4),
        "top1_p50": round(float(np.quantile(best, 0.5)), 4),
        "top1_p99": round(float(np.quantile(best, 0.99)), 4),
        "top1_max": round(float(best.max()), 4),
    }


def _verify(root: str, entries: list[dict[str, Any]]) -> None:
    """Read every new file back and compare its hash: what we publish is what we wrote."""

    def check(e: dict[str, Any]) -> None:
        _read_checked(root, e["file"], e["sha256"])
        _read_checked(root, e["refs"], e["refs_sha256"])

    with ThreadPoolExecutor(max_workers=min(8, max(1, len(entries)))) as pool:
        list(pool.map(check, entries))


def _pause_point(name: str) -> None:
    spec = os.environ.get(PAUSE_ENV, "")
    point, _, seconds = spec.partition(":")
    if point == name:
        time.sleep(float(seconds or 1.0))


def _publish(root: str, manifest: dict[str, Any], expected: int | None) -> None:
    """Write the manifest, then swap `CURRENT` from `expected` (the version this writer started
    from; None: nothing was published) to the new version, atomically. When another writer
    published first, raise ConcurrentUpdateError and leave the new version unpublished."""
    version = manifest["version"]
    rio.write_text(rio.join(root, f"v{version}", MANIFEST), json.dumps(manifest, indent=2))
    _crash_point("before-current")
    _pause_point("before-current")
    uri = rio.join(root, CURRENT)
    seen = rio.read_versioned(uri)
    now = _parse_current(uri, seen.data)
    if now != expected or not rio.replace_if(uri, f"v{version}\n".encode(), seen.token):
        now = current_version(root)
        raise ConcurrentUpdateError(
            f"{root}: v{now} was published while v{version} was being built on "
            f"{f'v{expected}' if expected else 'an empty root'}; v{version} is left unpublished"
        )
    record = {"published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "replaced": expected}  # fmt: skip
    rio.write_text(rio.join(root, f"v{version}", PUBLISHED), json.dumps(record))
    log.info("published %s v%d (was %s)", root, version, f"v{expected}" if expected else "none")


def _claim_version(root: str) -> int:
    """Claim the next free version number for this writer alone, before anything is written in
    it: two builds or updates that start together get different versions, never one folder."""
    n = max(versions(root), default=0) + 1
    owner = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})  # fmt: skip
    for _ in range(1000):
        if rio.create_exclusive(rio.join(root, f"v{n}", CLAIM), owner.encode()):
            return n
        n += 1
    raise IndexStoreError(f"{root}: could not claim a version number (tried up to v{n})")


def _retrying(what: str, root: str, attempt_fn: Any) -> Any:
    """Run one update attempt; when it loses the publication race, apply it again on top of the
    version that won (so concurrent updates all take effect), a bounded number of times."""
    for attempt in range(1, UPDATE_ATTEMPTS + 1):
        try:
            return attempt_fn()
        except ConcurrentUpdateError as exc:
            if attempt == UPDATE_ATTEMPTS:
                raise ConcurrentUpdateError(
                    f"{exc}. Gave up on {what} after {attempt} attempts: other writers keep "
                    "publishing; re-run it when they are done"
                ) from None
            log.warning("%s; applying %s again on the new version", exc, what)
            time.sleep(0.05 * attempt)
    raise AssertionError("unreachable")


def _write_background(root: str, version: int, bg: np.ndarray, cfg: IndexConfig) -> dict[str, Any]:
    buf = io.BytesIO()
    np.save(buf, bg.astype(np.float32), allow_pickle=False)
    data = buf.getvalue()
    rel = f"v{version}/{BACKGROUND}"
    rio.write_bytes(rio.join(root, *rel.split("/")), data)
    return {"file": rel, "sha256": _sha(data), "count": int(len(bg)), "source": cfg.background,
            "beta": cfg.beta, "n": cfg.background_n}  # fmt: skip


def _build_shards(
    root: str,
    version: int,
    trained: bytes,
    groups: list[list[PartRef]],
    prefix: str,
    first: int,
    exclude: np.ndarray,
    background: np.ndarray | None,
    fingerprint: str,
    cpus: float,
) -> list[dict[str, Any]]:
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
    trained_ref = ray.put(trained)  # one copy in the object store, not one per task
    exclude_ref = ray.put(exclude)
    calls = [
        {"trained": trained_ref, "root": root, "rel_base": f"v{version}/{prefix}-{first + i:03d}",
         "parts": group, "exclude": exclude_ref, "background": background,
         "fingerprint": fingerprint, "threads": max(1, int(cpus))}
        for i, group in enumerate(groups)
    ]  # fmt: skip
    results = _ray_map(build_shard, calls, cpus)
    _crash_point("after-shards")
    return results


def build_index(cfg: IndexConfig) -> dict[str, Any]:
    """Build a new version of the index at `cfg.out` from the run at `cfg.embeddings` and
    publish it. Returns its manifest. The published version stays untouched until the new one
    is complete and verified."""
    cfg.validate()
    t0 = time.perf_counter()
    root = rio.canonical(cfg.out)
    source, parts = _describe_source(rio.canonical(cfg.embeddings), 0, 0)
    n, dim, fingerprint = int(source["embedded"]), int(source["dim"]), source["fingerprint"]
    if n == 0:
        raise IndexStoreError(f"{cfg.embeddings}: no embedded rows to index")
    live = current_version(root)
    if live is not None:
        live_manifest = read_manifest(root, live)
        if live_manifest["fingerprint"] != fingerprint and not cfg.allow_model_change:
            raise IndexStoreError(
                f"{root} serves v{live} of model {live_manifest['model']!r} (fingerprint "
                f"{live_manifest['fingerprint'][:12]}); this build is of {source['model']!r} "
                f"({fingerprint[:12]}). A running Serve of the old model would refuse it. Build "
                "into a new --out, or pass --allow-model-change to replace it anyway"
            )
    if cfg.factory:
        choice = FactoryChoice(cfg.factory, None, float("nan"), "given with --factory")
        nlist = _nlist_of(cfg.factory)
        if nlist:
            choice = FactoryChoice(cfg.factory, default_nprobe(nlist), float("nan"),
                                   "given with --factory")  # fmt: skip
    else:
        choice = choose_factory(n, dim, cfg.memory_budget)
    nprobe = cfg.nprobe or choice.nprobe
    log.info("factory %s: %s", choice.factory, choice.reason)
    gpu = _use_gpu(cfg)
    nlist = _nlist_of(choice.factory)
    sample_size = cfg.train_sample or max(32 * (nlist or 0), 20_000)
    t_sample = time.perf_counter()
    empty = _empty_index(choice.factory, dim)
    if empty.is_trained:
        sample = np.zeros((0, dim), np.float32)
    else:
        plan = _sample_plan(parts, sample_size, cfg.seed)
        chunks = _ray_map(sample_rows, [{"picks": p} for p in plan], min(cfg.task_cpus, 0.5))
        sample = np.concatenate(chunks).astype(np.float32)
    sample_seconds = time.perf_counter() - t_sample
    trained_index, train_seconds = _train(choice.factory, dim, sample, gpu,
                                          max(1, int(cfg.task_cpus * 2)))  # fmt: skip
    trained = _serialize(trained_index)
    del trained_index
    version = _claim_version(root)
    rio.write_bytes(rio.join(root, f"v{version}", TRAINED), trained)
    background = _load_background(cfg, fingerprint)
    want = cfg.shards or max(1, math.ceil(n / SHARD_TARGET))
    groups = plan_groups(parts, want)
    if len(groups) < want:
        log.warning("%d shards asked for, the run has %d vectors: building %d", want, n,
                    len(groups))  # fmt: skip
    t_add = time.perf_counter()
    none = np.zeros(0, np.int64)
    results = _build_shards(root, version, trained, groups, "shard", 0, none, background,
                            fingerprint, cfg.task_cpus)  # fmt: skip
    add_seconds = time.perf_counter() - t_add
    stats = _background_stats(results)
    _verify(root, results)
    total = sum(r["ntotal"] for r in results)
    if total != n:
        raise IndexStoreError(f"shards hold {total} vectors, the run has {n}; not publishing")
    local = None
    t_local = time.perf_counter()
    if cfg.local and source.get("local_config") is not None:
        entries = _copy_local_parts(root, version, 0, source["uri"], 0, none)
        fused, fit = _fit_fused(source, entries, root, source["local_config"],
                                cfg.fused_fit_sample, cfg.seed)  # fmt: skip
        local = _local_section(root, version, entries, source["local_config"], fused, fit, none,
                               cfg.gpu)  # fmt: skip
        log.info("local features: %d references, fused score %s (%s)", len(entries), fused,
                 fit.get("how"))  # fmt: skip
    local_seconds = time.perf_counter() - t_local
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": version,
        "parent": None,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "factory": choice.factory,
        "factory_reason": choice.reason,
        "dim": dim,
        "metric": "inner_product",
        "fingerprint": fingerprint,
        "model": source["model"],
        "exact_scores": choice.factory == "Flat" or "RFlat" in choice.factory
        or "Refine(Flat)" in choice.factory,
        "search": {"nprobe": nprobe, "k_factor": cfg.k_factor},
        "trained": {"file": f"v{version}/{TRAINED}", "sha256": _sha(trained),
                    "train_rows": int(len(sample)), "seed": cfg.seed},
        "sources": [source],
        "next_id": int(source["max_id"]) + 1,
        "shards": results,
        "ntotal": total,
        "tombstones": None,
        "background": (_write_background(root, version, background, cfg)
                       if background is not None else None),
        "background_stats": stats,
        "local": local,
        "build": {"seconds": round(time.perf_counter() - t0, 3),
                  "local_seconds": round(local_seconds, 3),
                  "sample_seconds": round(sample_seconds, 3),
                  "train_seconds": round(train_seconds, 3),
                  "add_seconds": round(add_seconds, 3), "gpu": gpu,
                  "task_cpus": cfg.task_cpus},
    }  # fmt: skip
    _crash_point("before-manifest")
    try:
        _publish(root, manifest, expected=live)
    except ConcurrentUpdateError as exc:
        raise ConcurrentUpdateError(
            f"{exc}. A full build is not re-applied on its own (it would silently undo what was "
            "just published); re-run it if it should still replace that version"
        ) from None
    return manifest


# ---- updates -------------------------------------------------------------------------------


def _child(root: str) -> dict[str, Any]:
    """A copy of the published manifest to turn into the next version (`parent` set; the
    version number is claimed only once there is something to write)."""
    parent = read_manifest(root)
    child = json.loads(json.dumps(parent))
    child.update(parent=parent["version"],
                 created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))  # fmt: skip
    return child


def _claim_for(root: str, child: dict[str, Any]) -> int:
    version = _claim_version(root)
    child["version"] = version
    return version


def _read_tombstones(root: str, manifest: dict[str, Any]) -> np.ndarray:
    entry = manifest.get("tombstones")
    if not entry:
        return np.zeros(0, np.int64)
    data = _read_checked(root, entry["file"], entry["sha256"])
    return np.sort(pq.read_table(io.BytesIO(data)).column("id").to_numpy().astype(np.int64))


def add_references(root: str, embeddings: str, cpus: float = 1.0) -> dict[str, Any]:
    """Add the references of another embedding run as a delta shard, without touching the base.

    Their ids are shifted past every id in the index (`next_id`), so two runs never collide; the
    shift is recorded in the manifest's `sources`. The same trained codec is used, so nothing is
    retrained; `compact` later folds the delta into the base shards. Concurrent updates are
    applied one on top of the other (see the module docstring)."""
    root, embeddings = rio.canonical(root), rio.canonical(embeddings)
    return _retrying(f"--add {embeddings}", root,
                     lambda: _add_once(root, embeddings, cpus))  # fmt: skip


def _add_once(root: str, embeddings: str, cpus: float) -> dict[str, Any]:
    child = _child(root)
    source, parts = _describe_source(embeddings, int(child["next_id"]), len(child["sources"]))
    check_fingerprint(child["fingerprint"], source["fingerprint"], f"index {root}")
    if any(rio.canonical(s["uri"]) == source["uri"] for s in child["sources"]):
        raise IndexStoreError(f"{embeddings} is already in the index {root}; refusing to add twice")
    if not parts:
        raise IndexStoreError(f"{embeddings}: no embedded rows to add")
    trained = _read_checked(root, child["trained"]["file"], child["trained"]["sha256"])
    parent_local = child.get("local")
    if parent_local:
        theirs = source.get("local_config")
        if theirs is None:
            raise IndexStoreError(
                f"the index {root} verifies with local features, {embeddings} has none: its "
                "references could never verify. Embed it with `rdcd embed --local-features`"
            )
        if not _same_extraction(theirs, parent_local["config"]):
            raise IndexStoreError(
                f"{embeddings}: its local features were extracted with other settings "
                f"({store.extraction_settings(theirs)}) than the index's "
                f"({store.extraction_settings(parent_local['config'])}); re-embed it"
            )
    version = _claim_for(root, child)
    first = sum(1 for s in child["shards"] if s["name"].startswith("delta-"))
    results = _build_shards(root, version, trained, [parts], "delta", first, np.zeros(0, np.int64),
                            None, child["fingerprint"], cpus)  # fmt: skip
    for r in results:
        r.pop("_bg_top1", None)
    _verify(root, results)
    if parent_local:
        position, offset = len(child["sources"]), int(child["next_id"])
        new = _copy_local_parts(root, version, position, embeddings, offset, np.zeros(0, np.int64))
        child["local"] = _local_section(
            root, version, parent_local["parts"] + new, parent_local["config"],
            parent_local["fused"], parent_local["fused_fit"], _read_tombstones(root, child), None,
        )  # fmt: skip
    child["shards"] += results
    child["sources"].append(source)
    child["next_id"] = int(source["max_id"]) + 1
    child["ntotal"] = int(child["ntotal"]) + sum(r["ntotal"] for r in results)
    _publish(root, child, expected=child["parent"])
    return child


def _held_ids(root: str, manifest: dict[str, Any]) -> tuple[np.ndarray, list[str]]:
    ids, uris = [], []
    for s in manifest["shards"]:
        t = pq.read_table(io.BytesIO(_read_checked(root, s["refs"], s["refs_sha256"])))
        ids.append(t.column("id").to_numpy().astype(np.int64))
        uris += t.column("uri").to_pylist()
    return (np.concatenate(ids) if ids else np.zeros(0, np.int64)), uris


def remove_references(root: str, targets: list[str]) -> tuple[dict[str, Any], dict[str, int]]:
    """Tombstone references, given as ids or URIs; searches skip them from the new version on.

    Returns the new manifest and counts: `removed` (newly tombstoned), `already` (removed
    before), `unknown` (not in the index: reported, nothing else happens)."""
    root = rio.canonical(root)
    return _retrying("--remove", root, lambda: _remove_once(root, targets))


def _remove_once(root: str, targets: list[str]) -> tuple[dict[str, Any], dict[str, int]]:
    child = _child(root)
    held_ids, held_uris = _held_ids(root, child)
    by_uri = dict(zip(held_uris, held_ids.tolist(), strict=True))
    wanted: set[int] = set()
    unknown = 0
    held = set(held_ids.tolist())
    for t in targets:
        t = t.strip()
        if not t:
            continue
        i = int(t) if re.fullmatch(r"-?\d+", t) else by_uri.get(t)
        if i is None or i not in held:
            unknown += 1
        else:
            wanted.add(i)
    old = _read_tombstones(root, child)
    already = len(wanted & set(old.tolist()))
    dead = np.union1d(old, np.fromiter(wanted, np.int64, len(wanted)))
    counts = {"removed": len(wanted) - already, "already": already, "unknown": unknown}
    if counts["removed"] == 0:
        return read_manifest(root, child["parent"]), counts
    version = _claim_for(root, child)
    rel = f"v{version}/{TOMBSTONES}"
    size, sha = _write_parquet(rio.join(root, *rel.split("/")), pa.table({"id": pa.array(dead)}))
    child["tombstones"] = {"file": rel, "sha256": sha, "count": int(len(dead))}
    _publish(root, child, expected=child["parent"])
    return child, counts


def compact(root: str, shards: int | None = None, cpus: float = 1.0) -> dict[str, Any]:
    """Fold delta shards and tombstones into freshly written base shards (same trained codec,
    no retraining), re-reading the embedding runs the index was built from."""
    root = rio.canonical(root)
    return _retrying("--compact", root, lambda: _compact_once(root, shards, cpus))


def _compact_once(root: str, shards: int | None, cpus: float) -> dict[str, Any]:
    child = _child(root)
    parts: list[PartRef] = []
    for position, entry in enumerate(child["sources"]):
        parts += [
            PartRef(position, r.uri, r.part, r.rows, r.offset)
            for r in _check_source_unchanged(entry)
        ]
    dead = _read_tombstones(root, child)
    trained = _read_checked(root, child["trained"]["file"], child["trained"]["sha256"])
    base = [s for s in child["shards"] if not s["name"].startswith("delta-")]
    groups = plan_groups(parts, shards or max(1, len(base)))
    bg = None
    if child.get("background"):
        b = child["background"]
        bg = np.load(io.BytesIO(_read_checked(root, b["file"], b["sha256"])), allow_pickle=False)
    version = _claim_for(root, child)
    results = _build_shards(root, version, trained, groups, "shard", 0, dead, bg,
                            child["fingerprint"], cpus)  # fmt: skip
    stats = _background_stats(results)
    _verify(root, results)
    total = sum(r["ntotal"] for r in results)
    expected = int(child["ntotal"]) - int(len(dead))
    if total != expected:
        raise IndexStoreError(f"compaction holds {total} vectors, expected {expected}")
    if child.get("local"):
        old = child["local"]
        entries = _rewrite_local_parts(root, version, old["parts"], dead)
        child["local"] = _local_section(root, version, entries, old["config"], old["fused"],
                                        old["fused_fit"], dead, None)  # fmt: skip
    child.update(shards=results, ntotal=total, tombstones=None,
                 background_stats=stats or child.get("background_stats"))  # fmt: skip
    _publish(root, child, expected=child["parent"])
    return child


# ---- readers -------------------------------------------------------------------------------


def load_shard(root: str, manifest: dict[str, Any], entry: dict[str, Any],
               tombstones: np.ndarray | None = None) -> Shard:  # fmt: skip
    """One shard of `manifest`, hash-checked, with its search parameters and tombstones."""
    index = _deserialize(_read_checked(root, entry["file"], entry["sha256"]))
    if index.d != int(manifest["dim"]):
        raise IndexStoreError(f"{root}/{entry['file']} is {index.d}-d, the manifest says "
                              f"{manifest['dim']}")  # fmt: skip
    tune(index, manifest["search"].get("nprobe"), manifest["search"].get("k_factor"))
    refs = pq.read_table(io.BytesIO(_read_checked(root, entry["refs"], entry["refs_sha256"])))
    ids = refs.column("id").to_numpy().astype(np.int64)
    dead = tombstones if tombstones is not None else _read_tombstones(root, manifest)
    mine = dead[np.isin(dead, ids)] if len(dead) else dead
    return Shard(entry["name"], index, ids, refs.column("uri").to_pylist(), np.sort(mine))


def load_normalizer(root: str, manifest: dict[str, Any]) -> ScoreNormalizer | None:
    b = manifest.get("background")
    if not b:
        return None
    bg = np.load(io.BytesIO(_read_checked(root, b["file"], b["sha256"])), allow_pickle=False)
    return ScoreNormalizer(bg, beta=float(b.get("beta", 1.0)), n=int(b.get("n", 3)))


def load_index(
    root: str, version: int | None = None, shards: list[str] | None = None, threads: int = 4
) -> ShardedIndex:
    """The published version of the index at `root` (or `version`), every shard or only those
    named in `shards` (a searcher replica holds a subset), ready to search."""
    root = rio.canonical(root)
    manifest = read_manifest(root, version)
    entries = [s for s in manifest["shards"] if shards is None or s["name"] in shards]
    if shards is not None and len(entries) != len(set(shards)):
        known = [s["name"] for s in manifest["shards"]]
        raise IndexStoreError(f"{root} v{manifest['version']} has shards {known}, not {shards}")
    dead = _read_tombstones(root, manifest)
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(entries)))) as pool:
        loaded = list(pool.map(lambda e: load_shard(root, manifest, e, dead), entries))
    info = {k: manifest[k] for k in ("factory", "ntotal", "model", "exact_scores", "search")}
    info["tombstones"] = int(len(dead))
    return ShardedIndex(loaded, manifest["fingerprint"], int(manifest["version"]),
                        int(manifest["dim"]), load_normalizer(root, manifest), info)  # fmt: skip


def summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a person wants to know about a version (the CLI prints it, Serve returns it)."""
    return {
        "version": manifest["version"],
        "factory": manifest["factory"],
        "dim": manifest["dim"],
        "model": manifest["model"],
        "fingerprint": manifest["fingerprint"],
        "ntotal": manifest["ntotal"],
        "shards": [s["name"] for s in manifest["shards"]],
        "tombstones": (manifest.get("tombstones") or {}).get("count", 0),
        "exact_scores": manifest["exact_scores"],
        "search": manifest["search"],
        "local": _local_summary(manifest.get("local")),
    }


def _local_summary(section: dict[str, Any] | None) -> dict[str, Any] | None:
    """What `summary` says of a version's local data (None: it cannot verify)."""
    if not section:
        return None
    recall = section.get("recall") or {}
    return {"references": section["sizes"]["references"], "parts": len(section["parts"]),
            "recall": bool(recall), "recall_factory": recall.get("factory"),
            "fused": section["fused"], "fused_fit": section["fused_fit"].get("how"),
            **section["sizes"]}  # fmt: skip


# ---- local features: carried into the version, recall index, fused score ------------------------


class LocalUnavailableError(IndexStoreError):
    """A verification request against a version that holds no local features."""


def _local_part_rel(version: int, source: int, part: int) -> str:
    return f"v{version}/{LOCAL_DIR}/s{source}-{store.part_name(part)}.parquet"


def _source_local_config(uri: str, commits: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """The LocalConfig of a run's local features; None when the run has none."""
    with_local = [c for c in commits.values() if store.has_local(c)]
    if not with_local:
        return None
    if len(with_local) != len(commits):
        raise IndexStoreError(f"{uri}: only {len(with_local)} of {len(commits)} parts have local "
                              "features; re-embed it with --local-features")  # fmt: skip
    return with_local[0]["local_config"]


def _same_extraction(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return store.extraction_settings(a) == store.extraction_settings(b)


def _copy_local_parts(
    root: str, version: int, source: int, run: str, offset: int, exclude: np.ndarray
) -> list[dict[str, Any]]:
    """Copy the committed local files of `run` into `v<version>/local/` (checked against their
    commits on the way; rewritten without the ids in `exclude` when any of them is there).

    Copied, not referenced: a version must answer without its embedding runs (a run may be
    deleted or re-embedded once indexed, as the FAISS shards do not need it either). Versions
    derived from this one name these files by path and sha256, so each is copied once."""
    commits = store.committed_parts(run)

    def copy(item: tuple[int, dict[str, Any]]) -> dict[str, Any] | None:
        part, commit = item
        if int(commit["embedded"]) == 0:
            return None
        data = store.read_local_bytes(run, commit)
        rows = int(commit["embedded"])
        if len(exclude):
            table = pq.read_table(io.BytesIO(data))
            keep = ~np.isin(table.column("id").to_numpy() + offset, exclude)
            if not keep.all():
                from rdcd.local import parquet_bytes

                table = table.filter(pa.array(keep))
                data, rows = parquet_bytes(table), int(table.num_rows)
        rel = _local_part_rel(version, source, part)
        rio.write_bytes(rio.join(root, *rel.split("/")), data)
        return {"file": rel, "sha256": _sha(data), "bytes": len(data), "rows": rows,
                "source": source, "offset": offset, "part": part,
                "min_id": int(commit["first_id"]) + offset,
                "max_id": int(commit["last_id"]) + offset}  # fmt: skip

    with ThreadPoolExecutor(max_workers=8) as pool:
        entries = [e for e in pool.map(copy, sorted(commits.items())) if e is not None]
    return entries


def _rewrite_local_parts(
    root: str, version: int, entries: list[dict[str, Any]], exclude: np.ndarray
) -> list[dict[str, Any]]:
    """Entries of an existing version's local files, without the ids in `exclude`: files that
    hold none are kept as they are (named, not copied), the others are rewritten into
    `v<version>/local/` (compaction: a tombstoned reference must never verify afterwards)."""
    from rdcd.local import parquet_bytes

    out = []
    for e in entries:
        if not len(exclude) or not np.any((exclude >= e["min_id"]) & (exclude <= e["max_id"])):
            out.append(e)
            continue
        table = pq.read_table(io.BytesIO(_read_checked(root, e["file"], e["sha256"])))
        keep = ~np.isin(table.column("id").to_numpy() + int(e["offset"]), exclude)
        data = parquet_bytes(table.filter(pa.array(keep)))
        rel = _local_part_rel(version, int(e["source"]), int(e["part"]))
        rio.write_bytes(rio.join(root, *rel.split("/")), data)
        out.append({**e, "file": rel, "sha256": _sha(data), "bytes": len(data),
                    "rows": int(keep.sum())})  # fmt: skip
    return out


def _iter_local(root: str, entries: list[dict[str, Any]], exclude: np.ndarray | None = None):
    """(index id, LocalFeatures) of every row of `entries`, hash-checked, without `exclude`."""
    from rdcd.local import from_table

    dead = set(exclude.tolist()) if exclude is not None and len(exclude) else set()
    for e in entries:
        table = pq.read_table(io.BytesIO(_read_checked(root, e["file"], e["sha256"])))
        for rid, feats in from_table(table).items():
            gid = int(rid) + int(e["offset"])
            if gid not in dead:
                yield gid, feats


def _build_recall(
    root: str, version: int, entries: list[dict[str, Any]], exclude: np.ndarray,
    gpu: bool | None,
) -> dict[str, Any] | None:  # fmt: skip
    """The local-recall index over every live reference's descriptors, written to `v<version>/`
    (`local.faiss` + `local.json`, rdcd.local.LocalIndex). None when no reference has any."""
    from rdcd.local import LocalIndex

    items = list(_iter_local(root, entries, exclude))
    if not any(len(f) for _, f in items):
        return None
    t0 = time.perf_counter()
    recall = LocalIndex.build(items, factory="auto", per_reference=LOCAL_RECALL_PER_REFERENCE,
                              use_gpu=gpu)  # fmt: skip
    files = recall.save(rio.join(root, f"v{version}"))
    data = rio.read_bytes(rio.join(root, f"v{version}", "local.faiss"))
    return {"dir": f"v{version}", "files": files, "bytes": len(data),
            "factory": recall.info.get("factory"), "descriptors": recall.ntotal,
            "references": recall.references, "per_reference": LOCAL_RECALL_PER_REFERENCE,
            "bytes_per_reference": round(len(data) / max(1, recall.references), 1),
            "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip


def _local_sizes(entries: list[dict[str, Any]], recall: dict[str, Any] | None) -> dict[str, Any]:
    rows = sum(int(e["rows"]) for e in entries)
    stored = sum(int(e["bytes"]) for e in entries)
    return {
        "references": rows,
        "feature_bytes_per_reference": round(stored / max(1, rows), 1),
        "recall_bytes_per_reference": recall["bytes_per_reference"] if recall else 0.0,
    }


def _fit_fused(
    source: dict[str, Any], entries: list[dict[str, Any]], root: str, local_config: dict,
    sample: int, seed: int,
) -> tuple[dict[str, float], dict[str, Any]]:  # fmt: skip
    """Fit `FusedScore` on a labelled sample made here: `sample` references (seeded) are edited
    into synthetic copies (`rdcd.edits.random_copy`, hard mix: crops, overlays, rotations,
    flips), embedded with the run's model and verified against what a query meets: its global
    top `FUSED_FIT_CANDIDATES` references (label 0, but 1 for the original) and its original
    wherever that ranks (label 1). Only the hardest negative per copy was tried first: it has a
    higher cosine than many hard copies by construction, and the fit then gave the cosine no
    weight at all. Returns the fitted score and what it was fitted on; `FusedScore.DEFAULT`
    with the reason when that cannot be done."""
    import random

    from rdcd.decode import decode_image
    from rdcd.edits import random_copy
    from rdcd.local import FusedScore, LocalConfig, extract, verify

    default = FusedScore.DEFAULT.to_dict()
    run = store.read_run(source["uri"]) or {}
    spec = (run.get("config") or {}).get("model")
    if sample <= 0:
        return default, {"how": "default", "reason": "fit disabled (--fused-fit-sample 0)"}
    if int(source["embedded"]) < FUSED_FIT_MIN:
        return default, {"how": "default", "reason": f"fewer than {FUSED_FIT_MIN} references"}
    if not spec:
        return default, {"how": "default", "reason": "the run does not record its model"}
    t0 = time.perf_counter()
    try:
        from rdcd.embed import load_embedder

        model = load_embedder(spec, teacher=(run.get("config") or {}).get("teacher"),
                              device="cpu", threads=1, precision="auto")  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - the fit is optional: say why and use the default
        reason = f"cannot load the run's model {spec!r}: {str(exc).splitlines()[0][:200]}"
        log.warning("fused score: %s; using the default", reason)
        return default, {"how": "default", "reason": reason}
    if model.fingerprint != source["fingerprint"]:
        return default, {"how": "default", "reason": f"{spec!r} is no longer the run's model"}
    emb = store.read_embeddings(source["uri"])
    refs = dict(_iter_local(root, entries))
    have = [i for i, rid in enumerate(emb.ids.tolist()) if rid in refs]
    rng = random.Random(seed)
    picks = sorted(rng.sample(have, min(sample, len(have))))
    cfg = LocalConfig.from_dict(local_config)
    g, inl, y = [], [], []
    vectors = emb.embeddings
    for i in picks:
        rid = int(emb.ids[i])
        try:
            img = decode_image(rio.read_bytes(emb.uris[i]))
        except Exception as exc:  # noqa: BLE001 - an image gone since embedding: skip it
            log.debug("fused fit: skipping %s: %s", emb.uris[i], exc)
            continue
        copy, _ = random_copy(img, rng, hard=True)
        from rdcd.decode import resize_square

        q = model.embed(resize_square(copy.convert("RGB"), model.image_size)[None])[0]
        qf = stored_form(extract(copy, cfg))
        sims = vectors @ q
        # what a query meets: its global top candidates, labelled by whether they are its
        # original, plus the original wherever it ranks (a copy the global descriptor misses)
        top = [int(j) for j in np.argsort(-sims, kind="stable")[:FUSED_FIT_CANDIDATES]]
        for j in dict.fromkeys([i, *top]):
            other = refs.get(int(emb.ids[j]))
            g.append(float(sims[j]))
            inl.append(verify(qf, other, cfg).inliers if other is not None else 0)
            y.append(int(j == i))
        del rid
    y_arr = np.array(y)
    if len(y_arr) == 0 or y_arr.min() == y_arr.max():
        return default, {"how": "default", "reason": "no usable labelled pairs"}
    fused = FusedScore.fit(np.array(g), np.array(inl), y_arr)
    p = fused(np.array(g), np.array(inl))
    acc = float(np.mean((p >= fused.threshold) == (y_arr == 1)))
    info = {"how": "fitted", "pairs": int(len(y_arr)), "copies": int(y_arr.sum()),
            "model": spec, "seed": seed, "edits": "rdcd.edits.random_copy(hard=True)",
            "negatives": f"the copy's global top {FUSED_FIT_CANDIDATES} other references",
            "score_input": "raw cosine", "train_accuracy": round(acc, 4),
            "median_inliers_copies": float(np.median(np.array(inl)[y_arr == 1])),
            "median_inliers_negatives": float(np.median(np.array(inl)[y_arr == 0])),
            "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
    return fused.to_dict(), info


def _local_section(
    root: str, version: int, entries: list[dict[str, Any]], config: dict[str, Any],
    fused: dict[str, float], fit: dict[str, Any], exclude: np.ndarray, gpu: bool | None,
) -> dict[str, Any]:  # fmt: skip
    recall = _build_recall(root, version, entries, exclude, gpu)
    _verify_local(root, entries, recall)
    return {"config": config, "parts": entries, "recall": recall, "fused": fused,
            "fused_fit": fit, "sizes": _local_sizes(entries, recall)}  # fmt: skip


def _verify_local(root: str, entries: list[dict[str, Any]], recall: dict | None) -> None:
    """Read the local files back and compare their hashes before publishing."""

    def check(e: dict[str, Any]) -> None:
        _read_checked(root, e["file"], e["sha256"])

    with ThreadPoolExecutor(max_workers=min(8, max(1, len(entries)))) as pool:
        list(pool.map(check, entries))
    if recall:
        for name, sha in recall["files"].items():
            _read_checked(root, f"{recall['dir']}/{name}", sha)


class LocalData:
    """What verification needs of one index version's references: their stored local features
    by id (read from `v<N>/local/`, hash-checked, cached per part), the local-recall index, the
    fused score and the extraction settings queries must use. Serve's ingress, `rdcd match` and
    `rdcd evaluate --index` all verify through one of these, so they agree.

    Tombstoned references never verify: they are dropped from candidates and votes."""

    def __init__(
        self,
        root: str,
        manifest: dict[str, Any],
        tombstones: np.ndarray | None = None,
        cache_parts: int = 64,
    ) -> None:
        from rdcd.local import FusedScore, LocalConfig

        section = manifest.get("local")
        if not section:
            raise LocalUnavailableError(
                f"index {root} v{manifest['version']} holds no local features, so it cannot "
                "verify: build it from an embedding run made with `rdcd embed --local-features`"
            )
        self.root, self.manifest, self.section = root, manifest, section
        self.version = int(manifest["version"])
        self.config = LocalConfig.from_dict(section["config"])
        self.fused = FusedScore.from_dict(section["fused"])
        self.dead = (
            np.asarray(tombstones, np.int64)
            if tombstones is not None
            else _read_tombstones(root, manifest)
        )
        self._dead = set(self.dead.tolist())
        self._parts = sorted(section["parts"], key=lambda e: int(e["min_id"]))
        self._starts = np.array([int(e["min_id"]) for e in self._parts], np.int64)
        self._cache: dict[str, dict[int, Any]] = {}
        self._cache_parts = max(1, cache_parts)
        self._recall: Any = None
        self._uris: dict[int, str] | None = None
        self._lock = __import__("threading").Lock()

    @property
    def has_recall(self) -> bool:
        return bool(self.section.get("recall"))

    def _part_of(self, rid: int) -> dict[str, Any] | None:
        i = int(np.searchsorted(self._starts, rid, side="right")) - 1
        if i < 0:
            return None
        e = self._parts[i]
        return e if rid <= int(e["max_id"]) else None

    def _load_part(self, e: dict[str, Any]) -> dict[int, Any]:
        from rdcd.local import from_table

        with self._lock:
            got = self._cache.get(e["file"])
            if got is not None:
                self._cache[e["file"]] = self._cache.pop(e["file"])  # most recently used
                return got
        table = pq.read_table(io.BytesIO(_read_checked(self.root, e["file"], e["sha256"])))
        off = int(e["offset"])
        feats = {int(k) + off: v for k, v in from_table(table).items()}
        with self._lock:
            self._cache[e["file"]] = feats
            while len(self._cache) > self._cache_parts:
                self._cache.pop(next(iter(self._cache)))
        return feats

    def features_of(self, ids: Any) -> dict[int, Any]:
        """`{id: LocalFeatures}` of the live references among `ids` that have features."""
        out: dict[int, Any] = {}
        for rid in sorted({int(i) for i in ids if int(i) >= 0 and int(i) not in self._dead}):
            e = self._part_of(rid)
            if e is None:
                continue
            f = self._load_part(e).get(rid)
            if f is not None:
                out[rid] = f
        return out

    def recall_index(self) -> Any:
        """The local-recall index (loaded on first use; None when the version has none)."""
        if self._recall is None and self.has_recall:
            from rdcd.local import LocalIndex

            r = self.section["recall"]
            _read_checked(self.root, f"{r['dir']}/local.json", r["files"]["local.json"])
            self._recall = LocalIndex.load(rio.join(self.root, r["dir"]))
        return self._recall

    def vote(self, query: Any, top: int = 10) -> list[tuple[int, int]]:
        """Local-recall votes for `query`, live references only, best first."""
        recall = self.recall_index()
        if recall is None:
            return []
        # room for tombstoned references among the voted (bounded: a long tombstone list must
        # not turn every query into a vote over the whole collection; compaction clears it)
        extra = min(len(self._dead), 4 * top)
        voted = recall.vote(query, top=top + extra, flips=self.config.flips)
        return [(r, v) for r, v in voted if r not in self._dead][:top]

    def uri_of(self, ids: Any) -> dict[int, str]:
        """URIs of references (for candidates that only local recall proposed)."""
        if self._uris is None:
            held, uris = _held_ids(self.root, self.manifest)
            self._uris = dict(zip(held.tolist(), uris, strict=True))
        return {int(i): self._uris[int(i)] for i in ids if int(i) in self._uris}


class InMemoryLocal:
    """`LocalData`'s interface over features held in memory (`rdcd evaluate --verify` without an
    index: the references' features are extracted on the fly), with an optional in-memory
    local-recall index and the default fused score."""

    def __init__(self, features: dict[int, Any], config: Any, fused: Any = None,
                 recall: bool = True) -> None:  # fmt: skip
        from rdcd.local import FusedScore, LocalIndex

        self.config, self.fused = config, fused or FusedScore.DEFAULT
        self._features, self._dead = features, set()
        self._recall = None
        if recall and any(len(f) for f in features.values()):
            self._recall = LocalIndex.build(sorted(features.items()), factory="auto",
                                            per_reference=LOCAL_RECALL_PER_REFERENCE)  # fmt: skip

    @property
    def has_recall(self) -> bool:
        return self._recall is not None

    def features_of(self, ids: Any) -> dict[int, Any]:
        return {int(i): self._features[int(i)] for i in ids if int(i) in self._features}

    def vote(self, query: Any, top: int = 10) -> list[tuple[int, int]]:
        if self._recall is None:
            return []
        return self._recall.vote(query, top=top, flips=self.config.flips)

    def uri_of(self, ids: Any) -> dict[int, str]:
        return {}


def load_local(root: str, version: int | None = None) -> LocalData:
    """The local data of a published version (default: the one CURRENT names)."""
    root = rio.canonical(root)
    return LocalData(root, read_manifest(root, version))


def verify_row(
    local: Any,
    query: Any,
    ids: np.ndarray,
    raw_scores: np.ndarray,
    k: int,
    recall: bool = True,
) -> list[Any]:
    """The verified top-`k` of one query: its global candidates (`ids`, with their raw cosine
    `raw_scores`; ids < 0 are padding), plus the references local recall votes for when
    `recall`, verified and rescored by the fused score (`rdcd.search.verify_candidates`), best
    first. `local` is a `LocalData` (or anything with its `features_of`, `vote`, `fused`,
    `config`). The one function every query path calls, so they agree."""
    from rdcd.search import local_recall, verify_candidates

    dead = getattr(local, "_dead", set())
    gids = [int(i) for i in np.asarray(ids).tolist()]
    gscores = [float(s) for s in np.asarray(raw_scores).tolist()]
    keep = [(i, s) for i, s in zip(gids, gscores, strict=True) if i >= 0 and i not in dead]
    gids, gscores = [i for i, _ in keep], [s for _, s in keep]
    voted = local.vote(query) if recall else []
    cands, scores, votes = local_recall(gids, gscores, voted)
    out = verify_candidates(query, cands, scores, local.features_of, local.fused, local.config,
                            votes)  # fmt: skip
    return out[:k]


def verified_matches(
    verified: list[Any],
    global_ids: Any,
    uris: dict[int, str | None],
    threshold: float,
) -> list[dict[str, Any]]:
    """JSON-ready matches of one verified query, as `/v1/match?verify=true` answers and
    `rdcd match --verify` records them: `score` is the fused score, `raw_score` the global cosine
    (None for a reference only local recall proposed: it has no global score of its own),
    `inliers`, `region` (boxes in query and reference pixels), `transform`, `votes`."""
    proposed = {int(i) for i in np.asarray(global_ids).tolist() if int(i) >= 0}
    out = []
    for c in verified:
        v = c.verification.to_dict()
        out.append(
            {
                "reference_id": int(c.id),
                "uri": uris.get(int(c.id)),
                "score": round(float(c.score), 6),
                "raw_score": round(float(c.global_score), 6) if c.id in proposed else None,
                "is_copy": float(c.score) >= threshold,
                "inliers": int(c.inliers),
                "matches": v["matches"],
                "transform": v["transform"],
                "region": v["region"],
                "votes": int(c.votes),
            }
        )
    return out


def stored_form(feats: Any) -> Any:
    """`feats` as a round trip through the Parquet form gives them back (float16 keypoints), so
    features extracted in a request verify exactly as the same image's stored features do."""
    from rdcd.local import LocalFeatures

    kp = feats.keypoints.astype(np.float16).astype(np.float32)
    return LocalFeatures(kp, feats.descriptors, feats.width, feats.height)


__all__ = [
    "IndexConfig",
    "IndexStoreError",
    "FactoryChoice",
    "InMemoryLocal",
    "LocalData",
    "LocalUnavailableError",
    "load_local",
    "verified_matches",
    "verify_row",
    "add_references",
    "build_index",
    "choose_factory",
    "compact",
    "current_version",
    "load_index",
    "read_manifest",
    "remove_references",
]
