"""The Ray Serve application: "is this image a copy of something we hold, and of what?"

Three kinds of deployment, composed through deployment handles:

    Ingress     FastAPI over HTTP: reads and bounds the upload, checks the bearer token, fans a
                query out to the searchers, merges their top-k, score-normalises (the same
                `ShardedIndex.finish` that offline matching uses) and applies the threshold.
    Embedder    `@serve.batch`: decodes untrusted bytes with `rdcd.decode` and runs the model on
                a batch of images at once (on a GPU when the cluster has one).
    Searcher<g> holds group g of the index shards (shard i belongs to group i mod G), so an
                index larger than one machine's memory is served by G deployments side by side.

That is the `sharded` layout. In the `local` layout (`choose_layout`: the default for an index
that fits a node, on CPU) the ingress replica holds an Embedder and one Searcher of every shard
in-process, called through the same interface as the handles (`_InProcess`): no hop between
processes per query, which on a small machine costs more than it saves. Batch settings are then
fixed when the application is deployed.

Following `CURRENT`: the ingress polls the index root every `poll_interval_s`. When a new
version is published it checks the version's model fingerprint against the embedder's model
(a mismatch is refused, logged and reported by `GET /v1/index`, and the old version stays), asks
every searcher to load its shards of the new version next to the old one, and only then switches,
so a query never mixes versions and a restart is never needed. A searcher that does not answer
within `shard_timeout_s` is left out and its shards are named in `missing_shards`.

Every replica starts from the version the application was deployed with (`build_app` checks it
and pins it; versions never change once published), never from an unchecked `CURRENT`: a
restarted embedder, searcher or ingress comes back serving, and the ingress then moves to
`CURRENT` only through the same checks, falling back to the newest published version of its
model when `CURRENT` names one it refuses. `GET /v1/health` says `ok`, `degraded` (served version
is not `CURRENT`, a searcher does not answer) or `unhealthy` (the embedder or every searcher is
down: HTTP 503), with the reasons, so a load balancer can act on it.

Verification (`verify=true` on a request, or `verify: true` as the config default): the embedder
also extracts the query's RootSIFT features (CPU, once per request), and the ingress verifies the
global top-k, plus the references local recall votes for (`local_recall`), against the index
version's stored local features with `rdcd.index.verify_row`, the code `rdcd match --verify` runs;
`score` becomes the fused score, `is_copy` compares it with the index's fused threshold (unless
the request gives `threshold`), and each match carries `inliers`, `region`, `transform`,
`votes`. A version without local data answers a verify request with 409 and the reason.

Bad input is a 4xx with `{"error": reason}`; overload, a fault (a replica that died or is being
replaced) or a passed deadline is a 503 with `Retry-After`, as JSON. Every request has deadlines
from its first byte: `body_timeout_s` to finish the upload (slow clients cannot hold the
endpoint) and `request_timeout_s` to the answer. The ingress takes many connections at once
(`max_ongoing_requests`), bounded by the bytes of uploads in flight (`max_inflight_bytes`), and
the embedder's queue is bounded (`embed_queue`).

`app_builder` is the one import path: `serve run rdcd.serve:app_builder index=... model=...`
(or `jobs.serve:app_builder`), `serve deploy cluster/serve.yaml`, and `rdcd serve` all call it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import logging
import math
import os
import signal
import threading
import time
import typing
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError, RayError
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile

from rdcd import index as rindex
from rdcd import io as rio
from rdcd.decode import DEFAULT_MAX_PIXELS, DecodeConfig, DecodeError, load_for_model
from rdcd.search import (
    FingerprintMismatchError,
    ShardedIndex,
    check_fingerprint,
    merge_topk,
)

log = logging.getLogger(__name__)

# Thresholds of the shipped default student on the shared photo set: edited copies of a reference
# scored >= 0.35 raw (>= 0.18 score-normalised), unrelated photos <= 0.26 raw (<= 0.12
# normalised). Another model needs its own: `rdcd evaluate` reports `threshold_at_p90(_sn)`.
DEFAULT_THRESHOLD = 0.3
DEFAULT_THRESHOLD_NORMALISED = 0.15
MAX_SEARCHERS = 4  # default number of searcher deployments: one per shard, at most this many
LAYOUTS = ("auto", "local", "sharded")
APP_NAME = "rdcd"


RETRY_AFTER_S = 1  # what a 503 tells a client to wait before it retries


class ServeError(ValueError):
    """A request that cannot be answered; `status` is the HTTP status, `reason` says why. A 503
    (overload, a fault, a deadline) always says when to retry."""

    def __init__(self, status: int, reason: str, retry_after: int | None = None):
        super().__init__(reason)
        self.status, self.reason = status, reason
        self.retry_after = retry_after if retry_after is not None else (
            RETRY_AFTER_S if status == 503 else None
        )  # fmt: skip


@dataclass
class ServeConfig:
    """Everything `rdcd serve`, `serve run` and a Serve config file can set. The defaults serve
    the shipped student on one machine; `index` is the only field without one that runs."""

    index: str = ""  # the index root (`rdcd index --out`): local path or s3:// URI
    model: str = "default"  # M: `default`, `sscd` or a student checkpoint path/URI
    teacher: str | None = None  # teacher file when model is `sscd`
    name: str = APP_NAME  # Serve application name
    route_prefix: str = "/"
    host: str = "127.0.0.1"  # HTTP (rdcd serve only; a config file sets http_options itself)
    port: int = 8000
    # matching
    k: int = 10  # matches returned when the request does not say
    max_k: int = 100
    threshold: float | None = None  # None: DEFAULT_THRESHOLD(_NORMALISED) by the index
    # batching (embedder)
    max_batch_size: int = 16  # 1 turns batching off
    batch_wait_timeout_s: float = 0.005
    # input limits
    max_upload_bytes: int = 16 * 1024 * 1024  # one image (and the body of /v1/match)
    max_batch_images: int = 32  # images in one /v1/match/batch request
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb limit
    # following CURRENT, and the shard fan-out
    poll_interval_s: float = 5.0
    shard_timeout_s: float = 5.0  # a searcher slower than this is reported in missing_shards
    embed_timeout_s: float = 30.0  # an embedding slower than this is a 503
    # deadlines from a request's first byte: the upload, then the whole answer (503 when passed)
    body_timeout_s: float = 10.0
    request_timeout_s: float = 30.0
    health_timeout_s: float = 2.0  # how long /v1/health waits for each replica's answer
    searchers: int | None = None  # searcher deployments; None: one per shard, at most 4
    # overload: beyond these, requests get 503 instead of waiting in an unbounded queue. The
    # ingress only awaits (uploads, the embedder, the searchers), so it takes many requests at
    # once: slow uploads must not hold every slot; memory is bounded by max_inflight_bytes.
    max_ongoing_requests: int = 512  # per ingress replica
    max_queued_requests: int = 128  # per ingress deployment (then the proxy answers 503)
    max_inflight_bytes: int = 512 * 1024 * 1024  # upload bytes held by one ingress replica
    embed_queue: int = 256  # images queued at the embedder (then the ingress answers 503)
    # resources (fractions of a CPU are fine: the ingress and searchers mostly wait)
    ingress_replicas: int = 1
    ingress_cpus: float = 0.25
    embedder_replicas: int = 1
    embedder_cpus: float = 1.0
    embedder_gpus: float | None = None  # None: one GPU per replica when the cluster has GPUs
    embed_threads: int = 0  # model intra-op threads (torch, onnxruntime); 0 = max(1, embedder_cpus)
    # compute precision of the embedder (rdcd.models.runtime): auto = int8 onnxruntime on CPU,
    # fp16 on a GPU; any precision answers an index built in another (one fingerprint)
    precision: str = "auto"
    searcher_cpus: float = 0.25
    # `sharded`: ingress, embedder and searchers as deployments composed through handles (an
    # index larger than a node); `local`: the ingress replica decodes, embeds and searches
    # in-process, no handle hops (an index that fits a node); `auto`: local when the shard
    # files total <= local_index_bytes and no GPU, searcher count or extra embedder is asked for
    layout: str = "auto"
    local_index_bytes: int = 2 * 1024**3
    # auth: when this environment variable is set (on the ingress), every route but health
    # wants `Authorization: Bearer <its value>`
    token_env: str = "RDCD_SERVE_TOKEN"
    # local verification: the default of a request's `verify` (the index needs local data), and
    # whether verification adds the references local recall votes for (`local_recall`)
    verify: bool = False
    local_recall: bool = True

    def validate(self) -> None:
        if not self.index:
            raise ValueError("serving needs --index (an index root built with `rdcd index`)")
        from rdcd.models.runtime import check_precision

        check_precision(self.precision)
        if not 1 <= self.k <= self.max_k:
            raise ValueError(f"k must be in 1..max_k={self.max_k}, got {self.k}")
        if self.max_batch_size < 1 or self.max_batch_images < 1:
            raise ValueError("max_batch_size and max_batch_images must be >= 1")
        if self.max_upload_bytes < 1:
            raise ValueError(f"max_upload_bytes must be positive, got {self.max_upload_bytes}")
        if self.searchers is not None and self.searchers < 1:
            raise ValueError(f"searchers must be >= 1, got {self.searchers}")
        for name in ("poll_interval_s", "shard_timeout_s", "embed_timeout_s", "body_timeout_s",
                     "request_timeout_s", "health_timeout_s"):  # fmt: skip
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_inflight_bytes < self.max_upload_bytes:
            raise ValueError("max_inflight_bytes must be at least max_upload_bytes")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {self.layout!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ServeConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown serve settings {unknown}; known: {sorted(known)}")
        return cls(**values)


# Settings the ingress and embedder take as `user_config`: a config file can change them on a
# running application (Serve calls `reconfigure`), no restart.
INGRESS_SETTINGS = (
    "k",
    "max_k",
    "threshold",
    "max_upload_bytes",
    "max_batch_images",
    "poll_interval_s",
    "shard_timeout_s",
    "embed_timeout_s",
    "body_timeout_s",
    "request_timeout_s",
    "health_timeout_s",
    "max_inflight_bytes",
    "max_ongoing_requests",
    "token_env",
    "verify",
    "local_recall",
)
EMBEDDER_SETTINGS = ("max_batch_size", "batch_wait_timeout_s")


def _pydantic_args() -> type[pydantic.BaseModel]:
    """ServeConfig as a pydantic model: what Serve validates a builder's `args` against."""
    hints = typing.get_type_hints(ServeConfig)
    spec = {f.name: (hints[f.name], f.default) for f in dataclasses.fields(ServeConfig)}
    return pydantic.create_model(
        "ServeArgs", __config__=pydantic.ConfigDict(extra="forbid"), **spec
    )


