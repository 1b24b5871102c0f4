"""Where a student's runtime files live: built on first use, keyed by the checkpoint's fingerprint.

A student checkpoint is the one thing a user handles; the ONNX graph and the int8 model derived
from it are caches, never a step to run. They are built the first time a job asks for them and
found again by the checkpoint's fingerprint, so a renamed or copied checkpoint finds them too and
a retrained one never picks up stale files.

    <root>/<fingerprint>/student-fp32.onnx   + student-fp32.json
                         student-int8.onnx   + student-int8.json
                         .lock

`<root>` is, in order: `$RDCD_CACHE_DIR`; `.rdcd-cache/` beside a local checkpoint when that folder
is writable (never inside the installed package: it may be read-only, and a checkout would gain
untracked files); else the user cache, `$XDG_CACHE_HOME/rdcd` or `~/.cache/rdcd` (checkpoints on
S3 cache there, on each machine that loads them).

Each file's JSON record is written after the file and names its sha256, the fingerprint and the
recipe (`RECIPE`, bumped whenever export or quantisation changes). A file without a record, a
record of another fingerprint or recipe, or a file whose bytes differ from the record is not used:
it is rebuilt. Building holds an exclusive `flock` on `.lock` so two processes on one machine
build once (the second finds the first's result), and writes to a temporary name renamed into
place, so no reader ever sees half a file. A build can also end in a *refusal* (the int8 model
disagrees with fp32): that record has no file, says why, and is honoured until it is deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rdcd import io as rio

log = logging.getLogger(__name__)

CACHE_ENV = "RDCD_CACHE_DIR"
RECIPE = "rdcd-onnx-v1"  # bump when export or quantisation changes: old files are rebuilt
FORMAT = "rdcd-student-runtime-v1"
BESIDE = ".rdcd-cache"
_PACKAGE = Path(__file__).resolve().parents[1]


class Refused(Exception):
    """A build that ran and decided its result must not be used (recorded, not retried);
    `details` (e.g. the measured agreement) go into the record beside the reason."""

    def __init__(self, reason: str, details: dict[str, Any] | None = None):
        super().__init__(reason)
        self.reason, self.details = reason, dict(details or {})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
        return True
    except OSError:
        return False


def user_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rdcd"


def cache_roots(checkpoint: str | None) -> list[Path]:
    """The candidate roots for `checkpoint`, best first (see the module docstring)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return [Path(env)]
    roots = []
    if checkpoint and not rio.is_s3(checkpoint) and "://" not in checkpoint:
        folder = Path(checkpoint).resolve().parent
        if not folder.is_relative_to(_PACKAGE):
            roots.append(folder / BESIDE)
    roots.append(user_cache_root())
    return roots


@dataclass
class ArtifactCache:
    """The cache folder of one fingerprint."""

    folder: Path
    fingerprint: str

    def file(self, kind: str) -> Path:
        return self.folder / f"student-{kind}.onnx"

    def record_path(self, kind: str) -> Path:
        return self.folder / f"student-{kind}.json"

    def record(self, kind: str) -> dict[str, Any] | None:
        """The committed record of `kind` if it is usable as is, else None (with the reason
        logged): missing, unreadable, another fingerprint or recipe, or a file that changed."""
        path = self.record_path(kind)
        try:
            rec = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("%s unreadable (%s): rebuilding", path, exc)
            return None
        if not isinstance(rec, dict) or rec.get("format") != FORMAT:
            log.warning("%s is not an rdcd runtime record: rebuilding", path)
            return None
        if rec.get("fingerprint") != self.fingerprint or rec.get("recipe") != RECIPE:
            log.info("%s was built for fingerprint %s, recipe %s: rebuilding", path,
                     str(rec.get("fingerprint"))[:12], rec.get("recipe"))  # fmt: skip
            return None
        if rec.get("status") == "refused":
            return rec
        file = self.file(kind)
        try:
            if file.stat().st_size != rec.get("bytes") or _sha256(file) != rec.get("sha256"):
                log.warning("%s differs from its record (corrupt or edited): rebuilding", file)
                return None
        except FileNotFoundError:
            log.warning("%s is missing: rebuilding", file)
            return None
        return rec

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive across processes of this machine (a no-op where `fcntl` is missing)."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on Linux/macOS
            yield
            return
        with open(self.folder / ".lock", "a+") as f:
            t0 = time.monotonic()
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process building in %s", self.folder)
                fcntl.flock(f, fcntl.LOCK_EX)
                log.info("waited %.1f s for %s", time.monotonic() - t0, self.folder)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _replace(self, target: Path, write: Callable[[Path], None]) -> None:
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            write(tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def _commit_record(self, kind: str, rec: dict[str, Any]) -> None:
        text = json.dumps(rec, indent=2, sort_keys=True)
        self._replace(self.record_path(kind), lambda p: p.write_text(text))

    def get_or_build(
        self, kind: str, build: Callable[[Path], dict[str, Any]]
    ) -> tuple[Path | None, dict[str, Any]]:
        """The file of `kind` and its record, building it with `build(tmp_path)` (which writes
        the file and returns what to record, or raises `Refused`) when there is none usable.
        A refusal returns (None, record) now and on every later call."""
        rec = self.record(kind)
        if rec is None:
            with self.lock():
                rec = self.record(kind)  # another process may have built it while we waited
                if rec is None:
                    rec = self._build(kind, build)
        return (None if rec.get("status") == "refused" else self.file(kind)), rec

    def _build(self, kind: str, build: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        t0 = time.perf_counter()
        base = {"format": FORMAT, "recipe": RECIPE, "fingerprint": self.fingerprint, "kind": kind}
        target = self.file(kind)
        built: dict[str, Any] = {}

        def write(tmp: Path) -> None:
            built.update(build(tmp))

        try:
            self._replace(target, write)
        except Refused as exc:
            target.unlink(missing_ok=True)
            rec = {**base, "status": "refused", "reason": exc.reason, **exc.details}
            self._commit_record(kind, rec)
            log.warning("%s of %s refused: %s (delete %s to try again)", kind,
                        self.fingerprint[:12], rec["reason"], self.record_path(kind))  # fmt: skip
            return rec
        rec = {
            **base,
            "status": "ok",
            **built,
            "bytes": target.stat().st_size,
            "sha256": _sha256(target),
            "build_seconds": round(time.perf_counter() - t0, 2),
        }
        self._commit_record(kind, rec)
        log.info("built %s (%d bytes) in %.1f s", target, rec["bytes"], rec["build_seconds"])
        return rec


def cache_for(checkpoint: str | None, fingerprint: str) -> ArtifactCache:
    """The cache of `fingerprint`, in the first writable root for `checkpoint`; a temporary
    folder (with a warning) when none is writable: the files are then built on every load."""
    for root in cache_roots(checkpoint):
        folder = root / fingerprint
        if _writable(folder):
            return ArtifactCache(folder, fingerprint)
        log.info("cache root %s is not writable, trying the next", root)
    folder = Path(tempfile.mkdtemp(prefix=f"rdcd-{fingerprint[:12]}-"))
    log.warning("no writable cache for %s (set %s): building in %s, not kept", fingerprint[:12],
                CACHE_ENV, folder)  # fmt: skip
    return ArtifactCache(folder, fingerprint)
