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


def symlinked_tree(tmp_path, image: bytes) -> tuple[str, dict[str, int]]:
    """A folder with a real image, a link to an image, a link to a folder of images, a folder
    reached twice (once through a link), two link loops and a broken link. Returns the folder
    and what its listing must be (path under the folder -> size)."""
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "b.jpg").write_bytes(image)
    (outside / "sub" / "c.jpg").write_bytes(image[:100])
    root = tmp_path / "images"
    (root / "real").mkdir(parents=True)
    (root / "a.jpg").write_bytes(image)
    (root / "real" / "x.jpg").write_bytes(image[:50])
    (root / "link.jpg").symlink_to(outside / "b.jpg")
    (root / "linkdir").symlink_to(outside, target_is_directory=True)
    (root / "dup").symlink_to("real", target_is_directory=True)  # real/ a second time
    (root / "real" / "loop").symlink_to("..", target_is_directory=True)  # back to the root
    (root / "real" / "self").symlink_to(".", target_is_directory=True)
    (outside / "sub" / "up").symlink_to(root, target_is_directory=True)  # a loop via the link
    (root / "broken.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (root / "cycle.jpg").symlink_to("cycle.jpg")  # a link to itself: unreadable, like a broken one
    (root / ".hidden.jpg").symlink_to(outside / "b.jpg")
    (root / ".hiddendir").symlink_to(outside, target_is_directory=True)
    expected = {
        "a.jpg": len(image),
        "broken.jpg": 0,
        "cycle.jpg": 0,
        "link.jpg": len(image),
        "linkdir/b.jpg": len(image),
        "linkdir/sub/c.jpg": 100,
        "real/x.jpg": 50,
    }
    return str(root), expected


def test_local_listing_follows_symlinks_once(tmp_path):
    image = bytes(range(256)) * 8
    root, expected = symlinked_tree(tmp_path, image)
    files = rio.list_files(root, rio.IMAGE_SUFFIXES)
    got = {os.path.relpath(f.uri, root): f.size for f in files}
    assert got == expected
    assert [f.uri for f in files] == sorted(f.uri for f in files)
    assert all(f.uri.startswith(root + os.sep) for f in files)  # paths under the root, not targets
    assert all(f.version.isdigit() for f in files)
    top = rio.list_files(root, rio.IMAGE_SUFFIXES, recursive=False)
    assert sorted(os.path.relpath(f.uri, root) for f in top) == [
        "a.jpg", "broken.jpg", "cycle.jpg", "link.jpg"]  # fmt: skip
    # a listing of the link itself, and of a linked folder, work like the real ones
    assert [f.size for f in rio.list_files(os.path.join(root, "link.jpg"))] == [len(image)]
    # Listed from the linked folder, the loop back (sub/up -> images/) leads outside the listed
    # root: images/ is walked once there, and its own link back to linkdir/ is not followed.
    linked = rio.list_files(os.path.join(root, "linkdir"), rio.IMAGE_SUFFIXES)
    up = ["a.jpg", "broken.jpg", "cycle.jpg", "link.jpg", "real/x.jpg"]
    assert [os.path.relpath(f.uri, root) for f in linked] == [
        "linkdir/b.jpg", "linkdir/sub/c.jpg", *[f"linkdir/sub/up/{u}" for u in up]]  # fmt: skip


def test_version_of_a_plain_file_is_unchanged(tmp_path):
    """Manifests written before symlinks were followed must still match (same size and version),
    or re-running an old embedding run would be refused as a changed input."""
    path = tmp_path / "d" / "x.jpg"
    rio.write_bytes(str(path), b"abc")
    st = os.stat(path)
    [info] = rio.list_files(str(tmp_path / "d"))
    assert info.version == str(int(float(st.st_mtime) * 1e9)) and info.size == 3


def test_broken_link_read_says_so(tmp_path):
    link = tmp_path / "gone.jpg"
    link.symlink_to(tmp_path / "deleted.jpg")
    with pytest.raises(rio.StorageError, match="broken symbolic link"):
        rio.read_bytes(str(link))