ServeArgs = _pydantic_args()


def shard_groups(names: list[str], groups: int) -> list[list[str]]:
    """Shard i goes to searcher i mod `groups`, so every version spreads over every searcher."""
    return [names[g::groups] for g in range(groups)]


def decode_status(reason: str) -> int:
    """The HTTP status of a `DecodeError` reason: 413 too large, 415 not an image, 400 empty,
    422 an image that cannot be decoded (truncated, corrupt)."""
    text = reason.lower()
    if "bomb" in text or "exceeds" in text:
        return 413
    if "not an image" in text:
        return 415
    if "zero-byte" in text:
        return 400
    return 422


# ---- deployments ---------------------------------------------------------------------------


@serve.deployment(name="Embedder")
class Embedder:
    """Decodes untrusted bytes and embeds a batch of images per model call."""

    def __init__(
        self,
        model: str,
        teacher: str | None,
        index: str,
        max_pixels: int,
        max_bytes: int,
        threads: int,
        version: int | None = None,
        precision: str = "auto",
    ) -> None:
        import torch

        from rdcd.models.resolve import load_model

        if threads > 0:
            torch.set_num_threads(threads)
        self.model = load_model(model, teacher=teacher, precision=precision, backend="auto",
                                threads=max(0, threads))  # fmt: skip
        self.decode_config = DecodeConfig(max_pixels=max_pixels, max_bytes=max_bytes)
        # Refuse at load an index of another model (it would answer every query with noise),
        # checked against the version the app was deployed with: it never changes, so a
        # restarted replica comes back whatever CURRENT names meanwhile (the ingress checks
        # every newer version itself).
        try:
            manifest = rindex.read_manifest(index, version)
        except (rindex.IndexStoreError, rio.StorageError) as exc:
            log.warning("embedder: cannot re-check the index (%s); the ingress checks it", exc)
        else:
            where = f"index {index} v{manifest['version']}"
            check_fingerprint(manifest["fingerprint"], self.model.fingerprint, where)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rdcd-embed")
        self._decoders = ThreadPoolExecutor(max_workers=max(1, threads),
                                            thread_name_prefix="rdcd-decode")  # fmt: skip
        log.info("embedder ready: %s", self.model.describe())

    def ping(self) -> str:
        """For `/v1/health`: answers only when the replica is up and its event loop is free."""
        return self.model.fingerprint

    def reconfigure(self, config: dict[str, Any]) -> None:
        if "max_batch_size" in config:
            self.embed.set_max_batch_size(int(config["max_batch_size"]))
        if "batch_wait_timeout_s" in config:
            self.embed.set_batch_wait_timeout_s(float(config["batch_wait_timeout_s"]))

    def describe(self) -> dict[str, Any]:
        return self.model.describe()

    def _decode(self, data: bytes) -> np.ndarray | str:
        try:
            return load_for_model(data, self.model.image_size, self.decode_config)
        except DecodeError as exc:
            return exc.reason

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005, max_concurrent_batches=2)
    async def embed(self, images: list[bytes]) -> list[dict[str, Any]]:
        """Per image: `{"vector": float32 (dim,)}` or `{"error": reason, "status": 4xx}`; one bad
        image never fails the others of its batch.

        Decoding runs on a pool of threads and the model on one, with two batches in flight, so
        one batch decodes while the other is embedded: with the int8 student, decoding a photo
        costs about what the model does (8 vs 11 ms on this CPU), and onnxruntime is no faster
        per image at batch 16 than at 1, so overlapping the two is what batching buys now."""
        loop = asyncio.get_running_loop()
        decoded = await asyncio.gather(
            *(loop.run_in_executor(self._decoders, self._decode, b) for b in images)
        )
        return await loop.run_in_executor(self._pool, self._run, list(decoded))

    def _extract(self, data: bytes, config: dict[str, Any]) -> dict[str, Any]:
        from rdcd.index import stored_form
        from rdcd.local import LocalConfig, extract_bytes

        try:
            feats = extract_bytes(data, LocalConfig.from_dict(config), self.decode_config)
        except DecodeError as exc:
            return {"error": exc.reason, "status": decode_status(exc.reason)}
        f = stored_form(feats)  # what the same image's stored features would be
        return {"keypoints": f.keypoints, "descriptors": f.descriptors, "width": f.width,
                "height": f.height}  # fmt: skip

    async def extract_local(self, data: bytes, config: dict[str, Any]) -> dict[str, Any]:
        """The query's local features, extracted with the index's settings `config` (CPU, on the
        decoding threads): `{"keypoints", "descriptors", "width", "height"}` or an error."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._decoders, self._extract, data, config)

    def _run(self, decoded: list[np.ndarray | str]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{} for _ in decoded]
        for i, d in enumerate(decoded):
            if isinstance(d, str):
                out[i] = {"error": d, "status": decode_status(d)}
        good = [i for i, d in enumerate(decoded) if isinstance(d, np.ndarray)]
        if good:
            vectors = self.model.embed(np.stack([decoded[i] for i in good]))
            for j, i in enumerate(good):
                out[i] = {"vector": vectors[j], "fingerprint": self.model.fingerprint}
        return out


@serve.deployment(name="Searcher")
class Searcher:
    """Holds group `group` of `groups` of the shards of the versions the ingress asks for (the
    newest two, so queries in flight during a switch still find theirs)."""

    KEEP = 2

    def __init__(
        self, index: str, group: int, groups: int, threads: int = 1, version: int | None = None
    ) -> None:
        import faiss

        faiss.omp_set_num_threads(max(1, threads))
        self.root, self.group, self.groups = index, group, groups
        self._loaded: dict[int, ShardedIndex] = {}
        self._lock = threading.Lock()
        # Preload the deployed version (checked by build_app); any other version is loaded
        # when the ingress asks for it (`prepare`, or the first search naming it). CURRENT is
        # never read here: it may name a version the ingress refuses.
        if version is not None:
            try:
                self._load(version)
            except Exception:  # noqa: BLE001 - a replica that cannot preload still serves later
                log.exception("searcher %d/%d: could not preload v%d", group, groups, version)

    def ping(self) -> list[int]:
        """For `/v1/health`: the versions this replica holds."""
        return sorted(self._loaded)

    def _load(self, version: int) -> ShardedIndex:
        with self._lock:
            if version in self._loaded:
                return self._loaded[version]
            manifest = rindex.read_manifest(self.root, version)
            names = [s["name"] for s in manifest["shards"]]
            mine = shard_groups(names, self.groups)[self.group]
            if mine:
                idx = rindex.load_index(self.root, version, shards=mine)
            else:
                idx = ShardedIndex([], manifest["fingerprint"], version, int(manifest["dim"]))
            self._loaded[version] = idx
            for old in sorted(self._loaded)[: -self.KEEP]:
                del self._loaded[old]
            log.info("searcher %d/%d: v%d shards %s", self.group, self.groups, version, mine)
            return idx

    async def _get(self, version: int) -> ShardedIndex:
        idx = self._loaded.get(version)
        return idx if idx is not None else await asyncio.to_thread(self._load, version)

    async def prepare(self, version: int) -> list[str]:
        """Load this searcher's shards of `version` (off the event loop: searches go on)."""
        return [s.name for s in (await self._get(version)).shards]

    async def search(
        self, queries: np.ndarray, k: int, version: int, fingerprint: str
    ) -> dict[str, Any]:
        """This group's merged top-k (raw scores) and the URIs of the ids it returns."""
        return self._answer(await self._get(version), queries, k, version, fingerprint)

    def search_blocking(
        self, queries: np.ndarray, k: int, version: int, fingerprint: str
    ) -> dict[str, Any]:
        """`search` for a caller in this process, off its event loop (the local layout)."""
        return self._answer(self._load(version), queries, k, version, fingerprint)

    def _answer(
        self, idx: ShardedIndex, queries: np.ndarray, k: int, version: int, fingerprint: str
    ) -> dict[str, Any]:
        check_fingerprint(idx.fingerprint, fingerprint, f"{self.root} v{version}")
        n = len(queries)
        raw, ids = merge_topk([s.search(queries, k) for s in idx.shards], k, n)
        flat = ids.reshape(-1)
        uris = {int(i): u for i, u in zip(flat.tolist(), idx.uris_of(flat), strict=True) if i >= 0}
        return {"scores": raw, "ids": ids, "uris": uris, "shards": [s.name for s in idx.shards]}


