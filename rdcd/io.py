"""One way to read, write and list files, whether they live on local disk or in S3.

Every job takes URIs (`s3://bucket/prefix` or a local path), so the same command runs on a laptop
and on a cluster. S3 endpoint and credentials come from the standard AWS environment variables
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, or an
instance profile), so MinIO, R2 and moto work without code changes.
"""

from __future__ import annotations

import logging
import os
import posixpath
import stat
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

log = logging.getLogger(__name__)

_AWS_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_S3_ANONYMOUS",
)
AWS_ENV = _AWS_ENV  # the variables that configure S3 access (jobs forward them to Ray workers)
_S3_CACHE: dict[tuple, fsspec.AbstractFileSystem] = {}
_S3_LOCK = threading.Lock()

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")


class StorageError(RuntimeError):
    """A URI could not be read, written or listed; the message says which and why."""


@dataclass(frozen=True)
class FileInfo:
    """One listed file: enough to detect that it changed between two runs."""

    uri: str
    size: int
    version: str  # S3 ETag, or the local modification time in nanoseconds


def is_s3(uri: str) -> bool:
    return str(uri).startswith(("s3://", "s3a://"))


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or S3 URI."""
    if is_s3(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return str(Path(base, *parts))


def s3_options() -> dict[str, Any]:
    """s3fs options from the AWS environment; credentials are left to botocore's chain."""
    opts: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client_kwargs: dict[str, Any] = {}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        client_kwargs["region_name"] = region
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    if os.environ.get("AWS_S3_ANONYMOUS") == "1":
        opts["anon"] = True
    return opts


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the filesystem for `uri` and the path inside it.

    S3 clients are costly to create (a session and a connection pool each), so one is kept per
    process and AWS environment: a change of endpoint or credentials gets a new client.
    """
    if is_s3(uri):
        path = uri.split("://", 1)[1]
        key = (os.getpid(), tuple(os.environ.get(k) for k in _AWS_ENV))
        with _S3_LOCK:
            fs = _S3_CACHE.get(key)
            if fs is None:
                import s3fs

                fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_options())
                _S3_CACHE[key] = fs
        return fs, path
    return fsspec.filesystem("file"), str(Path(uri).expanduser().absolute())


def arrow_filesystem(uri: str):  # -> tuple[pyarrow.fs.FileSystem, str]
    """The pyarrow filesystem for `uri`, for Ray Data and Parquet readers that want one."""
    import pyarrow.fs as pafs

    if not is_s3(uri):
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute())
    kwargs: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs["endpoint_override"] = host or scheme
        kwargs["scheme"] = scheme if host else "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    # Explicit keys travel with the filesystem when Ray pickles it to workers (Ray Train uploads
    # checkpoints from there), where the driver's environment is not set.
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ["AWS_SECRET_ACCESS_KEY"]
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(**kwargs), uri.split("://", 1)[1]


def _local_path(uri: str) -> str:
    return str(Path(uri).expanduser().absolute())


def _explain(uri: str, action: str, exc: BaseException) -> StorageError:
    text = f"{type(exc).__name__}: {exc}"
    hint = ""
    lowered = text.lower()
    if "credential" in lowered or "nocredentialserror" in lowered:
        hint = " (no AWS credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)"
    elif "nosuchbucket" in lowered or "bucket does not exist" in lowered:
        hint = " (the bucket does not exist)"
    elif "accessdenied" in lowered or "forbidden" in lowered or "invalidaccesskeyid" in lowered:
        hint = " (access denied: check the credentials and the bucket policy)"
    elif isinstance(exc, OSError) and not is_s3(uri) and os.path.islink(_local_path(uri)):
        # Listings include broken links on purpose (they must end in errors/, not vanish), so
        # say what is wrong: "no such file" about a file the user can see in `ls` misleads.
        hint = f" (a broken symbolic link to {os.readlink(_local_path(uri))!r})"
    elif isinstance(exc, FileNotFoundError):
        hint = " (no such file or prefix)"
    return StorageError(f"cannot {action} {uri!r}{hint}: {text}")


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except Exception as exc:  # noqa: BLE001 - every backend error becomes one typed error
        raise _explain(uri, "read", exc) from exc


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file. Local writes go through a temporary name and a rename, so a reader
    never sees half a file; S3 PUTs are atomic already."""
    fs, path = filesystem(uri)
    try:
        if is_s3(uri):
            with fs.open(path, "wb") as f:
                f.write(data)
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except Exception as exc:  # noqa: BLE001
        raise _explain(uri, "write", exc) from exc


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    try:
        fs.invalidate_cache(path)  # other processes may have written since the last look
        return bool(fs.exists(path))
    except Exception as exc:  # noqa: BLE001
        raise _explain(uri, "check", exc) from exc


