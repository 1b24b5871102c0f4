"""The embedding-run store refuses parts that changed after their commit.

A part is checked against the size and sha256 its commit records, not only its row count: an edited
shard with the same rows and metadata (id 7 carrying id 6's vector) must never reach an index, and
a damaged file must be named in one line, not in a pyarrow traceback without a path.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rdcd import io as rio
from rdcd import store

N, DIM, SHARD = 18, 8, 6


def _identity() -> store.RunIdentity:
    return store.RunIdentity("a" * 64, "student:test/8", DIM, 64, "fp32", SHARD)


def _vectors(n: int = N, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _write_run(out: str) -> np.ndarray:
    vectors = _vectors()
    store.write_embeddings(out, [f"img/{i:03d}.jpg" for i in range(N)], vectors, _identity())
    return vectors


def _swap_two_vectors(uri: str) -> None:
    """Rewrite a shard with rows 0 and 1 trading vectors: same ids, rows, schema, metadata, writer
    settings and (here) even the same size, so only the bytes' digest can tell."""
    table = pq.read_table(io.BytesIO(rio.read_bytes(uri)))
    emb = np.asarray(table.column("embedding").to_pylist(), np.float32)
    emb[[0, 1]] = emb[[1, 0]]
    col = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), DIM)
    edited = table.set_column(table.schema.get_field_index("embedding"), "embedding", col)
    edited = edited.replace_schema_metadata(table.schema.metadata)
    buf = io.BytesIO()
    pq.write_table(edited, buf, use_dictionary=False, compression="snappy",
                   row_group_size=table.num_rows)  # fmt: skip
    before = len(rio.read_bytes(uri))
    rio.write_bytes(uri, buf.getvalue())
    assert len(buf.getvalue()) == before
    again = pq.read_table(io.BytesIO(rio.read_bytes(uri)))
    assert again.num_rows == table.num_rows and again.schema.metadata == table.schema.metadata
    assert again.column("id").to_pylist() == table.column("id").to_pylist()


def _commit(out: str, part: int) -> dict:
    return json.loads(rio.read_text(store.part_uris(out, part)[2]))


def test_clean_run_reads_back(tmp_path):
    out = str(tmp_path / "run")
    vectors = _write_run(out)
    got = store.read_embeddings(out)
    assert got.ids.tolist() == list(range(N))
    np.testing.assert_array_equal(got.embeddings, vectors)
    assert store.read_errors(out) == []


def test_swapped_vectors_with_same_rows_are_refused(tmp_path):
    out = str(tmp_path / "run")
    _write_run(out)
    shard_uri, _, commit_uri = store.part_uris(out, 1)
    _swap_two_vectors(shard_uri)
    with pytest.raises(store.StoreError) as exc:
        store.read_embeddings(out)
    text = str(exc.value)
    assert shard_uri in text and "sha256" in text
    assert commit_uri in text and "rdcd embed" in text and "--out" in text  # what to do
    with pytest.raises(store.StoreError, match="part-00001.parquet"):
        store.read_part(out, _commit(out, 1))
    store.read_part(out, _commit(out, 0))  # the untouched parts still read


def test_truncated_part_is_one_short_line_naming_it(tmp_path):
    out = str(tmp_path / "run")
    _write_run(out)
    shard_uri = store.part_uris(out, 2)[0]
    data = rio.read_bytes(shard_uri)
    rio.write_bytes(shard_uri, data[: len(data) // 2])
    with pytest.raises(store.StoreError) as exc:
        store.read_embeddings(out)
    text = str(exc.value)
    assert shard_uri in text and "truncated" in text
    assert "\n" not in text and len(text) < 400, text


def test_unparseable_part_is_a_store_error_naming_it(tmp_path):
    """Garbage whose commit was rewritten to match it (size and sha256 agree): the parse failure
    still comes back as one line naming the part, not as pyarrow's own error."""
    import hashlib

    out = str(tmp_path / "run")
    _write_run(out)
    shard_uri, _, commit_uri = store.part_uris(out, 0)
    garbage = b"PAR1" + b"\x00" * 64 + b"not parquet"
    rio.write_bytes(shard_uri, garbage)
    commit = _commit(out, 0)
    commit.update(shard_bytes=len(garbage), shard_sha256=hashlib.sha256(garbage).hexdigest())
    rio.write_text(commit_uri, json.dumps(commit))
    with pytest.raises(store.StoreError) as exc:
        store.read_part(out, commit)
    text = str(exc.value)
    assert shard_uri in text and "not a readable Parquet file" in text
    assert "\n" not in text and len(text) < 500, text


def test_missing_committed_part_names_it(tmp_path):
    out = str(tmp_path / "run")
    _write_run(out)
    shard_uri = store.part_uris(out, 1)[0]
    (tmp_path / "run" / "shards" / "part-00001.parquet").unlink()
    with pytest.raises(store.StoreError, match="missing") as exc:
        store.read_embeddings(out)
    assert shard_uri in str(exc.value)


def test_edited_errors_file_is_refused(tmp_path):
    out = str(tmp_path / "run")
    ident = _identity()
    vectors = _vectors(3)
    files = store.encode_part(0, ident, [0, 1, 2], ["a", "b", "c"], vectors, ["", "bad", ""])
    store.write_part(out, files)
    assert store.read_errors(out) == [(1, "b", "bad")]
    errors_uri = store.part_uris(out, 0)[1]
    table = pq.read_table(io.BytesIO(rio.read_bytes(errors_uri)))
    edited = table.set_column(2, "error", pa.array(["fine"], pa.string()))
    buf = io.BytesIO()
    pq.write_table(edited.replace_schema_metadata(table.schema.metadata), buf)
    rio.write_bytes(errors_uri, buf.getvalue())
    with pytest.raises(store.StoreError, match="part-00000.parquet") as exc:
        store.read_errors(out)
    assert errors_uri in str(exc.value)


def test_swapped_vectors_refused_over_s3(s3_bucket):
    out = f"s3://{s3_bucket}/run"
    _write_run(out)
    shard_uri = store.part_uris(out, 1)[0]
    _swap_two_vectors(shard_uri)
    with pytest.raises(store.StoreError) as exc:
        store.read_embeddings(out)
    assert shard_uri in str(exc.value) and shard_uri.startswith("s3://")


def test_index_builder_and_compaction_refuse_an_edited_part(ray_local, tmp_path, capsys):
    from rdcd import index as rindex
    from rdcd.cli import main

    out, root = str(tmp_path / "run"), str(tmp_path / "index")
    _write_run(out)
    built = rindex.build_index(rindex.IndexConfig(embeddings=out, out=root, task_cpus=0.5))
    assert built["ntotal"] == N
    shard_uri = store.part_uris(out, 1)[0]
    _swap_two_vectors(shard_uri)
    # Ray wraps the task's StoreError; the text is what the user sees.
    with pytest.raises(Exception, match="part-00001.parquet") as exc:
        rindex.build_index(rindex.IndexConfig(embeddings=out, out=str(tmp_path / "i2"),
                                              task_cpus=0.5))  # fmt: skip
    assert shard_uri in str(exc.value) and "sha256" in str(exc.value)
    # The command line prints the store's one line, not the worker's traceback Ray prepends.
    argv = ["index", "--embeddings", out, "--out", str(tmp_path / "i3"), "--task-cpus", "0.5"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert shard_uri in err and "\n" not in err and "Traceback" not in err, err
    with pytest.raises(Exception, match="part-00001.parquet") as exc:
        rindex.compact(root, cpus=0.5)
    assert shard_uri in str(exc.value)
