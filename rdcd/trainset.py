"""The training images of a distillation run, as a stream that costs the driver nothing per step.

The paper's recipe is 100 epochs of 1M images: 100M samples. Materialising them on the driver
(one dict per sample) took ~21 GB and ~197k Ray Data blocks before the first step. Here:
- the listing is read once, in blocks, into an `ImageTable`: every URI packed into one byte
  buffer plus offsets (1M URIs ~ 70 MB in two numpy arrays, which Ray's object store hands to
  every task zero-copy), never a Python object per image;
- the order of epoch e is `epoch_order(n, seed, e)`, a pure function, computed (and cached) by
  whichever process needs it;
- a `SampleStream` says which positions of the epoch-concatenated order a run covers; it is cut
  into chunks of one batch, and a chunk's samples (`chunk_samples`) are computed where the views
  are made. The driver holds the table and a handful of integers.

Nothing here imports Ray: `rdcd train --dry-run` and the single-process trainer use it as well.
"""

from __future__ import annotations

import logging
import math
import random
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, overload

import numpy as np

from rdcd import io as rio

if TYPE_CHECKING:
    from rdcd.distill import DistillConfig

log = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".txt"
READ_BLOCK_BYTES = 8 << 20  # a manifest is read 8 MiB at a time


class ImageTable(Sequence[str]):
    """An immutable sequence of URIs stored as UTF-8 bytes in one buffer plus int64 offsets.

    Why not a list: 1M Python strings cost ~150 MB and pickle element by element; two numpy
    arrays cost their bytes, pickle out of band (protocol 5), and come out of Ray's object
    store without a copy, so every view task can look URIs up by index.
    """

    def __init__(self, data: np.ndarray, offsets: np.ndarray):
        if offsets.ndim != 1 or len(offsets) < 1 or int(offsets[-1]) != len(data):
            raise ValueError("ImageTable: offsets must end at the length of the data")
        self.data = data
        self.offsets = offsets

    @classmethod
    def from_uris(cls, uris: Iterable[str | bytes]) -> ImageTable:
        builder = _TableBuilder()
        for uri in uris:
            builder.add(uri.encode() if isinstance(uri, str) else uri)
        return builder.build()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        j = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= j < n:
            raise IndexError(f"image {i} of {n}")
        return bytes(self.data[self.offsets[j] : self.offsets[j + 1]]).decode()

    def __iter__(self) -> Iterator[str]:
        buf = self.data.tobytes() if len(self.data) < (64 << 20) else None
        for j in range(len(self)):
            lo, hi = int(self.offsets[j]), int(self.offsets[j + 1])
            yield (buf[lo:hi] if buf is not None else bytes(self.data[lo:hi])).decode()

    def take(self, indices: Iterable[int]) -> list[str]:
        return [self[int(i)] for i in indices]

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + self.offsets.nbytes)

    def __repr__(self) -> str:
        return f"ImageTable({len(self)} URIs, {self.nbytes / 2**20:.1f} MiB)"


class _TableBuilder:
    def __init__(self) -> None:
        self._data = bytearray()
        self._offsets = array("q", [0])

    def add(self, uri: bytes) -> None:
        self._data += uri
        self._offsets.append(len(self._data))

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def build(self) -> ImageTable:
        data = np.frombuffer(bytes(self._data), dtype=np.uint8)
        offsets = np.frombuffer(self._offsets.tobytes(), dtype=np.int64)
        return ImageTable(data, offsets)


def manifest_lines(uri: str, block_bytes: int = READ_BLOCK_BYTES) -> Iterator[bytes]:
    """The raw lines of a text file, read `block_bytes` at a time (local or S3)."""
    fs, path = rio.filesystem(uri)
    try:
        f = fs.open(path, "rb")
    except Exception as exc:  # noqa: BLE001 - fsspec raises per backend
        raise rio.StorageError(f"cannot read image manifest {uri}: {exc}") from exc
    with f:
        rest = b""
        while True:
            try:
                block = f.read(block_bytes)
            except Exception as exc:  # noqa: BLE001
                raise rio.StorageError(f"cannot read image manifest {uri}: {exc}") from exc
            if not block:
                break
            lines = (rest + block).split(b"\n")
            rest = lines.pop()
            yield from lines
        if rest:
            yield rest


def read_training_images(cfg: DistillConfig) -> ImageTable:
    """Every training URI of `cfg.images` (a folder, an S3 prefix, or a `.txt` manifest of URIs,
    one per line, `#` comments, relative lines against the manifest's folder), minus the
    `holdout` names, capped at `max_images`. Not validated: see `listing_problems`.

    A manifest is the way to name 1M images: it streams in seconds, where listing an S3 prefix
    of that size takes ~1,000 LIST requests and builds a Python object per file first."""
    excluded: set[bytes] = set()
    if cfg.holdout:
        excluded = {ln.strip().encode() for ln in rio.read_text(cfg.holdout).splitlines()}
        excluded.discard(b"")
    cap = cfg.max_images or math.inf
    builder = _TableBuilder()

    def keep(uri: bytes) -> bool:
        """Add `uri` unless held out; False once the table is full."""
        if not (excluded and uri.rsplit(b"/", 1)[-1] in excluded):
            builder.add(uri)
        return len(builder) < cap

    if cfg.images.endswith(MANIFEST_SUFFIX):
        base = cfg.images.rsplit("/", 1)[0] if "/" in cfg.images else "."
        for raw in manifest_lines(cfg.images):
            ln = raw.strip()
            if not ln or ln.startswith(b"#"):
                continue
            if not ln.startswith((b"s3://", b"s3a://", b"/")):
                ln = rio.join(base, ln.decode()).encode()
            if not keep(ln):
                break
    else:
        for f in rio.list_files(cfg.images, rio.IMAGE_SUFFIXES):
            if not keep(f.uri.encode()):
                break
    table = builder.build()
    log.info("%d training images under %s (%.1f MiB listing)", len(table), cfg.images,
             table.nbytes / 2**20)  # fmt: skip
    return table