def canonical(uri: str) -> str:
    """The one spelling of a location: an absolute, normalised local path, or `s3://bucket/key`
    without a trailing slash. Anything that compares or lists locations (index versions, a root
    named twice) goes through it, so `idx/r1`, `./idx/r1/` and `/abs/idx/r1` are one root."""
    text = str(uri)
    if is_s3(text):
        path = posixpath.normpath("/" + text.split("://", 1)[1]).lstrip("/")
        return "s3://" + path
    return os.path.normpath(os.path.abspath(os.path.expanduser(text)))


def list_names(uri: str) -> list[str]:
    """The names (not paths) of the entries directly under `uri`, files and folders alike; an
    empty list when it does not exist. One listing call, not a walk of everything below."""
    fs, path = filesystem(uri)
    try:
        fs.invalidate_cache(path)
        if not fs.exists(path):
            return []
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    except Exception as exc:  # noqa: BLE001
        raise _explain(uri, "list", exc) from exc
    return sorted(posixpath.basename(str(n).rstrip("/")) for n in names)


def create_exclusive(uri: str, data: bytes) -> bool:
    """Write `data` to `uri` only if nothing is there yet; False when something already is.

    This is how two writers agree on who owns a name without a lock server: `O_EXCL` on local
    disk, a conditional PUT (`If-None-Match: *`) on S3, both decided by the storage itself."""
    fs, path = filesystem(uri)
    try:
        if is_s3(uri):
            bucket, _, key = path.partition("/")
            try:
                fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            except FileExistsError:
                return False
            fs.invalidate_cache(path)
            return True
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True
    except Exception as exc:  # noqa: BLE001
        raise _explain(uri, "create", exc) from exc


@dataclass(frozen=True)
class Versioned:
    """A small file's content and the token a conditional replace compares against (the S3
    ETag, or the sha256 of the local file's bytes)."""

    data: bytes | None  # None: no such file
    token: str | None


def _local_token(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def read_versioned(uri: str) -> Versioned:
    """The content of `uri` and its version token, or `Versioned(None, None)` when absent."""
    fs, path = filesystem(uri)
    try:
        if is_s3(uri):
            # The ETag first, the bytes second: if the object changes in between, the token is
            # the older one and a conditional replace fails safe (it is retried on fresh data).
            fs.invalidate_cache(path)
            try:
                etag = str(fs.info(path)["ETag"])
                data = fs.cat_file(path)
            except FileNotFoundError:
                return Versioned(None, None)
            return Versioned(data, etag)
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            return Versioned(None, None)
        return Versioned(data, _local_token(data))
    except Exception as exc:  # noqa: BLE001
        raise _explain(uri, "read", exc) from exc


def replace_if(uri: str, data: bytes, token: str | None) -> bool:
    """Compare-and-swap: write `data` to `uri` only if the file is still the version `token`
    (from `read_versioned`; None = only if it does not exist). False when someone else wrote it
    first. S3 decides with `If-Match`/`If-None-Match`; local disk under an exclusive `flock` on
    a hidden lock file beside it (then the usual temporary file and rename)."""
    fs, path = filesystem(uri)
    try:
        if is_s3(uri):
            bucket, _, key = path.partition("/")
            cond = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token}
            try:
                fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **cond)
            except (FileExistsError, FileNotFoundError):
                return False  # 412 (changed) or 404 (removed since it was read)
            except OSError as exc:
                if "condition" in str(exc).lower() or "conflict" in str(exc).lower():
                    return False
                raise
            fs.invalidate_cache(path)
            return True
        import fcntl

        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = target.parent / f".{target.name}.lock"
        with open(lock, "a+b") as lf:
            fcntl.flock(lf.fileno(), fcntl.LOCK_EX)
            try:
                try:
                    now: str | None = _local_token(target.read_bytes())
                except FileNotFoundError:
                    now = None
                if now != token:
                    return False
                tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
                return True
            finally:
                fcntl.flock(lf.fileno(), fcntl.LOCK_UN)
    except Exception as exc:  # noqa: BLE001
        raise _explain(uri, "replace", exc) from exc


def makedirs(uri: str) -> None:
    """Create a local directory; a no-op on S3, where prefixes need no creation."""
    if not is_s3(uri):
        Path(uri).expanduser().mkdir(parents=True, exist_ok=True)


def _to_uri(uri: str, path: str) -> str:
    if is_s3(uri):
        return "s3://" + path.lstrip("/")
    return path


def _local_version(st: os.stat_result) -> str:
    # The float mtime, as the fsspec listing gave it: manifests written before must still match.
    return str(int(float(st.st_mtime) * 1e9))


