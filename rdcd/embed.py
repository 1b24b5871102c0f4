"""Embedding image files with a descriptor model: in one process, or as a Ray Data bulk job.

`embed_files` is the in-process path used by evaluation, the demo and benchmarks: threads read and
decode (PIL and file I/O release the GIL) while the model runs on the previous batch.

`run_embed_job` is `rdcd embed`: millions of images from a prefix or a manifest file, read and
decoded in Ray tasks, embedded by a pool of model actors (one model load per actor, a GPU when the
cluster has one) and written as resumable Parquet parts through `rdcd.store`.

Both report files that cannot be read or decoded with their reason and carry on: one bad file
never costs a job.

With `local_features` (`rdcd embed --local-features`) the read+decode tasks also extract each
image's RootSIFT features (`rdcd.local.extract_bytes`, CPU, from the same bytes the model's pixels
come from), which travel with the group to the writer and are committed as `local/part-NNNNN`
beside the part's shard (see `rdcd.store`). An image whose features cannot be extracted is an
error row like one that does not decode, so shards + errors still account for every input.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from rdcd import io as rio
from rdcd import store
from rdcd.decode import DEFAULT_MAX_PIXELS, DecodeConfig, DecodeError, load_for_model

if TYPE_CHECKING:  # importing torch costs seconds in every Ray decode worker: only when typing
    from rdcd.models.embedder import Embedder

log = logging.getLogger(__name__)


@dataclass
class EmbeddedSet:
    """Descriptors of the files that decoded (`uris[i]` -> `embeddings[i]`), plus the failures."""

    uris: list[str]
    embeddings: np.ndarray
    errors: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return len(self.uris) / self.seconds if self.seconds > 0 else 0.0


def _load(uri: str, size: int, config: DecodeConfig) -> np.ndarray | str:
    try:
        return load_for_model(rio.read_bytes(uri), size, config)
    except DecodeError as exc:
        return exc.reason
    except rio.StorageError as exc:
        return f"unreadable: {exc}"


def _batches(
    uris: Sequence[str], size: int, batch_size: int, workers: int, config: DecodeConfig
) -> Iterator[list[tuple[str, np.ndarray | str]]]:
    """Decoded batches in input order, with up to two batches decoding ahead."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: deque[tuple[list[str], list[Future]]] = deque()
        starts = range(0, len(uris), batch_size)
        it = iter(starts)

        def submit() -> None:
            start = next(it, None)
            if start is not None:
                chunk = list(uris[start : start + batch_size])
                pending.append((chunk, [pool.submit(_load, u, size, config) for u in chunk]))

        for _ in range(3):
            submit()
        while pending:
            chunk, futures = pending.popleft()
            submit()
            yield [(u, f.result()) for u, f in zip(chunk, futures, strict=True)]


def embed_files(
    embedder: Embedder,
    uris: Sequence[str],
    *,
    batch_size: int = 32,
    workers: int = 2,
    progress: bool = True,
    desc: str = "embedding",
    decode_config: DecodeConfig = DecodeConfig(),
) -> EmbeddedSet:
    """Embed every file of `uris` with `embedder`; undecodable files land in `errors`."""
    t0 = time.perf_counter()
    ok_uris: list[str] = []
    chunks: list[np.ndarray] = []
    errors: dict[str, str] = {}
    bar = tqdm(total=len(uris), desc=desc, unit="img", disable=not progress, leave=False)
    for batch in _batches(uris, embedder.image_size, batch_size, workers, decode_config):
        good = [(u, a) for u, a in batch if isinstance(a, np.ndarray)]
        for u, a in batch:
            if isinstance(a, str):
                errors[u] = a
                log.warning("skipping %s: %s", u, a)
        if good:
            chunks.append(embedder.embed(np.stack([a for _, a in good])))
            ok_uris.extend(u for u, _ in good)
        bar.update(len(batch))
    bar.close()
    emb = np.concatenate(chunks) if chunks else np.zeros((0, embedder.dim), np.float32)
    return EmbeddedSet(ok_uris, emb, errors, time.perf_counter() - t0)


# ---- the bulk job: Ray Data over local disk or S3 into resumable Parquet parts ----------------