def listing_problems(n_images: int, cfg: DistillConfig) -> list[str]:
    """Why `n_images` cannot train `cfg` (empty when they can)."""
    problems = []
    if n_images < cfg.global_batch:
        problems.append(
            f"{n_images} training images under {cfg.images}: fewer than one batch"
            f" ({cfg.global_batch})"
        )
    if cfg.queue_size > n_images // 2:
        # A queue that outlives an epoch holds keys of the very images being trained on: the
        # "hardest negative" is then the image itself and training collapses (seen here with a
        # 2048 queue on 1,297 images). DISC2021's 1M images leave 65,536 far from that.
        problems.append(
            f"queue_size {cfg.queue_size} is more than half the {n_images} training images: "
            "the queue would hold positives as negatives; use a smaller queue or more images"
        )
    return problems


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order in which epoch `epoch` visits images 0..n-1: a pure function of its arguments,
    so every process (driver, view task, single-process trainer) agrees on it."""
    order = list(range(n))
    random.Random(f"{seed}:order:{epoch}").shuffle(order)
    return order


@lru_cache(maxsize=4)
def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """`epoch_order` as a read-only int64 array, cached: a view task computes each epoch's
    order once (~1 s for 1M images) and then slices it for every chunk it makes."""
    perm = np.asarray(epoch_order(n, seed, epoch), dtype=np.int64)
    perm.flags.writeable = False
    return perm


@dataclass(frozen=True)
class SampleStream:
    """Positions `first .. first + count` of the epoch-concatenated order (position p is image
    `epoch_order(n, seed, p // n)[p % n]` of epoch `p // n`), in chunks of `chunk` samples."""

    n_images: int
    seed: int
    first: int
    count: int
    chunk: int

    @classmethod
    def for_run(
        cls, cfg: DistillConfig, n_images: int, start_step: int, extra_steps: int = 0
    ) -> SampleStream:
        """The samples of steps `start_step..steps` (and `extra_steps` more batches, e.g. a
        warm fill of the queues before step 0), plus one epoch of slack for images that fail
        to decode: the positions the driver used to list one by one."""
        if n_images < 1:
            raise ValueError("no training images")
        needed = (max(0, cfg.steps - start_step) + extra_steps) * cfg.global_batch
        return cls(n_images=n_images, seed=cfg.seed, first=start_step * cfg.global_batch,
                   count=needed + n_images, chunk=cfg.batch_size)  # fmt: skip

    @property
    def chunks(self) -> int:
        return -(-self.count // self.chunk)

    @property
    def epochs(self) -> tuple[int, int]:
        """First and last epoch the stream touches."""
        return self.first // self.n_images, (self.first + self.count - 1) // self.n_images

    def blocks(self, global_batch: int, max_blocks: int) -> int:
        """How many Ray Data blocks (view tasks) the chunks are cut into: two global batches per
        block as before for short runs, at most `max_blocks` (each costs the driver ~1 ms of
        planning, and 197k of them stalled the paper's run before its first step)."""
        return max(1, min(self.chunks, max_blocks, self.count // (2 * global_batch)))

    def block_ranges(self, global_batch: int, max_blocks: int) -> list[tuple[int, int]]:
        """The chunks cut into `blocks(...)` contiguous, near-equal ranges [lo, hi)."""
        n = self.blocks(global_batch, max_blocks)
        edges = [self.chunks * i // n for i in range(n + 1)]
        return [(lo, hi) for lo, hi in zip(edges, edges[1:], strict=False) if hi > lo]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SampleStream:
        return cls(**d)


def chunk_positions(stream: SampleStream, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """(image index, epoch) of every sample of chunk `chunk`, in stream order."""
    if not 0 <= chunk < stream.chunks:
        raise IndexError(f"chunk {chunk} of {stream.chunks}")
    lo = stream.first + chunk * stream.chunk
    hi = min(lo + stream.chunk, stream.first + stream.count)
    n = stream.n_images
    idx, epochs = [], []
    p = lo
    while p < hi:
        epoch, offset = divmod(p, n)
        take = min(hi - p, n - offset)
        idx.append(epoch_permutation(n, stream.seed, epoch)[offset : offset + take])
        epochs.append(np.full(take, epoch, dtype=np.int64))
        p += take
    return np.concatenate(idx), np.concatenate(epochs)


def chunk_samples(stream: SampleStream, chunk: int, table: Sequence[str]) -> dict[str, np.ndarray]:
    """The rows {uri, index, epoch} of one chunk: what the view tasks turn into two views."""
    idx, epochs = chunk_positions(stream, chunk)
    uris = np.array([table[int(i)] for i in idx], dtype=object)
    return {"uri": uris, "index": idx, "epoch": epochs}
