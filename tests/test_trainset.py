"""The streaming training set: the listing read in blocks, the per-epoch order, chunked samples
(the same as the per-sample list the driver used to build), and concurrent reads."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from rdcd.distill import DistillConfig, epoch_order, list_training_images
from rdcd.trainset import (
    ImageTable,
    SampleStream,
    chunk_samples,
    epoch_permutation,
    read_training_images,
)


def _cfg(**kw) -> DistillConfig:
    base = DistillConfig(images="x", batch_size=4, workers=2, steps=9, queue_size=8,
                         memory_size=8, seed=3)  # fmt: skip
    return replace(base, **kw)


def _old_items(uris: list[str], cfg: DistillConfig, start_step: int) -> list[tuple]:
    """What `build_dataset` listed on the driver before (one item per sample)."""
    needed = (cfg.steps - start_step) * cfg.global_batch
    first = start_step * cfg.global_batch
    epochs = math.ceil((first + needed) / len(uris)) + 1
    items = []
    for epoch in range(first // len(uris), epochs):
        for i in epoch_order(len(uris), cfg.seed, epoch):
            items.append((uris[i], i, epoch))
    return items[first % len(uris) :][: needed + len(uris)]


def _stream_items(stream: SampleStream, table) -> list[tuple]:
    out = []
    for c in range(stream.chunks):
        rows = chunk_samples(stream, c, table)
        cols = zip(rows["uri"], rows["index"], rows["epoch"], strict=True)
        out += [(str(u), int(i), int(e)) for u, i, e in cols]
    return out


@pytest.mark.parametrize("n, start", [(10, 0), (10, 3), (7, 5), (40, 2), (3, 0)])
def test_stream_yields_the_samples_of_the_old_listing(n, start):
    """Same samples in the same order, chunk boundaries crossing epochs included (n=7, 3)."""
    uris = [f"s3://b/img{i:03d}.jpg" for i in range(n)]
    table = ImageTable.from_uris(uris)
    cfg = _cfg()
    stream = SampleStream.for_run(cfg, n, start)
    assert _stream_items(stream, table) == _old_items(uris, cfg, start)
    assert list(epoch_permutation(n, cfg.seed, 2)) == epoch_order(n, cfg.seed, 2)


def test_stream_costs_nothing_per_step():
    """The paper's 390,625 steps x 256 over 1M images: a few integers, ~4k blocks."""
    cfg = _cfg(batch_size=32, workers=8, steps=390_625)
    stream = SampleStream.for_run(cfg, 1_000_000, 0)
    assert stream.count == 390_625 * 256 + 1_000_000
    assert stream.blocks(cfg.global_batch, cfg.max_data_blocks) == 4096
    assert stream.epochs == (0, 100)
    last = chunk_samples(stream, stream.chunks - 1, ImageTable.from_uris(["a"] * 1_000_000))
    assert len(last["uri"]) == 32 and set(last["epoch"]) == {100}


def test_table_packs_uris():
    uris = ["s3://b/é.jpg", "/local/a b.png", "rel/x.jpg"]
    table = ImageTable.from_uris(uris)
    assert list(table) == uris and table[1] == uris[1] and table[-1] == uris[-1]
    assert table[0:2] == uris[:2] and table.take(np.array([2, 0])) == [uris[2], uris[0]]
    with pytest.raises(IndexError):
        table[3]


def test_manifest_is_read_in_blocks_like_the_old_listing(tmp_path, monkeypatch):
    """Comments, blank lines, relative lines (against the manifest's folder), the hold-out list
    and max_images: the same result as reading the whole file, with a tiny read block."""
    import rdcd.trainset as trainset

    lines = ["# a comment", "s3://b/k/0001.jpg", "", "  rel/0002.jpg  ", "/abs/0003.jpg",
             "rel/held.jpg", "s3://b/k/0004.jpg"]  # fmt: skip
    manifest = tmp_path / "m.txt"
    manifest.write_text("\n".join(lines))  # no final newline
    (tmp_path / "holdout.txt").write_text("held.jpg\n")
    monkeypatch.setattr(trainset, "READ_BLOCK_BYTES", 5)
    cfg = _cfg(images=str(manifest), holdout=str(tmp_path / "holdout.txt"), workers=1,
               batch_size=2, queue_size=2, memory_size=2)  # fmt: skip
    got = list(read_training_images(cfg))
    assert got == ["s3://b/k/0001.jpg", str(tmp_path / "rel" / "0002.jpg"), "/abs/0003.jpg",
                   "s3://b/k/0004.jpg"]  # fmt: skip
    assert list(read_training_images(replace(cfg, max_images=2))) == got[:2]
    assert list(list_training_images(cfg)) == got
    with pytest.raises(ValueError, match="queue would hold positives"):
        list_training_images(replace(cfg, queue_size=4, memory_size=4))


def test_view_tasks_read_their_batch_concurrently(monkeypatch):
    from rdcd import io as rio
    from rdcd.train import read_all

    active, peak = [0], [0]
    lock = threading.Lock()

    def slow_read(uri: str) -> bytes:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.2)
        with lock:
            active[0] -= 1
        if uri.endswith("bad"):
            raise rio.StorageError("gone")
        return uri.encode()

    monkeypatch.setattr(rio, "read_bytes", slow_read)
    t = time.perf_counter()
    out = read_all([f"s3://b/{i}" for i in range(7)] + ["s3://b/bad"], threads=8)
    assert time.perf_counter() - t < 1.0 and peak[0] >= 4
    assert out[:2] == [b"s3://b/0", b"s3://b/1"] and out[-1] is None


@pytest.mark.slow
def test_ray_stream_yields_the_same_samples(ray_local):
    """The Ray Data path: chunk ids expanded by the tasks give the old per-sample listing (order
    across blocks aside), and building the dataset costs the same for 10M steps as for 9."""
    from rdcd.train import build_dataset, sample_dataset

    uris = [f"s3://b/img{i:03d}.jpg" for i in range(10)]
    table = ImageTable.from_uris(uris)
    cfg = _cfg(max_data_blocks=3)
    for start in (0, 4):
        stream = SampleStream.for_run(cfg, len(uris), start)
        rows = sample_dataset(cfg, table, stream).take_all()
        got = sorted((r["uri"], int(r["index"]), int(r["epoch"])) for r in rows)
        assert got == sorted(_old_items(uris, cfg, start))
    t = time.perf_counter()
    build_dataset(replace(cfg, steps=10_000_000), table, 0)  # lazy: nothing per step
    assert time.perf_counter() - t < 10
