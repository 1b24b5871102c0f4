"""Embedding image files with a descriptor model, in one process.

This is the in-process path used by evaluation, the demo and benchmarks: threads read and decode
(PIL and file I/O release the GIL) while the model runs on the previous batch. Files that cannot
be read or decoded are reported with their reason and skipped, never fatal.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from rdcd import io as rio
from rdcd.decode import DecodeConfig, DecodeError, load_for_model
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