def _walk_local(root: str, recursive: bool) -> list[FileInfo]:
    """The files under the local folder `root`, following symbolic links to files and folders.

    A folder reached twice (a link to a folder that is also listed, a link loop) is listed once,
    under the first path found to it, real paths before links: a loop cannot recurse forever and
    no image gets two ids. Paths stay under `root` (the link's path, not its target), so a URI
    in a manifest is what the user listed. A broken link (or one that loops on itself) is listed
    with size 0 rather than dropped: reading it then fails and the embed job records the reason
    in errors/, so rows in shards + errors still add up to what the folder shows."""
    seen: set[tuple[int, int]] = set()
    real: list[str] = [root]  # folders reached without a link: walked first
    linked: list[str] = []  # folders reached through a link: walked after every real one
    out: list[FileInfo] = []
    broken = 0
    while real or linked:
        folder = real.pop() if real else linked.pop()
        # An unreadable folder raises (list_files names it): skipping it would drop its images
        # from the manifest without a trace.
        st = os.stat(folder)
        key = (st.st_dev, st.st_ino)
        if key in seen:
            log.debug("%s: already listed through another path; skipped", folder)
            continue
        seen.add(key)
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name, reverse=True)  # popped in name order
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                st = entry.stat(follow_symlinks=True)
            except OSError as exc:
                if entry.is_symlink():  # broken, or a loop of links: listed, to fail with a reason
                    log.debug("%s: broken symbolic link (%s)", entry.path, exc.strerror or exc)
                    link = entry.stat(follow_symlinks=False)
                    out.append(FileInfo(entry.path, 0, _local_version(link)))
                    broken += 1
                else:
                    log.warning("cannot stat %s (%s); not listed", entry.path, exc)
                continue
            if stat.S_ISDIR(st.st_mode):
                if recursive:
                    (linked if entry.is_symlink() else real).append(entry.path)
            elif stat.S_ISREG(st.st_mode):
                out.append(FileInfo(entry.path, int(st.st_size), _local_version(st)))
    if broken:
        log.warning("%s: %d broken symbolic link(s), listed with size 0 (reading them fails)",
                    root, broken)  # fmt: skip
    return out


def list_files(
    uri: str, suffixes: tuple[str, ...] | None = None, recursive: bool = True
) -> list[FileInfo]:
    """Every file under `uri` (recursively unless told not to), sorted by URI, with size and
    version.

    `uri` may also name a single file. Hidden files and directories (a leading dot) are skipped.
    `suffixes` filters by lower-cased extension, e.g. `IMAGE_SUFFIXES`. On local disk symbolic
    links are followed (see `_walk_local`): fsspec's walk silently drops them, so a folder of
    linked images would be embedded as if it were empty.
    """
    fs, path = filesystem(uri)
    wanted = tuple(s.lower() for s in suffixes) if suffixes else None
    if not is_s3(uri):
        try:
            if os.path.isdir(path):
                files = _walk_local(path, recursive)
            elif os.path.isfile(path):
                st = os.stat(path)
                files = [FileInfo(path, int(st.st_size), _local_version(st))]
            else:
                raise FileNotFoundError(path)
        except Exception as exc:  # noqa: BLE001
            raise _explain(uri, "list", exc) from exc
        out = [f for f in files if not wanted or f.uri.lower().endswith(wanted)]
        out.sort(key=lambda f: f.uri)
        log.debug("listed %d files under %s", len(out), uri)
        return out
    try:
        fs.invalidate_cache(path)  # other processes may have written since the last listing
        if fs.isfile(path):
            entries = {path: fs.info(path)}
        elif fs.isdir(path):
            if recursive:
                entries = fs.find(path, detail=True)
            else:
                entries = {e["name"]: e for e in fs.ls(path, detail=True)}
        else:
            raise FileNotFoundError(path)
    except Exception as exc:  # noqa: BLE001
        raise _explain(uri, "list", exc) from exc
    root = path.rstrip("/")
    out: list[FileInfo] = []
    for name, info in entries.items():
        if info.get("type", "file") != "file":
            continue
        rel = name[len(root) :].lstrip("/") if name.startswith(root) else name
        if any(part.startswith(".") for part in rel.split("/") if part):
            continue
        if wanted and not name.lower().endswith(wanted):
            continue
        version = info.get("ETag") or info.get("etag")
        if version:
            version = str(version).strip('"')
        else:
            mtime = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
            if hasattr(mtime, "timestamp"):
                mtime = mtime.timestamp()
            version = str(int(float(mtime) * 1e9))
        out.append(
            FileInfo(uri=_to_uri(uri, name), size=int(info.get("size") or 0), version=version)
        )
    out.sort(key=lambda f: f.uri)
    log.debug("listed %d files under %s", len(out), uri)
    return out


def stem(uri: str) -> str:
    """File name without directory and extension: the id DISC2021 uses for an image."""
    return posixpath.splitext(posixpath.basename(str(uri).rstrip("/")))[0]
