"""The URI helper against local disk and a real S3 API (moto's server over HTTP)."""

from __future__ import annotations

import os

import pytest

from rdcd import io as rio


def test_local_roundtrip_and_listing(tmp_path):
    rio.write_bytes(str(tmp_path / "a" / "x.jpg"), b"abc")
    rio.write_text(str(tmp_path / "a" / "sub" / "y.PNG"), "hello")
    rio.write_text(str(tmp_path / "a" / ".hidden" / "z.jpg"), "no")
    rio.write_text(str(tmp_path / "a" / "notes.txt"), "no")
    assert rio.read_bytes(str(tmp_path / "a" / "x.jpg")) == b"abc"
    files = rio.list_files(str(tmp_path / "a"), rio.IMAGE_SUFFIXES)
    assert [os.path.basename(f.uri) for f in files] == ["y.PNG", "x.jpg"]  # sorted by URI: sub/ < x
    assert files[1].size == 3 and files[1].version.isdigit()
    top = rio.list_files(str(tmp_path / "a"), recursive=False)
    assert sorted(os.path.basename(f.uri) for f in top) == ["notes.txt", "x.jpg"]
    # no temporary files are left behind by the atomic write
    assert not [p for p in (tmp_path / "a").iterdir() if ".tmp-" in p.name]


def test_version_changes_when_file_changes(tmp_path):
    path = str(tmp_path / "x.jpg")
    rio.write_bytes(path, b"one")
    v1 = rio.list_files(path)[0].version
    os.utime(path, ns=(1, 1))
    assert rio.list_files(path)[0].version != v1


def test_local_errors_are_typed(tmp_path):
    with pytest.raises(rio.StorageError, match="no such file"):
        rio.read_bytes(str(tmp_path / "missing.jpg"))
    with pytest.raises(rio.StorageError, match="cannot list"):
        rio.list_files(str(tmp_path / "nope"))


def test_s3_roundtrip_listing_and_etag(s3_bucket):
    base = f"s3://{s3_bucket}/imgs"
    rio.write_bytes(f"{base}/a.jpg", b"hello")
    rio.write_bytes(f"{base}/deep/b.jpg", b"world!")
    rio.write_bytes(f"{base}/c.txt", b"x")
    files = rio.list_files(base, rio.IMAGE_SUFFIXES)
    assert [f.uri for f in files] == [f"{base}/a.jpg", f"{base}/deep/b.jpg"]
    assert [f.size for f in files] == [5, 6]
    assert files[0].version == "5d41402abc4b2a76b9719d911017c592"  # MD5 ETag of b"hello"
    assert rio.read_bytes(f"{base}/deep/b.jpg") == b"world!"
    assert rio.exists(f"{base}/a.jpg") and not rio.exists(f"{base}/zzz.jpg")
    top = rio.list_files(base, recursive=False)
    assert [f.uri for f in top] == [f"{base}/a.jpg", f"{base}/c.txt"]


def test_s3_through_pyarrow(s3_bucket):
    rio.write_bytes(f"s3://{s3_bucket}/p/a.bin", b"\x00\x01")
    fs, path = rio.arrow_filesystem(f"s3://{s3_bucket}/p/a.bin")
    with fs.open_input_file(path) as f:
        assert f.read() == b"\x00\x01"


def test_s3_wrong_bucket_and_key(s3_bucket):
    with pytest.raises(rio.StorageError, match="bucket does not exist"):
        rio.read_bytes("s3://no-such-bucket-rdcd/a.jpg")
    with pytest.raises(rio.StorageError, match="no such file"):
        rio.read_bytes(f"s3://{s3_bucket}/missing.jpg")


def test_s3_missing_credentials(s3_bucket, monkeypatch):
    rio.write_bytes(f"s3://{s3_bucket}/a.jpg", b"x")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask a metadata service
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    with pytest.raises(rio.StorageError, match="no AWS credentials"):
        rio.read_bytes(f"s3://{s3_bucket}/a.jpg")


def test_join_and_stem():
    assert rio.join("s3://b/p/", "x", "y.jpg") == "s3://b/p/x/y.jpg"
    assert rio.stem("s3://b/p/R000123.jpg") == "R000123"
    assert rio.stem("/tmp/Q1.png") == "Q1"