# Test-only: after this many parts committed in one invocation, write half of the next shard and
# kill the process, as a worker dying mid-write would. Lets tests prove that resume is exact.
CRASH_ENV = "RDCD_TEST_CRASH_AFTER_PARTS"
MANIFEST_SUFFIXES = (".txt", ".lst", ".parquet")
_MAX_INPUT_BLOCKS = 10_000
PLAN_SETTLE_S = 10.0  # how long a default plan waits for just-released CPUs before refusing
_MAX_WRITES_IN_FLIGHT = 4


@dataclass
class EmbedJobConfig:
    """Settings of `rdcd embed`. The defaults run on a laptop and fill a cluster.

    `shard_size` fixes part boundaries (part k = ids [k * shard_size, (k + 1) * shard_size)), so
    it cannot change between a run and its resume. Batches never cross a part and always hold the
    same ids, so a resumed run produces the very same bytes as an uninterrupted one.
    """

    images: str = ""  # prefix/folder, or a manifest file (.txt/.lst one URI a line, .parquet `uri`)
    out: str = ""
    model: str = "sscd"
    teacher: str | None = None  # teacher file when model is `sscd`
    shard_size: int = 10_000
    batch_size: int = 32
    actors: int | None = None  # model actors; None: as many as the cluster holds
    cpus_per_actor: float | None = None  # None: 1 with a GPU; else up to 4 cores, leaving headroom
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    decode_cpus: float = 0.25  # per read+decode task: fractional, or actors starve them on 2 cores
    io_threads: int = 8  # concurrent reads per decode task (S3 latency, not CPU, bounds reads)
    # Compute precision (rdcd.models.runtime): auto = int8 onnxruntime on CPU, fp16 on a GPU.
    precision: str = "auto"
    # Stored descriptor dtype; None: fp16 when `precision` is fp16 (what `--precision fp16`
    # meant before compute and storage were two settings), else fp32.
    storage: str | None = None
    image_size: int | None = None  # teachers only: input size (students keep their checkpoint's)
    max_pixels: int = DEFAULT_MAX_PIXELS
    all_files: bool = False  # list every file under the prefix, not only image suffixes
    reuse_manifest: bool = False  # finish the recorded listing even if the input changed since
    # RootSIFT features of every image into local/part-NNNNN.parquet (rdcd.local), for
    # verification and local recall; fixed for a run, like the model
    local_features: bool = False
    local_config: dict[str, Any] = field(default_factory=dict)  # LocalConfig overrides
    progress: bool = True

    def validate(self) -> None:
        if not self.images or not self.out:
            raise ValueError("embed needs --images URI and --out URI")
        if self.shard_size < 1 or self.batch_size < 1 or self.io_threads < 1:
            raise ValueError("--shard-size, --batch-size and --io-threads must be >= 1")
        from rdcd.models.runtime import PRECISIONS

        if self.precision not in PRECISIONS:
            raise ValueError(
                f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}"
            )
        if self.storage not in (None, "fp32", "fp16"):
            raise ValueError(f"--storage must be fp32 or fp16, not {self.storage!r}")
        if self.actors is not None and self.actors < 1:
            raise ValueError("--actors must be >= 1")
        for name in ("cpus_per_actor", "gpus_per_actor"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
        if self.decode_cpus <= 0:
            raise ValueError("decode_cpus must be > 0")
        if self.local_config and not self.local_features:
            raise ValueError("local feature settings apply with --local-features only")
        self.local_settings()  # LocalConfig validates its fields

    def local_settings(self) -> dict[str, Any] | None:
        """The full LocalConfig of the run's local features, or None without them."""
        if not self.local_features:
            return None
        from rdcd.local import LocalConfig

        return LocalConfig.from_dict(self.local_config).to_dict()

    @property
    def storage_precision(self) -> str:
        """The dtype the shards hold (part of the run's identity: resumes must keep it)."""
        return self.storage or ("fp16" if self.precision == "fp16" else "fp32")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ActorPlan:
    """How many model actors, and what each one holds."""

    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    threads: int  # intra-op threads of the model in each actor
    device: str


def plan_actors(
    cfg: EmbedJobConfig, cpus: float, gpus: float, free_cpus: float | None = None
) -> ActorPlan:
    """Size the actor pool for a cluster with `cpus` CPUs and `gpus` GPUs.

    On CPU the model is the bottleneck (15-25x slower than decoding), so actors take most cores
    but leave headroom for the read+decode tasks: without it Ray schedules no decode task and the
    job hangs. On GPU, one actor per GPU with a core to feed it. With explicit `actors` and
    `gpus_per_actor` the pool may outgrow the cluster as it is now (GPU workers that scale from
    zero, cluster/aws.yaml): Ray's autoscaler starts nodes for the pending actors.

    `free_cpus` (Ray's available CPUs) sizes a CPU pool from what other work (a Serve app,
    another job) leaves free: a pool sized from the total would wait for CPUs that are never
    released, and the job would hang. A default plan that does not fit the free CPUs is refused
    with the numbers; an explicit `actors`/`cpus_per_actor` plan is kept and waits for them.
    """
    gpa = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    if gpa > 0:
        if gpus < gpa and not cfg.actors:
            raise ValueError(
                f"--gpus-per-actor {gpa}, but the Ray cluster has {gpus:g} GPU(s); on a cluster "
                "whose autoscaler adds GPU nodes on demand, give --actors N as well"
            )
        cpa = cfg.cpus_per_actor if cfg.cpus_per_actor is not None else 1.0
        actors = cfg.actors or max(1, int(gpus // gpa))
        plan = ActorPlan(actors, cpa, gpa, max(1, math.ceil(cpa)), "cuda")
        if actors * gpa > gpus:
            # An explicit pool larger than today's cluster: the pending actors are the demand
            # that makes the autoscaler start GPU nodes (which bring their own CPUs).
            log.info("%d actor(s) x %g GPU on %g GPU(s) now: waiting for the autoscaler",
                     actors, gpa, gpus)  # fmt: skip
            return plan
    else:
        room = cpus if free_cpus is None else max(0.0, min(cpus, free_cpus))
        headroom = max(2 * cfg.decode_cpus, room / 8)
        cpa = cfg.cpus_per_actor or max(0.5, min(4.0, room - headroom))
        actors = cfg.actors or max(1, int((room - headroom) // cpa))
        plan = ActorPlan(actors, cpa, 0.0, max(1, math.ceil(cpa)), "cpu")
        need = actors * cpa + cfg.decode_cpus
        if free_cpus is not None and need > free_cpus + 1e-9 and need <= cpus + 1e-9:
            if not (cfg.actors or cfg.cpus_per_actor):
                raise ValueError(
                    f"only {free_cpus:g} of the Ray cluster's {cpus:g} CPUs are free (a Serve "
                    f"app or another job holds the rest); the smallest pool needs {need:g} "
                    "(one actor of 0.5 CPU plus decoding). Free some CPUs, or give --actors "
                    "and --cpus-per-actor to wait for them"
                )
            log.warning("%d actor(s) x %g CPU + %g for decoding > %g free CPUs: the job "
                        "waits until other work frees them", actors, cpa, cfg.decode_cpus,
                        free_cpus)  # fmt: skip
    if plan.actors * plan.cpus_per_actor + cfg.decode_cpus > cpus + 1e-9:
        raise ValueError(
            f"{plan.actors} actor(s) x {plan.cpus_per_actor:g} CPU plus {cfg.decode_cpus:g} CPU "
            f"for decoding exceed the {cpus:g} CPUs of the Ray cluster: decode tasks would never "
            "run. Use fewer --actors or a smaller --cpus-per-actor"
        )
    return plan


def load_embedder(
    spec: str,
    *,
    teacher: str | None = None,
    device: str | None = None,
    precision: str = "auto",
    image_size: int | None = None,
    threads: int | None = None,
    backend: str = "auto",
) -> Embedder:
    """`load_model` as jobs run it (a student in onnxruntime on CPU, `precision` resolved by
    `rdcd.models.runtime`), with the intra-op thread count under control: several actors on one
    node must not each spawn a thread per core. `backend="torch"` loads the plain torch model
    (cheap: what a driver that only needs the fingerprint wants)."""
    import torch

    from rdcd.models import ModelError, load_model

    if threads:
        torch.set_num_threads(threads)
    model = load_model(spec, teacher=teacher, device=device, precision=precision,
                       teacher_size=image_size, threads=threads or 0, backend=backend)  # fmt: skip
    if image_size and model.image_size != image_size:
        raise ModelError(
            f"{spec} takes {model.image_size}px images only; --image-size {image_size} applies "
            "to teachers with a free input size (students keep the size they were trained for)"
        )
    return model


def list_inputs(images: str, all_files: bool = False) -> store.Manifest:
    """The input listing, in id order: a prefix sorted by URI, or a manifest file in its own
    order (relative lines resolve against the manifest's folder; duplicates are dropped)."""
    lowered = images.lower()
    if lowered.endswith(MANIFEST_SUFFIXES):
        if lowered.endswith(".parquet"):
            import pyarrow.parquet as pq

            table = pq.read_table(io.BytesIO(rio.read_bytes(images)), columns=["uri"])
            lines = [str(u) for u in table.column("uri").to_pylist() if u]
        else:
            lines = [ln.strip() for ln in rio.read_text(images).splitlines()]
            lines = [ln for ln in lines if ln and not ln.startswith("#")]
        base = images.rsplit("/", 1)[0] if "/" in images else "."
        uris = [u if rio.is_s3(u) or u.startswith("/") else rio.join(base, u) for u in lines]
        unique = list(dict.fromkeys(uris))
        if len(unique) != len(uris):
            log.warning("%s: dropped %d duplicate URIs", images, len(uris) - len(unique))
        sizes, versions = np.full(len(unique), -1, np.int64), [""] * len(unique)
    else:
        files = rio.list_files(images, None if all_files else rio.IMAGE_SUFFIXES)
        unique = [f.uri for f in files]
        sizes = np.array([f.size for f in files], np.int64)
        versions = [f.version for f in files]
    if not unique:
        raise ValueError(f"no images under {images!r}")
    return store.Manifest(unique, sizes, versions, images)


def prepare_manifest(cfg: EmbedJobConfig, has_commits: bool = False) -> store.Manifest:
    """The run's manifest: written on the first run; on later ones reused, after checking that the
    input still lists the same files (ids are positions in the listing)."""
    existing = store.read_manifest(cfg.out)
    if existing is None:
        if has_commits:
            raise store.StoreError(
                f"{cfg.out} has committed parts but no complete manifest/: the run is damaged; "
                "embed into a new --out"
            )
        listed = list_inputs(cfg.images, cfg.all_files)
        store.write_manifest(cfg.out, listed)
        log.info("manifest: %d images from %s", len(listed), cfg.images)
        return listed
    if cfg.reuse_manifest:
        log.info("reusing the manifest of %s (%d images) without listing", cfg.out, len(existing))
        return existing
    store.check_same_listing(existing, list_inputs(cfg.images, cfg.all_files), cfg.out)
    return existing


def _load_safe(uri: str, size: int, config: DecodeConfig) -> np.ndarray | str:
    """Like `_load`, but any failure at all becomes a reason: one file never kills a task."""
    try:
        return _load(uri, size, config)
    except Exception as exc:  # noqa: BLE001 - PIL plug-ins raise anything on hostile input
        return f"decode failed: {type(exc).__name__}: {exc}"


def _load_with_local(
    uri: str, size: int, config: DecodeConfig, local: dict[str, Any]
) -> tuple[np.ndarray, bytes] | str:
    """The model's pixels and the packed local features of one file, from one read; any failure
    (of either) becomes the row's reason."""
    from rdcd.local import LocalConfig, extract_bytes

    try:
        data = rio.read_bytes(uri)
    except rio.StorageError as exc:
        return f"unreadable: {exc}"
    try:
        pixels = load_for_model(data, size, config)
    except DecodeError as exc:
        return exc.reason
    except Exception as exc:  # noqa: BLE001 - PIL plug-ins raise anything on hostile input
        return f"decode failed: {type(exc).__name__}: {exc}"
    try:
        feats = extract_bytes(data, LocalConfig.from_dict(local), config)
    except DecodeError as exc:
        return f"local features: {exc.reason}"
    except Exception as exc:  # noqa: BLE001 - one file never kills a task
        return f"local features failed: {type(exc).__name__}: {exc}"
    return pixels, pack_local(feats)


_LOCAL_HEADER = np.dtype([("width", "<i4"), ("height", "<i4"), ("n", "<i4")])


def pack_local(feats: Any) -> bytes:
    """One image's `LocalFeatures` as bytes, to travel through Ray Data beside its pixels:
    (width, height, n) int32, n x 4 float32 keypoints, n x 128 uint8 descriptors."""
    head = np.array([(feats.width, feats.height, len(feats))], _LOCAL_HEADER).tobytes()
    return head + feats.keypoints.astype("<f4").tobytes() + feats.descriptors.tobytes()


def unpack_local(data: bytes) -> Any:
    """`pack_local`'s inverse."""
    from rdcd.local import LocalFeatures

    head = np.frombuffer(data, _LOCAL_HEADER, count=1)[0]
    n, at = int(head["n"]), _LOCAL_HEADER.itemsize
    kp = np.frombuffer(data, "<f4", count=4 * n, offset=at).reshape(n, 4)
    desc = np.frombuffer(data, np.uint8, count=128 * n, offset=at + 16 * n).reshape(n, 128)
    return LocalFeatures(kp.copy(), desc.copy(), int(head["width"]), int(head["height"]))


_IO_POOL: ThreadPoolExecutor | None = None


def _decode_groups(
    batch: dict[str, np.ndarray],
    *,
    size: int,
    group_size: int,
    io_threads: int,
    max_pixels: int,
    local: dict[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Ray task: read and decode whole groups (one model batch each). Decoded images are packed at
    the front of a fixed `group_size` block; the errors travel with the group as its reasons.
    With `local` (a LocalConfig dict), each decoded image's local features travel too, packed
    (`pack_local`) in the group's `local` list."""
    global _IO_POOL
    if _IO_POOL is None:
        _IO_POOL = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="rdcd-read")
    config = DecodeConfig(max_pixels=max_pixels)
    if local is None:
        load = lambda u: _load_safe(u, size, config)  # noqa: E731
    else:
        load = lambda u: _load_with_local(u, size, config, local)  # noqa: E731
    starts, metas, blocks, locals_ = [], [], [], []
    for start, uris_json in zip(batch["start"], batch["uris"], strict=True):
        uris = json.loads(str(uris_json))
        pixels = np.zeros((group_size, size, size, 3), np.uint8)
        errors: list[str] = []
        packed: list[bytes] = []
        n_ok = 0
        for uri, result in zip(uris, _IO_POOL.map(load, uris), strict=True):
            if isinstance(result, tuple):
                result, feats = result
                packed.append(feats)
            if isinstance(result, np.ndarray):
                pixels[n_ok] = result
                n_ok += 1
                errors.append("")
            else:
                log.debug("not embedded: %s: %s", uri, result)
                errors.append(result or "unknown decode error")
        starts.append(int(start))
        metas.append(json.dumps({"uris": uris, "errors": errors}))
        blocks.append(pixels)
        locals_.append(packed)
    out = {
        "start": np.asarray(starts, np.int64),
        "meta": np.asarray(metas, dtype=object),
        "pixels": np.stack(blocks),
    }
    if local is not None:
        column = np.empty(len(locals_), dtype=object)
        column[:] = locals_
        out["local"] = column
    return out


class _EmbedActor:
    """Ray Data actor: loads the model once, then embeds one group per call."""

    def __init__(self, spec: str, teacher: str | None, device: str, precision: str,
                 image_size: int | None, threads: int, fingerprint: str):  # fmt: skip
        from rdcd.models import ModelError

        self.model = load_embedder(spec, teacher=teacher, device=device, precision=precision,
                                   image_size=image_size, threads=threads)  # fmt: skip
        if self.model.fingerprint != fingerprint:
            raise ModelError(
                f"{spec} changed while the job ran (fingerprint {self.model.fingerprint[:12]}, "
                f"expected {fingerprint[:12]})"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, uris, errors, vectors, done, local = [], [], [], [], [], []
        groups = batch.get("local")
        for g, (start, meta_json, pixels) in enumerate(
            zip(batch["start"], batch["meta"], batch["pixels"], strict=True)
        ):
            meta = json.loads(str(meta_json))
            n = len(meta["uris"])
            ok = np.array([not e for e in meta["errors"]], dtype=bool)
            emb = np.zeros((n, self.model.dim), np.float32)
            if ok.any():
                emb[ok] = self.model.embed(np.array(pixels[: int(ok.sum())]))
            ids.append(np.arange(int(start), int(start) + n, dtype=np.int64))
            uris += meta["uris"]
            errors += meta["errors"]
            vectors.append(emb)
            done.append(np.full(n, time.time()))
            if groups is not None:  # packed features of the decoded rows, in row order
                packed = iter(list(groups[g]))
                local += [next(packed) if good else b"" for good in ok.tolist()]
        out = {
            "id": np.concatenate(ids),
            "uri": np.asarray(uris, dtype=object),
            "error": np.asarray(errors, dtype=object),
            "embedding": np.concatenate(vectors),
            "done_at": np.concatenate(done),  # for the steady-state rate; not stored
        }
        if groups is not None:
            column = np.empty(len(local), dtype=object)
            column[:] = local
            out["local"] = column
        return out


def _group_items(
    manifest: store.Manifest, parts: Sequence[int], shard_size: int, batch_size: int
) -> list[dict[str, Any]]:
    """Model batches of consecutive ids, never crossing a part: the same ids land in the same
    batch on every run, so resumed parts are byte-identical to uninterrupted ones."""
    items = []
    for part in parts:
        start, stop = store.part_range(part, shard_size, len(manifest))
        for s in range(start, stop, batch_size):
            e = min(stop, s + batch_size)
            items.append({"start": s, "uris": json.dumps(manifest.uris[s:e])})
    return items


class _PartWriter:
    """Writes completed parts in a background thread (S3 latency overlaps the pipeline), at most
    a few in flight so the driver's memory stays bounded."""

    def __init__(
        self, out: str, identity: store.RunIdentity, local_config: dict[str, Any] | None = None
    ):
        self.out, self.identity, self.local_config = out, identity, local_config
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rdcd-write")
        self.pending: deque[Future] = deque()
        self.written = 0
        crash = os.environ.get(CRASH_ENV)
        self.crash_after = int(crash) if crash else None

    def _write(self, part: int, rows: dict[str, Any]) -> None:
        local = None
        if self.local_config is not None:
            local = [unpack_local(b) if not e else None
                     for b, e in zip(rows["local"], rows["error"], strict=True)]  # fmt: skip
        files = store.encode_part(part, self.identity, rows["id"], rows["uri"], rows["embedding"],
                                  rows["error"], local, self.local_config)  # fmt: skip
        if self.crash_after is not None and self.written >= self.crash_after:
            shard_uri = store.part_uris(self.out, part)[0]
            rio.write_bytes(shard_uri, files.shard[: len(files.shard) // 2])
            log.error("%s=%d: dying half-way through part %d", CRASH_ENV, self.crash_after, part)
            os._exit(17)
        store.write_part(self.out, files)
        self.written += 1

    def submit(self, part: int, rows: dict[str, Any]) -> None:
        while len(self.pending) >= _MAX_WRITES_IN_FLIGHT:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(self._write, part, rows))

    def close(self) -> None:
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _execute(
    cfg: EmbedJobConfig,
    identity: store.RunIdentity,
    manifest: store.Manifest,
    pending: list[int],
) -> dict[str, Any]:
    """Run the Ray Data pipeline over the `pending` parts and commit each one as it completes."""
    import ray
    import ray.data
    from ray.data import DataContext

    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level=logging.WARNING)  # honours RAY_ADDRESS
    # A job that just ended (a previous `rdcd match` or `embed` in the same cluster) releases
    # its actors a moment after it returns: give the free CPUs a few seconds to settle before a
    # default plan that does not fit is refused.
    settle = time.monotonic() + PLAN_SETTLE_S
    while True:
        resources, free = ray.cluster_resources(), ray.available_resources()
        try:
            plan = plan_actors(cfg, float(resources.get("CPU", 0)),
                               float(resources.get("GPU", 0)),
                               free_cpus=float(free.get("CPU", 0)))  # fmt: skip
            break
        except ValueError as exc:
            if "are free" not in str(exc) or time.monotonic() > settle:
                raise
            time.sleep(0.5)
    log.info("actor plan: %s", plan)
    if plan.device == "cuda" and cfg.precision == "int8":
        raise ValueError("--precision int8 is a CPU precision (onnxruntime): on GPU actors use "
                         "fp16 or bf16, or give --gpus-per-actor 0")  # fmt: skip
    total = len(manifest)
    expected = {}
    for part in pending:
        start, stop = store.part_range(part, cfg.shard_size, total)
        expected[part] = stop - start
    seen = {p: np.zeros(int(n), dtype=bool) for p, n in expected.items()}
    buffers: dict[int, list[dict[str, np.ndarray]]] = {p: [] for p in pending}
    items = _group_items(manifest, pending, cfg.shard_size, cfg.batch_size)
    n_images = int(sum(expected.values()))
    size = identity.image_size

    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.target_max_block_size, ctx.print_on_execution_start)
    ctx.enable_progress_bars = cfg.progress
    ctx.print_on_execution_start = cfg.progress
    # A decoded group is batch_size x size^2 x 3 bytes; small blocks keep the pipeline streaming.
    ctx.target_max_block_size = max(8 * 1024**2, 2 * cfg.batch_size * size * size * 3)
    # Workers read S3 with the driver's AWS settings (endpoint, keys) when it has any: Ray
    # workers may have been started before they were set, or on machines that lack them. The
    # TorchScript opt-in travels the same way to the model actors.
    from rdcd.models.runtime import runtime_env_vars
    from rdcd.models.teacher import trust_env

    aws = {k: os.environ[k] for k in rio.AWS_ENV if os.environ.get(k)} | trust_env()
    aws |= runtime_env_vars()  # the students' runtime cache and calibration photos
    env: dict[str, Any] = {"runtime_env": {"env_vars": aws}} if aws else {}
    local = cfg.local_settings()
    writer = _PartWriter(cfg.out, identity, local)
    bar = tqdm(total=n_images, desc="embedded", unit="img", disable=not cfg.progress)
    t0 = time.perf_counter()
    t_first: float | None = None
    first_rows = duplicates = 0
    first_done, last_done = math.inf, -math.inf
    try:
        ds = ray.data.from_items(items, override_num_blocks=min(len(items), _MAX_INPUT_BLOCKS))
        ds = ds.map_batches(_decode_groups, batch_size=1, num_cpus=cfg.decode_cpus, **env,
                            fn_kwargs={"size": size, "group_size": cfg.batch_size,
                                       "io_threads": cfg.io_threads,
                                       "max_pixels": cfg.max_pixels, "local": local})  # fmt: skip
        ds = ds.map_batches(
            _EmbedActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=plan.actors),
            num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor or None, **env,
            fn_constructor_kwargs={"spec": cfg.model, "teacher": cfg.teacher,
                                   "device": plan.device, "precision": cfg.precision,
                                   "image_size": cfg.image_size, "threads": plan.threads,
                                   "fingerprint": identity.fingerprint},
        )  # fmt: skip
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            if t_first is None:
                t_first = time.perf_counter()
            # Steady-state rate: from the first embedded group to the last, minus that group
            # (actor start-up and model load are behind it, not in the rate).
            done_at = batch.pop("done_at")
            earliest = float(done_at.min())
            if earliest < first_done:
                first_done, first_rows = earliest, int((done_at == earliest).sum())
            elif earliest == first_done:
                first_rows += int((done_at == earliest).sum())
            last_done = max(last_done, float(done_at.max()))
            parts = batch["id"] // cfg.shard_size
            for part in np.unique(parts):
                part = int(part)
                sel = np.flatnonzero(parts == part)
                offsets = batch["id"][sel] - part * cfg.shard_size
                fresh = ~seen[part][offsets]  # a retried task may deliver rows twice: keep one
                duplicates += int((~fresh).sum())
                sel, offsets = sel[fresh], offsets[fresh]
                seen[part][offsets] = True
                buffers[part].append({k: v[sel] for k, v in batch.items()})
                bar.update(len(sel))
                if seen[part].all():
                    chunks = buffers.pop(part)
                    writer.submit(part, {k: np.concatenate([c[k] for c in chunks])
                                         for k in chunks[0]})  # fmt: skip
        writer.close()
    finally:
        bar.close()
        writer.pool.shutdown(wait=False, cancel_futures=True)
        ctx.enable_progress_bars, ctx.target_max_block_size, ctx.print_on_execution_start = saved
    seconds = time.perf_counter() - t0
    if buffers:
        raise RuntimeError(f"the pipeline ended with parts {sorted(buffers)[:10]} incomplete")
    if duplicates:
        log.warning("dropped %d rows delivered twice by retried tasks", duplicates)
    steady = None
    if last_done > first_done:
        steady = (n_images - first_rows) / (last_done - first_done)
    return {
        "images": n_images,
        "parts_written": len(pending),
        "seconds": round(seconds, 3),
        "first_result_seconds": round((t_first or t0) - t0, 3),
        "images_per_second": round(n_images / seconds, 2) if seconds > 0 else None,
        "steady_images_per_second": round(steady, 2) if steady else None,
        "duplicates_dropped": duplicates,
        "plan": asdict(plan),
        "cluster": {k: resources.get(k, 0) for k in ("CPU", "GPU")},
    }


def run_embed_job(cfg: EmbedJobConfig) -> dict[str, Any]:
    """Embed every image of `cfg.images` into the run at `cfg.out`, resuming what is there.

    Returns the run summary (also written to `<out>/run.json`). Raises `store.StoreError` before
    doing any work when `out` belongs to another model or its input changed.
    """
    cfg.validate()
    t0 = time.perf_counter()
    # The torch model is enough for the identity (every compute precision shares the
    # fingerprint); the actors build or find the runtime files they run.
    model = load_embedder(cfg.model, teacher=cfg.teacher, device="cpu", image_size=cfg.image_size,
                          threads=1, precision="fp32", backend="torch")  # fmt: skip
    torch_teacher = model.backend == "torch" and not model.name.startswith("student:")
    if cfg.precision == "int8" and torch_teacher:  # refused here, not in every actor
        from rdcd.models import ModelError

        raise ModelError(f"--precision int8 applies to students: the teacher {model.name} runs "
                         "as its file is (rdcd never converts a teacher)")  # fmt: skip
    identity = store.RunIdentity(model.fingerprint, model.name, model.dim, model.image_size,
                                 cfg.storage_precision, cfg.shard_size)  # fmt: skip
    del model
    commits = store.committed_parts(cfg.out)
    store.check_identity(cfg.out, identity, commits)
    store.check_local(cfg.out, commits, cfg.local_settings())
    t_list = time.perf_counter()
    manifest = prepare_manifest(cfg, bool(commits))
    listing_seconds = time.perf_counter() - t_list
    total, n_parts = len(manifest), store.num_parts(len(manifest), cfg.shard_size)
    for part, commit in commits.items():
        start, stop = store.part_range(part, cfg.shard_size, total)
        if part >= n_parts or commit.get("rows") != stop - start:
            raise store.StoreError(
                f"{cfg.out}: commit of part {part} does not match the manifest "
                f"({commit.get('rows')} rows, expected {max(0, stop - start)}): the run is damaged"
            )
    pending = [p for p in range(n_parts) if p not in commits]
    previous = store.read_run(cfg.out) or {}
    attempts = list(previous.get("attempts", []))
    run: dict[str, Any] = {
        "format": store.FORMAT,
        "status": "running",
        "identity": identity.to_dict(),
        "model": identity.model,
        "fingerprint": identity.fingerprint,
        "config": cfg.to_dict(),
        "input": {"source": cfg.images, "images": total, "parts": n_parts},
        "local_features": cfg.local_settings(),
        "attempts": attempts,
    }
    store.write_run(cfg.out, run)
    removed = store.remove_stale_temporaries(cfg.out)
    if removed:
        log.info("removed %d temporary files of an interrupted run", removed)
    log.info("%d images in %d parts: %d committed, %d to do", total, n_parts,
             n_parts - len(pending), len(pending))  # fmt: skip
    if pending:
        stats = _execute(cfg, identity, manifest, pending)
    else:
        stats = {"images": 0, "parts_written": 0, "seconds": 0.0, "images_per_second": None}
    commits = store.committed_parts(cfg.out)
    if len(commits) != n_parts:
        raise RuntimeError(f"{len(commits)} of {n_parts} parts committed after the run")
    embedded = sum(int(c["embedded"]) for c in commits.values())
    errors = sum(int(c["errors"]) for c in commits.values())
    attempt = {
        "started_parts_committed": n_parts - len(pending),
        **stats,
        "listing_seconds": round(listing_seconds, 3),
        "total_seconds": round(time.perf_counter() - t0, 3),
    }
    run.update(
        status="complete",
        counts={"images": total, "embedded": embedded, "errors": errors, "parts": n_parts,
                "parts_skipped": n_parts - len(pending), "parts_written": len(pending)},
        timings={"listing_seconds": attempt["listing_seconds"],
                 "embedding_seconds": stats["seconds"],
                 "total_seconds": attempt["total_seconds"],
                 "images_per_second": stats.get("images_per_second"),
                 "steady_images_per_second": stats.get("steady_images_per_second")},
        attempts=[*attempts, attempt],
    )  # fmt: skip
    if embedded + errors != total:
        raise RuntimeError(f"{embedded} embedded + {errors} errors != {total} images")
    store.write_run(cfg.out, run)
    return run
