"""The embedding-run store: where a bulk embedding job keeps its input listing, its descriptors,
its failures and the proof that each part is complete.

Layout of `<out>/` (local path or `s3://` URI; see DESIGN.md, "Embedding run"):

    manifest/manifest.parquet   id (int64, assigned here), uri, size, version (ETag or mtime)
    manifest/_manifest.json     count, source, sha256 of the listing (written after the Parquet)
    shards/part-NNNNN.parquet   id, uri, embedding fixed_size_list<float32|float16>[dim]
    errors/part-NNNNN.parquet   id, uri, error
    local/part-NNNNN.parquet    `rdcd embed --local-features` only: one row per embedded image,
                                `rdcd.local.LOCAL_SCHEMA` (keypoints, RootSIFT descriptors)
    _commits/part-NNNNN.json    written last: a shard without a commit does not exist
    run.json                    config, model, counts, timings

Part `k` holds ids `[k * shard_size, (k + 1) * shard_size)`, so part names depend only on the
manifest and the shard size, never on scheduling: a re-run finds exactly the same parts, skips the
committed ones and overwrites whatever an interrupted run left uncommitted. Every Parquet file
carries the model fingerprint in its key-value metadata, and the store refuses to mix two models.
Readers (the FAISS index builder, evaluation) go through `read_embeddings`, which only sees
committed parts.

Local features follow the same protocol: a run that asks for them writes each part's local file
before its commit, and the commit records its size, sha256, rows and the extraction settings
(`local_config`). Whether a run has local features is fixed by its first commit, like the model:
a resume with the other setting is refused (`check_local`), so a run never holds parts with and
parts without them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rdcd import io as rio

log = logging.getLogger(__name__)

FORMAT = "rdcd-embeddings-v1"
MANIFEST_DIR, SHARDS_DIR, ERRORS_DIR, COMMITS_DIR = "manifest", "shards", "errors", "_commits"
LOCAL_DIR = "local"
MANIFEST_FILE, MANIFEST_DONE, RUN_FILE = "manifest.parquet", "_manifest.json", "run.json"
META_FINGERPRINT, META_DIM, META_MODEL = "rdcd.fingerprint", "rdcd.dim", "rdcd.model"
META_PRECISION, META_PART = "rdcd.precision", "rdcd.part"
PRECISIONS = {"fp32": pa.float32(), "fp16": pa.float16()}


class StoreError(ValueError):
    """An embedding run that cannot be read or appended to; the message says why and what to do."""


@dataclass(frozen=True)
class RunIdentity:
    """What must be equal for two invocations to write into the same run: mixing models, sizes or
    storage precisions would silently make the descriptors incomparable, and another shard size
    would renumber the parts."""

    fingerprint: str
    model: str  # human-readable name, e.g. "sscd-onnx" or "student:efficientnet_b0/128"
    dim: int
    image_size: int
    precision: str
    shard_size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Manifest:
    """The input listing, in id order: `ids[i] == i`."""

    uris: list[str]
    sizes: np.ndarray  # int64; -1 where unknown (a manifest file of URIs)
    versions: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.uris)


class Embeddings(NamedTuple):
    """Committed descriptors of a run, sorted by id (unpacks as `ids, uris, embeddings, meta`)."""

    ids: np.ndarray  # int64 (N,)
    uris: list[str]
    embeddings: np.ndarray  # float32 (N, dim), L2-normalised rows
    meta: dict[str, Any]


@dataclass(frozen=True)
class PartFiles:
    """One part, encoded and ready to be written."""

    part: int
    shard: bytes
    errors: bytes
    commit: dict[str, Any]
    local: bytes | None = None  # the local-features file, when the run extracts them


def part_name(part: int) -> str:
    return f"part-{part:05d}"


def part_uris(out: str, part: int) -> tuple[str, str, str]:
    """(shard, errors, commit) URIs of `part` under `out`."""
    name = part_name(part)
    return (
        rio.join(out, SHARDS_DIR, f"{name}.parquet"),
        rio.join(out, ERRORS_DIR, f"{name}.parquet"),
        rio.join(out, COMMITS_DIR, f"{name}.json"),
    )


def local_uri(out: str, part: int) -> str:
    """The local-features file of `part` under `out` (only runs with local features have one)."""
    return rio.join(out, LOCAL_DIR, f"{part_name(part)}.parquet")


def part_range(part: int, shard_size: int, total: int) -> tuple[int, int]:
    """The ids `[start, stop)` of `part`."""
    start = part * shard_size
    return start, min(total, start + shard_size)


def num_parts(total: int, shard_size: int) -> int:
    return (total + shard_size - 1) // shard_size


# ---- manifest -------------------------------------------------------------------------------


def listing_digest(uris: Sequence[str], sizes: Sequence[int], versions: Sequence[str]) -> str:
    """sha256 of the listing: equal digests mean the same files, in the same order, unchanged."""
    h = hashlib.sha256()
    for u, s, v in zip(uris, sizes, versions, strict=True):
        h.update(f"{u}\t{int(s)}\t{v}\n".encode())
    return h.hexdigest()


def write_manifest(out: str, manifest: Manifest) -> None:
    """Write the listing, then `_manifest.json`: a manifest without it was cut short."""
    table = pa.table(
        {
            "id": pa.array(np.arange(len(manifest), dtype=np.int64)),
            "uri": pa.array(manifest.uris, pa.string()),
            "size": pa.array(np.asarray(manifest.sizes, dtype=np.int64)),
            "version": pa.array(manifest.versions, pa.string()),
        }
    )
    rio.write_bytes(rio.join(out, MANIFEST_DIR, MANIFEST_FILE), _parquet_bytes(table))
    done = {
        "format": FORMAT,
        "count": len(manifest),
        "source": manifest.source,
        "sha256": listing_digest(manifest.uris, manifest.sizes, manifest.versions),
        "written_at": _now(),
    }
    rio.write_text(rio.join(out, MANIFEST_DIR, MANIFEST_DONE), json.dumps(done, indent=2))


def read_manifest(out: str) -> Manifest | None:
    """The run's manifest, or None when there is no complete one."""
    done_uri = rio.join(out, MANIFEST_DIR, MANIFEST_DONE)
    if not rio.exists(done_uri):
        return None
    done = json.loads(rio.read_text(done_uri))
    table = pq.read_table(io.BytesIO(rio.read_bytes(rio.join(out, MANIFEST_DIR, MANIFEST_FILE))))
    ids = table.column("id").to_numpy()
    if len(ids) != done["count"] or not np.array_equal(ids, np.arange(len(ids))):
        raise StoreError(f"{out}: manifest/ is damaged (ids are not 0..{done['count'] - 1})")
    return Manifest(
        uris=table.column("uri").to_pylist(),
        sizes=table.column("size").to_numpy(),
        versions=table.column("version").to_pylist(),
        source=done.get("source", ""),
    )