class _InProcess:
    """A deployment's object held in this replica, called as its handle is (`x.method.remote()`
    returns an awaitable), so the ingress code is one for both layouts. Coroutine methods run
    on this event loop, plain ones in a thread; `aliases` swaps a method for another."""

    def __init__(self, obj: Any, aliases: dict[str, str] | None = None) -> None:
        self._obj, self._aliases = obj, dict(aliases or {})

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._obj, self._aliases.get(name, name))

        class _Call:
            @staticmethod
            def remote(*args: Any, **kwargs: Any) -> asyncio.Future:
                if asyncio.iscoroutinefunction(method):
                    return asyncio.ensure_future(method(*args, **kwargs))
                return asyncio.ensure_future(asyncio.to_thread(method, *args, **kwargs))

        return _Call


def local_backends(spec: dict[str, Any]) -> tuple[_InProcess, list[_InProcess]]:
    """The embedder and the one searcher of the local layout, built in this process."""
    embedder = Embedder.func_or_class(**spec["embedder"])
    embedder.reconfigure(spec["batching"])
    searcher = Searcher.func_or_class(**spec["searcher"])
    return _InProcess(embedder), [_InProcess(searcher, {"search": "search_blocking"})]


# ---- ingress --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Version:
    """What the ingress needs of one index version; replaced as a whole when CURRENT moves."""

    version: int
    manifest: dict[str, Any]
    finisher: ShardedIndex  # no shards: score normalisation of merged results (`finish`)
    groups: list[list[str]]
    local: rindex.LocalData | None = None  # None: the version cannot verify