def check_same_listing(existing: Manifest, listed: Manifest, out: str) -> None:
    """Refuse to go on when the input changed since the manifest was written: ids are assigned by
    position, so a new or removed file would shift every id after it."""
    a = listing_digest(existing.uris, existing.sizes, existing.versions)
    b = listing_digest(listed.uris, listed.sizes, listed.versions)
    if a == b:
        return
    old = dict(zip(existing.uris, zip(existing.sizes.tolist(), existing.versions, strict=True),
                   strict=True))  # fmt: skip
    new = dict(zip(listed.uris, zip(listed.sizes.tolist(), listed.versions, strict=True),
                   strict=True))  # fmt: skip
    added = len(new.keys() - old.keys())
    removed = len(old.keys() - new.keys())
    changed = sum(1 for u in old.keys() & new.keys() if old[u] != new[u])
    raise StoreError(
        f"the input {listed.source!r} changed since {out} was started ({added} added, {removed} "
        f"removed, {changed} modified of {len(existing)}): ids would no longer be stable. Embed "
        "into a new --out, delete the old one to start over, or pass --reuse-manifest to finish "
        "the original listing"
    )


# ---- parts ----------------------------------------------------------------------------------


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    # Descriptors and unique URIs do not compress with dictionaries; one row group per part.
    pq.write_table(table, buf, use_dictionary=False, compression="snappy",
                   row_group_size=max(1, table.num_rows))  # fmt: skip
    return buf.getvalue()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def encode_part(
    part: int,
    identity: RunIdentity,
    ids: np.ndarray,
    uris: Sequence[str],
    embeddings: np.ndarray,
    errors: Sequence[str],
    local: Sequence[Any] | None = None,
    local_config: dict[str, Any] | None = None,
) -> PartFiles:
    """Encode one complete part. Row `i` is embedded when `errors[i]` is empty, else it goes to the
    errors file with its reason. Rows are sorted by id, so the bytes depend only on the inputs.

    `local` (with `local_config`, the `rdcd.local.LocalConfig` they were extracted with): the
    `LocalFeatures` of every row (ignored where the row failed), written as the part's local
    file, one row per embedded image."""
    ids = np.asarray(ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    uris = [uris[i] for i in order]
    errors = [errors[i] for i in order]
    if local is not None:
        local = [local[i] for i in order]
    embeddings = np.asarray(embeddings)[order]
    if len(np.unique(ids)) != len(ids):
        raise ValueError(f"part {part}: duplicate ids")
    ok = np.array([not e for e in errors], dtype=bool)
    value_type = PRECISIONS[identity.precision]
    vectors = np.ascontiguousarray(embeddings[ok], dtype=value_type.to_pandas_dtype())
    if vectors.shape[1:] != (identity.dim,):
        raise ValueError(f"part {part}: embeddings of shape {vectors.shape}, dim {identity.dim}")
    meta = {
        META_FINGERPRINT: identity.fingerprint,
        META_DIM: str(identity.dim),
        META_MODEL: identity.model,
        META_PRECISION: identity.precision,
        META_PART: str(part),
    }
    shard = pa.table(
        {
            "id": pa.array(ids[ok]),
            "uri": pa.array([u for u, g in zip(uris, ok, strict=True) if g], pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(vectors.reshape(-1), value_type), identity.dim
            ),
        }
    ).replace_schema_metadata(meta)
    bad = ~ok
    errs = pa.table(
        {
            "id": pa.array(ids[bad]),
            "uri": pa.array([u for u, b in zip(uris, bad, strict=True) if b], pa.string()),
            "error": pa.array([e for e in errors if e], pa.string()),
        }
    ).replace_schema_metadata(meta)
    shard_bytes, err_bytes = _parquet_bytes(shard), _parquet_bytes(errs)
    name = part_name(part)
    commit = {
        "format": FORMAT,
        "part": part,
        "first_id": int(ids[0]) if len(ids) else None,
        "last_id": int(ids[-1]) if len(ids) else None,
        "rows": int(len(ids)),
        "embedded": int(ok.sum()),
        "errors": int(bad.sum()),
        "shard": posixpath.join(SHARDS_DIR, f"{name}.parquet"),
        "shard_bytes": len(shard_bytes),
        "shard_sha256": hashlib.sha256(shard_bytes).hexdigest(),
        "errors_file": posixpath.join(ERRORS_DIR, f"{name}.parquet"),
        "errors_bytes": len(err_bytes),
        "errors_sha256": hashlib.sha256(err_bytes).hexdigest(),
        **identity.to_dict(),
    }
    local_bytes = None
    if local is not None:
        from rdcd.local import LocalConfig, parquet_bytes, to_table

        kept = [f for f, g in zip(local, ok, strict=True) if g]
        lcfg = LocalConfig.from_dict(local_config or {})
        table = to_table(ids[ok].tolist(), kept, lcfg)
        theirs = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        table = table.replace_schema_metadata({**theirs, **meta})
        local_bytes = parquet_bytes(table)
        commit.update(
            local=posixpath.join(LOCAL_DIR, f"{name}.parquet"),
            local_bytes=len(local_bytes),
            local_sha256=hashlib.sha256(local_bytes).hexdigest(),
            local_keypoints=int(sum(len(f.keypoints) for f in kept)),
            local_config=lcfg.to_dict(),
        )
    return PartFiles(part, shard_bytes, err_bytes, commit, local_bytes)


def write_part(out: str, files: PartFiles) -> None:
    """Shard, errors, local features, then the commit: a reader never sees a part that is not
    whole."""
    shard_uri, errors_uri, commit_uri = part_uris(out, files.part)
    rio.write_bytes(shard_uri, files.shard)
    rio.write_bytes(errors_uri, files.errors)
    if files.local is not None:
        rio.write_bytes(local_uri(out, files.part), files.local)
    rio.write_text(commit_uri, json.dumps({**files.commit, "written_at": _now()}, indent=2))


def committed_parts(out: str, threads: int = 16) -> dict[int, dict[str, Any]]:
    """Every commit record under `out`, by part number (read in parallel: S3 latency adds up)."""
    root = rio.join(out, COMMITS_DIR)
    if not rio.exists(root):
        return {}
    names = [
        f.uri
        for f in rio.list_files(root, (".json",), recursive=False)
        if posixpath.basename(f.uri).startswith("part-")
    ]
    if not names:
        return {}
    with ThreadPoolExecutor(max_workers=min(threads, len(names))) as pool:
        records = list(pool.map(lambda u: json.loads(rio.read_text(u)), names))
    return {int(r["part"]): r for r in records}


def read_run(out: str) -> dict[str, Any] | None:
    uri = rio.join(out, RUN_FILE)
    return json.loads(rio.read_text(uri)) if rio.exists(uri) else None


def write_run(out: str, run: dict[str, Any]) -> None:
    rio.write_text(rio.join(out, RUN_FILE), json.dumps(run, indent=2, default=str))


def check_identity(
    out: str, identity: RunIdentity, commits: dict[int, dict[str, Any]] | None = None
) -> None:
    """Refuse to append to `out` when its run or any commit names another model, dimension,
    precision, image size or shard size. Nothing is deleted: the user decides."""
    commits = committed_parts(out) if commits is None else commits
    theirs: list[tuple[str, dict[str, Any]]] = []
    run = read_run(out)
    if run is not None and run.get("format") != FORMAT:
        raise StoreError(
            f"refusing to write into {out}: its run.json is not an embedding run's (a training "
            "output?); use another --out"
        )
    if run and run.get("identity"):
        theirs.append((rio.join(out, RUN_FILE), run["identity"]))
    theirs += [(rio.join(out, COMMITS_DIR, f"{part_name(p)}.json"), c) for p, c in commits.items()]
    ours = identity.to_dict()
    for where, record in theirs:
        if record.get("fingerprint") != identity.fingerprint:
            raise StoreError(
                f"refusing to append to {out}: it holds embeddings of model "
                f"{record.get('model')!r} (fingerprint {str(record.get('fingerprint'))[:12]}, "
                f"per {where}), not of {identity.model!r} (fingerprint "
                f"{identity.fingerprint[:12]}). Use another --out, or delete {out} to re-embed "
                "everything with the new model"
            )
        for key in ("dim", "image_size", "precision", "shard_size"):
            if key in record and record[key] != ours[key]:
                raise StoreError(
                    f"refusing to append to {out}: it was written with {key}={record[key]!r} "
                    f"(per {where}), this run asks for {key}={ours[key]!r}. Re-run with the "
                    f"original setting, or use another --out"
                )


def extraction_settings(local_config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The part of a LocalConfig dict that shapes the stored features (working size, keypoint
    cap): a resume may change the verification settings, never these."""
    if local_config is None:
        return None
    from rdcd.local import LocalConfig

    return LocalConfig.from_dict(local_config).extraction()


def check_local(
    out: str, commits: dict[int, dict[str, Any]], local_config: dict[str, Any] | None
) -> None:
    """Refuse to resume `out` with local features when its committed parts have none, or without
    them (or with other extraction settings) when they have: every part of a run has the same
    kind of files, so the index and the query paths never find some references unverifiable.

    Adding local features to a finished run is not done in place: embed again into a new --out
    with `--local-features` (descriptors are recomputed; the index is rebuilt from that run)."""
    for part, commit in sorted(commits.items()):
        theirs = commit.get("local_config") if commit.get("local") else None
        where = rio.join(out, COMMITS_DIR, f"{part_name(part)}.json")
        if local_config is not None and theirs is None:
            raise StoreError(
                f"refusing to resume {out} with --local-features: its committed parts have no "
                f"local features (per {where}). Run without --local-features to finish it, or "
                "embed into a new --out with --local-features from the start"
            )
        if local_config is None and theirs is not None:
            raise StoreError(
                f"refusing to resume {out} without --local-features: its committed parts have "
                f"local features (per {where}); re-run with --local-features"
            )
        mine, stored = extraction_settings(local_config), extraction_settings(theirs)
        if mine is not None and stored is not None and stored != mine:
            changed = sorted(k for k in set(stored) | set(mine)
                             if stored.get(k) != mine.get(k))  # fmt: skip
            raise StoreError(
                f"refusing to resume {out}: its local features were extracted with other "
                f"settings ({', '.join(changed)} differ, per {where}). Re-run with the original "
                "settings, or use another --out"
            )


def remove_stale_temporaries(out: str) -> int:
    """Delete the `*.tmp-*` files a killed local writer left behind (S3 writes leave none)."""
    if rio.is_s3(out):
        return 0
    import glob
    import os

    removed = 0
    for sub in (SHARDS_DIR, ERRORS_DIR, COMMITS_DIR, MANIFEST_DIR, LOCAL_DIR):
        for path in glob.glob(os.path.join(rio.filesystem(out)[1], sub, "*.tmp-*")):
            os.remove(path)
            removed += 1
    return removed


# ---- readers --------------------------------------------------------------------------------


# The commit keys that record each committed file's size and digest.
_DIGEST_KEYS = {
    "shard": ("shard_bytes", "shard_sha256"),
    "errors_file": ("errors_bytes", "errors_sha256"),
    "local": ("local_bytes", "local_sha256"),
}


def _damaged(out: str, commit: dict[str, Any], uri: str, what: str) -> StoreError:
    """One line naming the part file, why it is refused and how to get it back: the index builder
    and evaluation must not go on with descriptors other than the ones that were committed."""
    commit_uri = rio.join(out, COMMITS_DIR, f"{part_name(int(commit['part']))}.json")
    return StoreError(
        f"{uri}: {what}; refusing to read it. To re-embed that part, delete its commit record "
        f"{commit_uri} and re-run `rdcd embed` with the same --out"
    )


def _read_table(out: str, commit: dict[str, Any], key: str) -> pa.Table:
    """Read the file `commit[key]` once, check its size and sha256 against the commit, then parse.

    Row counts and metadata alone miss an edited file with the same number of rows (id 50 holding
    id 51's vector would be indexed silently), so the bytes themselves are checked. Any parse
    failure becomes one `StoreError` naming the file, not a pyarrow traceback without a path."""
    uri = rio.join(out, *commit[key].split("/"))
    try:
        data = rio.read_bytes(uri)
    except rio.StorageError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            raise _damaged(out, commit, uri, "committed, but the file is missing") from exc
        raise  # S3 access, credentials: not damage, and the message already says what to fix
    size_key, sha_key = _DIGEST_KEYS[key]
    if size_key in commit and len(data) != int(commit[size_key]):
        what = f"{len(data)} bytes, its commit says {int(commit[size_key])}"
        raise _damaged(out, commit, uri, f"{what} (truncated or modified after it was committed)")
    if sha_key in commit and hashlib.sha256(data).hexdigest() != commit[sha_key]:
        what = "its sha256 differs from its commit's (modified after it was committed)"
        raise _damaged(out, commit, uri, what)
    if sha_key not in commit:
        log.debug("%s: its commit records no sha256; checking rows and metadata only", uri)
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for damaged files
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        what = f"not a readable Parquet file ({type(exc).__name__}: {reason})"
        raise _damaged(out, commit, uri, what) from exc
    expected = commit["errors"] if key == "errors_file" else commit["embedded"]
    if table.num_rows != expected:
        what = f"{table.num_rows} rows, its commit says {expected} (modified after its commit)"
        raise _damaged(out, commit, uri, what)
    return table


def read_part(out: str, commit: dict[str, Any]) -> tuple[np.ndarray, list[str], np.ndarray]:
    """`(ids, uris, float32 embeddings)` of one committed part, checked against its commit (size,
    sha256, rows, fingerprint): a part edited or damaged after its commit raises `StoreError`.

    The index builder reads parts one by one in parallel tasks, so no process has to hold a
    whole run."""
    table = _read_table(out, commit, "shard")
    found = (table.schema.metadata or {}).get(META_FINGERPRINT.encode(), b"").decode()
    if found != commit["fingerprint"]:
        uri = rio.join(out, *commit["shard"].split("/"))
        raise _damaged(out, commit, uri, "it holds another model's fingerprint")
    dim = int(commit["dim"])
    flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return (
        table.column("id").to_numpy().astype(np.int64),
        table.column("uri").to_pylist(),
        flat.astype(np.float32).reshape(-1, dim),
    )


def has_local(commit: dict[str, Any]) -> bool:
    """Whether a committed part has local features."""
    return bool(commit.get("local"))


def read_local_bytes(out: str, commit: dict[str, Any]) -> bytes:
    """The local-features file of a committed part, checked against its commit (size, sha256):
    what the index builder copies into a version."""
    if not has_local(commit):
        raise StoreError(
            f"{rio.join(out, COMMITS_DIR, part_name(int(commit['part'])) + '.json')}: part "
            f"{int(commit['part'])} of {out} has no local features; embed the references with "
            "`rdcd embed --local-features` into a new --out"
        )
    uri = rio.join(out, *commit["local"].split("/"))
    try:
        data = rio.read_bytes(uri)
    except rio.StorageError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            raise _damaged(out, commit, uri, "committed, but the file is missing") from exc
        raise
    if len(data) != int(commit["local_bytes"]):
        what = f"{len(data)} bytes, its commit says {int(commit['local_bytes'])}"
        raise _damaged(out, commit, uri, f"{what} (truncated or modified after it was committed)")
    if hashlib.sha256(data).hexdigest() != commit["local_sha256"]:
        what = "its sha256 differs from its commit's (modified after it was committed)"
        raise _damaged(out, commit, uri, what)
    return data


def read_local_part(out: str, commit: dict[str, Any]) -> dict[str, Any]:
    """`{id: LocalFeatures}` of one committed part, checked against its commit (size, sha256,
    rows) like the shard: a damaged or edited local file is one `StoreError` naming it."""
    from rdcd.local import from_table

    if not has_local(commit):
        read_local_bytes(out, commit)  # raises the StoreError that says what to do
    table = _read_table(out, commit, "local")
    return from_table(table)


def run_identity(out: str, commits: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The identity (fingerprint, model, dim, ...) and counts of the committed parts of a run."""
    commits = committed_parts(out) if commits is None else commits
    if not commits:
        raise StoreError(f"{out}: no committed embedding parts (is this an `rdcd embed` output?)")
    fingerprints = {c["fingerprint"] for c in commits.values()}
    if len(fingerprints) != 1:
        raise StoreError(f"{out}: parts from {len(fingerprints)} different models; refusing")
    first = commits[min(commits)]
    meta = {
        key: first[key]
        for key in ("fingerprint", "model", "dim", "image_size", "precision", "shard_size")
    }
    meta.update(
        parts=len(commits),
        embedded=int(sum(c["embedded"] for c in commits.values())),
        errors=int(sum(c["errors"] for c in commits.values())),
        out=out,
        local=all(has_local(c) for c in commits.values()),
        local_config=first.get("local_config") if has_local(first) else None,
    )
    return meta


def write_embeddings(
    out: str,
    uris: Sequence[str],
    embeddings: np.ndarray,
    identity: RunIdentity,
    source: str = "arrays",
) -> dict[str, Any]:
    """Write descriptors computed elsewhere as a complete embedding run (ids 0..n-1 in the order
    given). Benchmarks and tests use it to build indexes of synthetic or pre-computed vectors with
    exactly the files `rdcd embed` writes."""
    n = len(uris)
    if len(embeddings) != n:
        raise ValueError(f"{n} URIs but {len(embeddings)} embeddings")
    manifest = Manifest(list(uris), np.full(n, -1, np.int64), [""] * n, source)
    write_manifest(out, manifest)
    for part in range(num_parts(n, identity.shard_size)):
        start, stop = part_range(part, identity.shard_size, n)
        ids = np.arange(start, stop, dtype=np.int64)
        files = encode_part(part, identity, ids, manifest.uris[start:stop],
                            embeddings[start:stop], [""] * (stop - start))  # fmt: skip
        write_part(out, files)
    run = {
        "format": FORMAT,
        "status": "complete",
        "identity": identity.to_dict(),
        "model": identity.model,
        "fingerprint": identity.fingerprint,
        "input": {"source": source, "images": n, "parts": num_parts(n, identity.shard_size)},
        "counts": {"images": n, "embedded": n, "errors": 0},
    }
    write_run(out, run)
    return run


def read_embeddings(out: str, *, threads: int = 8) -> Embeddings:
    """All committed descriptors of the run at `out`, as float32 sorted by id.

    Only parts with a commit are read, so this is safe to call while a job is still writing.
    `meta` holds the run identity (fingerprint, model, dim, precision...) and counts.
    """
    commits = committed_parts(out)
    meta = run_identity(out, commits)
    ordered = [commits[p] for p in sorted(commits)]
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(ordered)))) as pool:
        parts = list(pool.map(lambda c: read_part(out, c), ordered))
    ids = np.concatenate([p[0] for p in parts])
    uris = [u for p in parts for u in p[1]]
    emb = np.concatenate([p[2] for p in parts])
    order = np.argsort(ids, kind="stable")
    return Embeddings(ids[order], [uris[i] for i in order], emb[order], meta)


def read_errors(out: str) -> list[tuple[int, str, str]]:
    """`(id, uri, reason)` of every committed image that was not embedded, sorted by id."""
    rows: list[tuple[int, str, str]] = []
    for commit in committed_parts(out).values():
        table = _read_table(out, commit, "errors_file")
        rows += zip(
            table.column("id").to_pylist(),
            table.column("uri").to_pylist(),
            table.column("error").to_pylist(),
            strict=True,
        )
    return sorted(rows)