def _error(status: int, reason: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": reason}, status_code=status, headers=headers)


# No unauthenticated schema or docs pages: `GET /v1/openapi.json` serves the schema behind the
# same token as every other route.
api = FastAPI(title="rdcd copy detection", version="1", docs_url=None, redoc_url=None,
              openapi_url=None)  # fmt: skip


@api.exception_handler(ServeError)
async def _serve_error(_: Request, exc: ServeError) -> JSONResponse:
    return _error(exc.status, exc.reason, exc.retry_after)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
    return _error(422, "invalid request: " + "; ".join(parts))


@api.exception_handler(Exception)
async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    """A bug, not the request's fault: still JSON, with the type, never a bare traceback."""
    log.exception("unexpected error answering a request")
    return _error(500, f"internal error ({type(exc).__name__}); please report it")


@api.exception_handler(RayError)
async def _ray_error(_: Request, exc: RayError) -> JSONResponse:
    """A replica behind the ingress died or is being replaced: capacity, not the request."""
    log.warning("a backend replica failed: %s", str(exc).splitlines()[0] if str(exc) else exc)
    return _error(503, f"temporarily unavailable ({type(exc).__name__}), retry", RETRY_AFTER_S)


def _parse_k(value: str | None, default: int, max_k: int) -> int:
    if value is None or value == "":
        return default
    try:
        k = int(value)
    except ValueError:
        raise ServeError(400, f"k must be an integer, got {value[:20]!r}") from None
    if not 1 <= k <= max_k:
        raise ServeError(400, f"k must be in 1..{max_k}, got {k}")
    return k


def _parse_threshold(value: str | None, default: float | None) -> float | None:
    if value is None or value == "":
        return default
    try:
        t = float(value)
    except ValueError:
        raise ServeError(400, f"threshold must be a number, got {value[:20]!r}") from None
    if not math.isfinite(t):
        raise ServeError(400, f"threshold must be finite, got {value[:20]!r}")
    return t


def _parse_bool(name: str, value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    text = value.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ServeError(400, f"{name} must be true or false, got {value[:20]!r}")


def _replay(body: bytes) -> Callable[[], Any]:
    """An ASGI `receive` that hands out `body` once (starlette then parses it as a form)."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def token_digest(token: str, salt: str | None = None) -> dict[str, str]:
    """What the ingress keeps of a bearer token: a salted sha256, never the token, so the token
    is not in Ray's logs, its runtime environment or the deployment's stored arguments."""
    salt = salt or os.urandom(16).hex()
    return {"salt": salt, "sha256": hashlib.sha256((salt + token).encode()).hexdigest()}


class _Deadline:
    """A request's deadlines, counted from when the ingress first saw it."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.t0 = time.monotonic()
        self.body = self.t0 + float(settings["body_timeout_s"])
        self.end = self.t0 + float(settings["request_timeout_s"])

    def left(self, until: float | None = None) -> float:
        return max(0.0, min(until or self.end, self.end) - time.monotonic())


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """HTTP in front of the embedder and the searchers."""

    def __init__(
        self,
        index: str,
        embedder: DeploymentHandle,
        searchers: list[DeploymentHandle],
        settings: dict[str, Any],
        version: int | None = None,
        auth: dict[str, str] | None = None,
        local: dict[str, Any] | None = None,
    ) -> None:
        import faiss

        faiss.omp_set_num_threads(1)  # score normalisation of a few queries: threads only cost
        self.root = index
        self.layout = "local" if local else "sharded"
        if local:  # the model and the index live in this replica (see build_app)
            embedder, searchers = local_backends(local)  # type: ignore[assignment]
        self.embedder = embedder
        self.searchers = searchers
        self.settings = {k: getattr(ServeConfig, k) for k in INGRESS_SETTINGS}
        self.settings.update(settings)
        self.auth = auth
        self.model: dict[str, Any] | None = None
        self.rejected: dict[int, str] = {}
        self._failures: dict[int, int] = {}
        self._poller: asyncio.Task | None = None
        self._refresh_lock = asyncio.Lock()
        self._inflight_bytes = 0
        self._active = 0  # match requests in progress (admission control: a JSON 503 beyond)
        self._health: tuple[float, dict[str, Any], int] | None = None
        self.latest: int | None = None  # what CURRENT named at the last poll
        # Start from the deployed version (checked by build_app), never from an unchecked
        # CURRENT; the poller then moves to CURRENT through the same checks as any new version.
        self.current = self._read_version(
            version if version is not None else rindex.current_version(index)
        )
        try:
            self._ensure_poller()
        except RuntimeError:  # no running loop here: the first request or health check starts it
            pass

    def reconfigure(self, config: dict[str, Any]) -> None:
        unknown = sorted(set(config) - set(INGRESS_SETTINGS))
        if unknown:
            log.warning("ignoring unknown ingress settings %s", unknown)
        self.settings.update({k: v for k, v in config.items() if k in INGRESS_SETTINGS})

    # -- following CURRENT --

    def _read_version(self, version: int | None) -> _Version:
        if version is None:
            raise rindex.IndexStoreError(f"{self.root}: nothing published (no CURRENT)")
        manifest = rindex.read_manifest(self.root, version)
        finisher = ShardedIndex(
            [],
            manifest["fingerprint"],
            version,
            int(manifest["dim"]),
            rindex.load_normalizer(self.root, manifest),
        )
        names = [s["name"] for s in manifest["shards"]]
        local = rindex.LocalData(self.root, manifest) if manifest.get("local") else None
        return _Version(version, manifest, finisher, shard_groups(names, len(self.searchers)),
                        local)  # fmt: skip

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever())

    async def _poll_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - a bad poll must not stop the next one
                log.exception("checking %s for a new index version failed", self.root)
            await asyncio.sleep(float(self.settings["poll_interval_s"]))

    async def _model(self) -> dict[str, Any]:
        if self.model is None:
            self.model = await self.embedder.describe.remote()
        return self.model

    async def _try_switch(self, version: int, model: dict[str, Any]) -> bool:
        """Check `version` and have every searcher load it; switch to it if all went well."""
        try:
            candidate = await asyncio.to_thread(self._read_version, version)
            check_fingerprint(
                candidate.manifest["fingerprint"],
                model["fingerprint"],
                f"index {self.root} v{version}",
            )
            await asyncio.gather(*(s.prepare.remote(version) for s in self.searchers))
        except FingerprintMismatchError as exc:
            self.rejected[version] = str(exc)
            log.error("refusing index v%d: %s", version, exc)
            return False
        except Exception as exc:  # noqa: BLE001 - keep serving the old version
            self._failures[version] = self._failures.get(version, 0) + 1
            if self._failures[version] >= 3:
                self.rejected[version] = f"failed to load 3 times: {exc}"
            log.warning(
                "could not load index v%d (keeping v%d): %s", version, self.current.version, exc
            )
            return False
        log.info("serving index v%d (was v%d)", version, self.current.version)
        self.current = candidate
        return True

    async def refresh(self) -> int:
        """Switch to the version CURRENT names, if it is new and servable; returns the version
        served afterwards. A version of another model is refused; the ingress then serves the
        newest published version of its own model (the one it served before, or, after a
        restart, the last good one since the version it was deployed with)."""
        async with self._refresh_lock:
            latest = await asyncio.to_thread(rindex.current_version, self.root)
            self.latest = latest
            if latest is None or latest == self.current.version:
                return self.current.version
            model = await self._model()
            if latest not in self.rejected and await self._try_switch(latest, model):
                return latest
            if latest in self.rejected:
                published = await asyncio.to_thread(rindex.published_versions, self.root)
                for v in sorted(published, reverse=True):
                    if v <= self.current.version:
                        break
                    if v != latest and v not in self.rejected and await self._try_switch(v, model):
                        break
            return self.current.version

    async def check_health(self) -> None:
        """Serve's periodic health check also restarts the poller if it ever stopped (it does
        not fail on a sick backend: restarting the ingress would not cure that)."""
        self._ensure_poller()

    # -- request plumbing --

    def _authorize(self, request: Request) -> None:
        token = os.environ.get(str(self.settings["token_env"]))
        if not token and not self.auth:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        given = given.strip()
        if token:
            ok = hmac.compare_digest(given.encode(), token.encode())
        else:
            assert self.auth is not None
            want = self.auth["sha256"]
            ok = hmac.compare_digest(token_digest(given, self.auth["salt"])["sha256"], want)
        if scheme.lower() != "bearer" or not ok:
            raise ServeError(401, "missing or invalid bearer token")

    async def _read_body(self, request: Request, limit: int, deadline: _Deadline) -> bytes:
        length = request.headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                raise ServeError(400, f"invalid Content-Length {length[:20]!r}") from None
            if declared > limit:
                raise ServeError(413, f"upload of {declared} bytes exceeds the {limit}-byte limit")
        budget = int(self.settings["max_inflight_bytes"])
        body = bytearray()
        held = 0

        def hold(n: int) -> None:
            nonlocal held
            if self._inflight_bytes + n > budget:
                raise ServeError(503, "overloaded: too many uploads in flight, retry later")
            self._inflight_bytes += n
            held += n

        async def read() -> None:
            async for chunk in request.stream():
                hold(len(chunk))
                body.extend(chunk)
                if len(body) > limit:
                    raise ServeError(413, f"upload exceeds the {limit}-byte limit")

        try:
            await asyncio.wait_for(read(), deadline.left(deadline.body))
        except asyncio.TimeoutError:
            raise ServeError(
                503,
                f"the upload did not arrive within {self.settings['body_timeout_s']} s "
                f"({len(body)} bytes received); send it faster or retry",
            ) from None
        finally:
            self._inflight_bytes -= held
        return bytes(body)

    async def _images(self, request: Request, many: bool, deadline: _Deadline) -> list[bytes]:
        """The uploaded images: every file part of a multipart form, else the raw body."""
        per_image = int(self.settings["max_upload_bytes"])
        count = int(self.settings["max_batch_images"]) if many else 1
        body = await self._read_body(
            request, per_image * count + (64 * 1024 if many else 0), deadline
        )
        ctype = request.headers.get("content-type", "").lower()
        if not ctype.startswith("multipart/form-data"):
            if many:
                raise ServeError(415, "a batch is a multipart/form-data upload of image files")
            if not body:
                raise ServeError(400, "empty body: send the image bytes or a multipart upload")
            return [body]
        form_request = Request(request.scope, receive=_replay(body))
        try:
            # Parse up to a bound well above the limit, so "too many images" is counted and
            # answered as 413, not as the parser's own 400.
            form = await form_request.form(max_files=4 * count + 16, max_fields=4 * count + 16)
        except Exception as exc:  # noqa: BLE001 - starlette raises several kinds
            if "too many" in str(exc).lower():
                raise ServeError(413, f"too many parts in one request, the limit is {count} "
                                      "images") from None  # fmt: skip
            raise ServeError(400, f"malformed multipart upload: {exc}") from None
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise ServeError(400, "multipart upload without a file part")
        if len(files) > count:
            raise ServeError(413, f"{len(files)} images in one request, the limit is {count}")
        out = []
        for f in files:
            data = await f.read()
            if len(data) > per_image:
                raise ServeError(
                    413,
                    f"image {f.filename!r} of {len(data)} bytes exceeds the {per_image}-byte limit",
                )
            out.append(data)
        return out

    @staticmethod
    def _no_local(version: _Version) -> str:
        return (
            f"index v{version.version} holds no local features, so it cannot verify: rebuild "
            "it from an embedding run made with `rdcd embed --local-features`, or ask without "
            "verify=true"
        )

    async def _extract(self, data: bytes, config: dict[str, Any],
                       deadline: _Deadline) -> dict[str, Any]:  # fmt: skip
        """The query's local features from the embedder (CPU), under the same deadlines."""
        if not data:
            return {"error": "empty image", "status": 400}
        timeout = min(float(self.settings["embed_timeout_s"]), deadline.left())
        try:
            return await asyncio.wait_for(self.embedder.extract_local.remote(data, config), timeout)
        except BackPressureError:
            raise ServeError(503, "overloaded: the embedder's queue is full, retry later") from None
        except asyncio.TimeoutError:
            raise ServeError(503, "overloaded: local features took too long, retry") from None
        except (RayServeException, RayActorError) as exc:
            first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise ServeError(503, f"embedder unavailable ({first}), retry later") from None

    async def _embed(self, data: bytes, deadline: _Deadline) -> dict[str, Any]:
        if not data:
            return {"error": "empty image", "status": 400}
        timeout = min(float(self.settings["embed_timeout_s"]), deadline.left())
        try:
            response = self.embedder.embed.remote(data)
            return await asyncio.wait_for(response, timeout)
        except BackPressureError:
            raise ServeError(503, "overloaded: the embedder's queue is full, retry later") from None
        except asyncio.TimeoutError:
            raise ServeError(503, "overloaded: embedding took too long, retry later") from None
        except (RayServeException, RayActorError) as exc:
            # The embedder replica died or is restarting: Serve brings it back.
            first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise ServeError(503, f"embedder unavailable ({first}), retry later") from None

    async def _search(
        self,
        version: _Version,
        queries: np.ndarray,
        k: int,
        fingerprint: str,
        deadline: _Deadline,
    ) -> tuple[np.ndarray, np.ndarray, dict, list[str]]:
        timeout = max(0.001, min(float(self.settings["shard_timeout_s"]), deadline.left()))

        async def ask(g: int) -> dict[str, Any]:
            call = self.searchers[g].search.remote(queries, k, version.version, fingerprint)
            try:
                return await asyncio.wait_for(call, timeout)
            except asyncio.TimeoutError:
                call.cancel()
                raise

        live = [g for g, names in enumerate(version.groups) if names]
        answers = await asyncio.gather(*(ask(g) for g in live), return_exceptions=True)
        parts, uris, missing = [], {}, []
        for g, answer in zip(live, answers, strict=True):
            if isinstance(answer, BaseException):
                log.warning(
                    "searcher %d (shards %s) did not answer: %r", g, version.groups[g], answer
                )
                missing.extend(version.groups[g])
                continue
            parts.append((answer["scores"], answer["ids"]))
            uris.update(answer["uris"])
        if live and not parts:
            raise ServeError(503, "no index shard answered in time, retry later")
        raw, ids = merge_topk(parts, k, len(queries))
        return raw, ids, uris, missing

    async def _match(
        self,
        images: list[bytes],
        k: int,
        threshold: float | None,
        single: bool,
        deadline: _Deadline,
        verify: tuple[bool] | None = None,  # (local_recall,) to verify; None: global only
    ) -> dict[str, Any]:
        t0 = time.perf_counter()
        self._ensure_poller()
        version = self.current
        if verify is not None and version.local is None:
            raise ServeError(409, self._no_local(version))
        jobs = [self._embed(b, deadline) for b in images]
        if verify is not None:
            assert version.local is not None
            config = version.local.config.to_dict()
            jobs += [self._extract(b, config, deadline) for b in images]
        done = await asyncio.gather(*jobs)
        embedded, extracted = done[: len(images)], done[len(images) :]
        for i, x in enumerate(extracted):  # a query that decodes for one decodes for both
            if "error" in x and "vector" in embedded[i]:
                embedded[i] = x
        t_embed = time.perf_counter()
        if single and "error" in embedded[0]:
            raise ServeError(int(embedded[0]["status"]), str(embedded[0]["error"]))
        good = [i for i, e in enumerate(embedded) if "vector" in e]
        fingerprint = embedded[good[0]]["fingerprint"] if good else ""
        if threshold is None and verify is not None:  # the fused score's own threshold
            threshold = float(version.local.fused.threshold)  # type: ignore[union-attr]
        if threshold is None:
            threshold = self._default_threshold(version)
        results: list[dict[str, Any]] = [
            {"error": e["error"], "status": e["status"]} if "error" in e else {} for e in embedded
        ]
        missing: list[str] = []
        t_search = t_embed
        if good:
            queries = np.stack([embedded[i]["vector"] for i in good]).astype(np.float32)
            raw, ids, uris, missing = await self._search(version, queries, k, fingerprint, deadline)
            t_search = time.perf_counter()
            found = version.finisher.finish(queries, raw, ids, tuple(missing))
            if verify is not None:
                verified = await asyncio.to_thread(
                    self._verify, version, [extracted[i] for i in good], found, uris,
                    k, verify[0], threshold,
                )  # fmt: skip
                for row, i in enumerate(good):
                    matches = verified[row]
                    results[i] = {
                        "is_copy": bool(matches and matches[0]["is_copy"]),
                        "matches": matches,
                    }
                good = []  # answered
            for row, i in enumerate(good):
                matches = []
                for col in range(ids.shape[1]):
                    rid = int(found.ids[row, col])
                    if rid < 0:
                        continue
                    score = float(found.scores[row, col])
                    matches.append(
                        {
                            "reference_id": rid,
                            "uri": uris.get(rid),
                            "score": round(score, 6),
                            "raw_score": round(float(found.raw_scores[row, col]), 6),
                            "is_copy": score >= threshold,
                        }
                    )
                results[i] = {
                    "is_copy": bool(matches and matches[0]["is_copy"]),
                    "matches": matches,
                }
        head = {
            "model": fingerprint or (self.model or {}).get("fingerprint"),
            "index_version": version.version,
            "k": k,
            "threshold": threshold,
            "score_normalised": version.finisher.normalizer is not None,
            "missing_shards": missing,
            "verified": verify is not None,
        }
        if verify is not None:
            head["score"] = "fused"
            head["local_recall"] = bool(verify[0] and version.local.has_recall)  # type: ignore[union-attr]
        now = time.perf_counter()
        head["took_ms"] = round(1000 * (now - t0), 2)
        head["timings_ms"] = {
            "embed": round(1000 * (t_embed - t0), 2),
            "search": round(1000 * (t_search - t_embed), 2),
        }
        if verify is not None:
            head["timings_ms"]["verify"] = round(1000 * (now - t_search), 2)
        return {**head, **results[0]} if single else {**head, "results": results}

    @staticmethod
    def _verify(version: _Version, extracted: list[dict[str, Any]], found: Any,
                uris: dict[int, str], k: int, recall: bool,
                threshold: float) -> list[list[dict[str, Any]]]:  # fmt: skip
        """Verified matches of each query row (`rdcd.index.verify_row`, as `rdcd match
        --verify`), off the event loop: matching costs milliseconds per candidate."""
        from rdcd.local import LocalFeatures

        local = version.local
        assert local is not None
        out = []
        for row, x in enumerate(extracted):
            query = LocalFeatures(x["keypoints"], x["descriptors"], x["width"], x["height"])
            ids = found.ids[row]
            verified = rindex.verify_row(local, query, ids, found.raw_scores[row], k,
                                         recall and local.has_recall)  # fmt: skip
            known = {int(i): uris.get(int(i)) for i in ids.tolist() if i >= 0}
            extra = [c.id for c in verified if c.id not in known]
            known.update(local.uri_of(extra) if extra else {})
            out.append(rindex.verified_matches(verified, ids, known, threshold))
        return out

    def _default_threshold(self, version: _Version) -> float:
        if self.settings["threshold"] is not None:
            return float(self.settings["threshold"])
        normalised = version.finisher.normalizer is not None
        return DEFAULT_THRESHOLD_NORMALISED if normalised else DEFAULT_THRESHOLD

    async def _answer(self, request: Request, many: bool) -> dict[str, Any]:
        """One match request under its deadline (from the first byte the ingress saw)."""
        deadline = _Deadline(self.settings)
        self._authorize(request)
        k = _parse_k(
            request.query_params.get("k"), int(self.settings["k"]), int(self.settings["max_k"])
        )
        threshold = _parse_threshold(request.query_params.get("threshold"), None)
        params = request.query_params
        verify = _parse_bool("verify", params.get("verify"), bool(self.settings["verify"]))
        recall = _parse_bool("local_recall", params.get("local_recall"),
                             bool(self.settings["local_recall"]))  # fmt: skip
        if verify and self.current.local is None:
            raise ServeError(409, self._no_local(self.current))

        async def work() -> dict[str, Any]:
            images = await self._images(request, many, deadline)
            return await self._match(images, k, threshold, not many, deadline,
                                     (recall,) if verify else None)  # fmt: skip

        # Refused here, as JSON, before Serve's own cap (set a little higher in build_app) would
        # queue the request at the proxy or answer with its plain-text 503.
        limit = int(self.settings["max_ongoing_requests"])
        if self._active >= limit:
            raise ServeError(503, f"overloaded: {self._active} requests in progress, retry later")
        self._active += 1
        try:
            return await asyncio.wait_for(work(), deadline.left())
        except asyncio.TimeoutError:
            raise ServeError(
                503,
                f"no answer within the {self.settings['request_timeout_s']} s deadline "
                "(busy), retry later",
            ) from None
        finally:
            self._active -= 1

    # -- health --

    async def _probe(self, call: Any, timeout: float) -> tuple[bool, str]:
        try:
            await asyncio.wait_for(call, timeout)
            return True, ""
        except asyncio.TimeoutError:
            return False, f"no answer within {timeout} s"
        except Exception as exc:  # noqa: BLE001 - any failure is the answer
            return False, (str(exc).splitlines() or [type(exc).__name__])[0][:200]

    async def _health_report(self) -> tuple[dict[str, Any], int]:
        timeout = float(self.settings["health_timeout_s"])
        version = self.current
        live = [g for g, names in enumerate(version.groups) if names]
        probes = await asyncio.gather(
            self._probe(self.embedder.ping.remote(), timeout),
            *(self._probe(self.searchers[g].ping.remote(), timeout) for g in live),
        )
        degraded: list[str] = []
        unhealthy: list[str] = []
        embed_ok, why = probes[0]
        if not embed_ok:
            unhealthy.append(f"embedder not answering: {why}")
        down = [g for g, (ok, _) in zip(live, probes[1:], strict=True) if not ok]
        missing = [name for g in down for name in version.groups[g]]
        for g, (ok, why) in zip(live, probes[1:], strict=True):
            if not ok:
                degraded.append(f"searcher {g} (shards {version.groups[g]}) not answering: {why}")
        if live and len(down) == len(live):
            unhealthy.append("no searcher answers: no shard can be searched")
        latest = self.latest
        if latest is not None and latest != version.version:
            why = self.rejected.get(latest, "not loaded yet")
            degraded.append(f"serving v{version.version}, but CURRENT names v{latest}: {why}")
        status = "unhealthy" if unhealthy else ("degraded" if degraded else "ok")
        body = {
            "status": status,
            "reasons": unhealthy + degraded,
            "index_version": version.version,
            "current_version": latest,
            "missing_shards": missing,
            "model": (self.model or {}).get("fingerprint"),
        }
        return body, 503 if unhealthy else 200

    # -- routes --

    @api.get("/v1/health")
    async def health(self) -> JSONResponse:
        """`ok`/`degraded` (200) or `unhealthy` (503), with reasons; cached for a second so a
        fleet of load-balancer probes costs the backends one ping a second."""
        self._ensure_poller()
        now = time.monotonic()
        if self._health is None or now - self._health[0] > 1.0:
            body, code = await self._health_report()
            self._health = (now, body, code)
        _, body, code = self._health
        headers = {"Retry-After": str(RETRY_AFTER_S)} if code == 503 else None
        return JSONResponse(body, status_code=code, headers=headers)

    @api.get("/v1/index")
    async def index_info(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        self._ensure_poller()
        version = self.current
        info = rindex.summary(version.manifest)
        info.update(
            root=self.root,
            current_version=self.latest,
            score_normalised=version.finisher.normalizer is not None,
            threshold=self._default_threshold(version),
            searchers=[{"searcher": g, "shards": names} for g, names in enumerate(version.groups)],
            rejected_versions={str(v): why for v, why in self.rejected.items()},
            layout=self.layout,
            poll_interval_s=self.settings["poll_interval_s"],
        )
        return info

    @api.get("/v1/openapi.json")
    async def openapi(self, request: Request) -> dict[str, Any]:
        """The API schema, behind the token like every route but health."""
        self._authorize(request)
        return api.openapi()

    @api.post("/v1/match")
    async def match(self, request: Request) -> dict[str, Any]:
        """One image (raw bytes or a multipart file); query parameters `k`, `threshold`."""
        return await self._answer(request, many=False)

    @api.post("/v1/match/batch")
    async def match_batch(self, request: Request) -> dict[str, Any]:
        """Several images as the file parts of one multipart upload; `results[i]` is the i-th
        file's matches, or its own `error` and `status` when it is not a usable image."""
        return await self._answer(request, many=True)


# ---- the application builder ---------------------------------------------------------------


def _cluster_has_gpu() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def choose_layout(cfg: ServeConfig, manifest: dict[str, Any], gpus: float) -> str:
    """`cfg.layout`, with `auto` resolved: `local` for an index whose shard files total at most
    `local_index_bytes`, on CPU, when neither a searcher count nor more than one embedder replica
    is asked for (those are knobs of the sharded layout); else `sharded`. On a small machine the
    handle hops between five processes cost more than they save (benchmarks/serve.py)."""
    if cfg.layout != "auto":
        return cfg.layout
    size = sum(int(s.get("bytes", 0)) for s in manifest["shards"])
    if gpus > 0 or cfg.searchers is not None or cfg.embedder_replicas > 1:
        return "sharded"
    return "local" if size <= cfg.local_index_bytes else "sharded"


def build_app(cfg: ServeConfig) -> serve.Application:
    """The application for `cfg`. Sharded layout: one ingress, one embedder, G searchers (each a
    deployment holding every G-th shard); local layout: the ingress alone, holding the model and
    every shard (`choose_layout`). Reads the published manifest to size G; refuses an index root
    with nothing published. Every replica is pinned to that version to start from (see the
    module docstring)."""
    cfg.validate()
    cfg = dataclasses.replace(cfg, index=rio.canonical(cfg.index))  # replicas run elsewhere
    manifest = rindex.read_manifest(cfg.index)
    version = int(manifest["version"])
    n_shards = len(manifest["shards"])
    groups = cfg.searchers or max(1, min(n_shards, MAX_SEARCHERS))
    gpus = (
        cfg.embedder_gpus if cfg.embedder_gpus is not None else (1.0 if _cluster_has_gpu() else 0.0)
    )
    threads = cfg.embed_threads or max(1, int(cfg.embedder_cpus))
    from rdcd.models.teacher import trust_env  # here: the ingress and searchers need no torch

    actor_options: dict[str, Any] = {"num_cpus": cfg.embedder_cpus, "num_gpus": gpus}
    from rdcd.models.runtime import runtime_env_vars

    env_vars = trust_env() | runtime_env_vars()  # the TorchScript opt-in, the student cache
    if env_vars:  # (not secrets) reach the embedder's node
        actor_options["runtime_env"] = {"env_vars": env_vars}
    layout = choose_layout(cfg, manifest, gpus)
    log.info("serving %s v%d in the %s layout", cfg.index, version, layout)
    # Internal calls are not worth a log line each (the ingress logs every HTTP request).
    quiet = {"enable_access_log": False}
    embedder = Embedder.options(
        num_replicas=cfg.embedder_replicas,
        ray_actor_options=actor_options,
        max_ongoing_requests=max(cfg.max_batch_size * 2, 8),
        max_queued_requests=cfg.embed_queue,
        user_config={k: getattr(cfg, k) for k in EMBEDDER_SETTINGS},
        logging_config=quiet,
    ).bind(cfg.model, cfg.teacher, cfg.index, cfg.max_pixels, cfg.max_upload_bytes, threads,
           version, cfg.precision)  # fmt: skip
    searchers = [
        Searcher.options(
            name=f"Searcher{g}",
            ray_actor_options={"num_cpus": cfg.searcher_cpus},
            max_ongoing_requests=64,
            logging_config=quiet,
        ).bind(cfg.index, g, groups, max(1, int(cfg.searcher_cpus)), version)
        for g in range(groups)
    ]
    settings = {k: getattr(cfg, k) for k in INGRESS_SETTINGS}
    # The driver's token reaches the ingress wherever Serve places it as a salted digest, never
    # in clear (a runtime_env variable would be written to Ray's logs). A token set in the
    # ingress's own environment (e.g. a cluster secret) is used as it is.
    token = os.environ.get(cfg.token_env)
    auth = token_digest(token) if token else None
    if layout == "local":
        local = {
            "embedder": {"model": cfg.model, "teacher": cfg.teacher, "index": cfg.index,
                         "max_pixels": cfg.max_pixels, "max_bytes": cfg.max_upload_bytes,
                         "threads": threads, "version": version, "precision": cfg.precision},
            "searcher": {"index": cfg.index, "group": 0, "groups": 1, "threads": 1,
                         "version": version},
            "batching": {k: getattr(cfg, k) for k in EMBEDDER_SETTINGS},
        }  # fmt: skip
        options = {**actor_options, "num_cpus": cfg.ingress_cpus + cfg.embedder_cpus}
        return Ingress.options(
            num_replicas=cfg.ingress_replicas,
            ray_actor_options=options,
            max_ongoing_requests=cfg.max_ongoing_requests + 64,
            max_queued_requests=cfg.max_queued_requests,
            user_config=settings,
        ).bind(cfg.index, None, [], settings, version, auth, local)
    return Ingress.options(
        num_replicas=cfg.ingress_replicas,
        ray_actor_options={"num_cpus": cfg.ingress_cpus},
        max_ongoing_requests=cfg.max_ongoing_requests + 64,  # room for health and index calls
        max_queued_requests=cfg.max_queued_requests,
        user_config=settings,
    ).bind(cfg.index, embedder, searchers, settings, version, auth)


def app_builder(args: ServeArgs) -> serve.Application:  # type: ignore[valid-type]
    """The typed builder for `serve run MODULE:app_builder index=... model=...` and config
    files (`import_path` + `args`); Serve validates `args` against ServeConfig's fields."""
    values = args.model_dump() if isinstance(args, pydantic.BaseModel) else dict(args)
    return build_app(ServeConfig.from_dict(values))


def serve_forever(cfg: ServeConfig, on_ready: Callable[[str], None] | None = None) -> None:
    """`rdcd serve`: deploy on the Ray cluster at RAY_ADDRESS (or a local one started here) and
    block until SIGTERM or Ctrl-C, then shut Serve down and stop the Ray instance if it was
    started here (on a shared cluster only this application is deleted)."""
    import ray

    cfg.validate()
    stop = threading.Event()
    handlers = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        handlers[sig] = signal.signal(sig, lambda *_: stop.set())
    started_ray = False
    try:
        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS")
            started_ray = not address
            ray.init(
                address=address or "local",
                include_dashboard=False if not address else None,
                logging_level="WARNING",
            )
            for sig in handlers:  # ray.init installs its own; ours decide how we stop
                signal.signal(sig, lambda *_: stop.set())
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(build_app(cfg), name=cfg.name, route_prefix=cfg.route_prefix, blocking=False)
        url = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
        if on_ready is not None:
            on_ready(url)
        while not stop.wait(0.5):
            pass
    finally:
        try:
            if started_ray:
                serve.shutdown()
            elif ray.is_initialized():
                serve.delete(cfg.name)
        finally:
            if started_ray and ray.is_initialized():
                ray.shutdown()
            for sig, old in handlers.items():
                signal.signal(sig, old)


__all__ = [
    "DEFAULT_THRESHOLD",
    "DEFAULT_THRESHOLD_NORMALISED",
    "Embedder",
    "Ingress",
    "Searcher",
    "ServeArgs",
    "ServeConfig",
    "ServeError",
    "app_builder",
    "build_app",
    "decode_status",
    "serve_forever",
    "shard_groups",
    "token_digest",
]
