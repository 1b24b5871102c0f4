"""The bulk embedding job (`rdcd embed`): Ray Data over a real S3 API into resumable Parquet parts.

One reference run over moto's S3 server (real photos plus every kind of hostile file) is shared by
the module; the resume test kills a second run's driver half-way through a part and checks that
finishing it gives the very same bytes. Store and planning logic have fast tests without Ray.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_tiny_student
from PIL import Image
from test_decode import _png_bomb, _save  # the hostile-image generators of the decoder tests
from test_io import symlinked_tree

from rdcd import io as rio
from rdcd import store
from rdcd.cli import main
from rdcd.decode import load_for_model
from rdcd.embed import (
    CRASH_ENV,
    EmbedJobConfig,
    list_inputs,
    load_embedder,
    plan_actors,
    prepare_manifest,
    run_embed_job,
)

REPO = Path(__file__).resolve().parents[1]
N_PHOTOS, SHARD, BATCH = 12, 6, 3


def hostile_files(photo: Image.Image) -> dict[str, tuple[bytes, str | None]]:
    """name -> (bytes, None if it must be embedded, else a pattern its error must match)."""
    jpeg = _save(photo, "JPEG", quality=90)
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    rotated = photo.resize((80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    sixteen = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    return {
        "bad_truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "bad_zero_byte.jpg": (b"", "zero-byte"),
        "bad_text.jpg": (b"<html><body>404 Not Found</body></html>", "not an image"),
        "bad_bomb.png": (_png_bomb(30_000, 30_000), "decompression bomb"),
        "odd_cmyk.jpg": (_save(photo.convert("CMYK"), "JPEG", quality=95), None),
        "odd_16bit.png": (_save(Image.fromarray(sixteen), "PNG"), None),
        "odd_animated.gif": (
            _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50),
            None,
        ),
        "odd_exif_rotated.jpg": (_save(rotated, "JPEG", quality=95, exif=exif.tobytes()), None),
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("models")
    return {
        "a": make_tiny_student(d / "a.pt", 0, dim=32),
        "b": make_tiny_student(d / "b.pt", 1, dim=32),
    }


@pytest.fixture(scope="module")
def s3_input(s3_server, photos) -> dict:
    """A module-wide bucket holding real photos and hostile files under `images/`."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server)
    bucket = "rdcd-embed-job"
    client.create_bucket(Bucket=bucket)
    files = {p.name: (p.read_bytes(), None) for p in photos[:N_PHOTOS]}
    files.update(hostile_files(Image.open(photos[0]).convert("RGB")))
    for name, (data, _) in files.items():
        client.put_object(Bucket=bucket, Key=f"images/{name}", Body=data)
    return {"bucket": bucket, "images": f"s3://{bucket}/images/", "files": files}


@pytest.fixture(scope="module")
def reference(ray_local, s3_input, models) -> dict:
    """An uninterrupted run of the job over the S3 prefix."""
    out = f"s3://{s3_input['bucket']}/runs/reference"
    cfg = EmbedJobConfig(images=s3_input["images"], out=out, model=models["a"],
                         shard_size=SHARD, batch_size=BATCH, progress=False)  # fmt: skip
    return {"out": out, "run": run_embed_job(cfg), "cfg": cfg}


# ---- end to end over S3 -----------------------------------------------------------------------


def test_every_input_accounted_for_exactly_once(reference, s3_input):
    run, out = reference["run"], reference["out"]
    n = len(s3_input["files"])
    assert run["status"] == "complete"
    assert run["counts"]["images"] == n
    assert run["counts"]["parts"] == (n + SHARD - 1) // SHARD
    ids, uris, emb, meta = store.read_embeddings(out)
    errors = store.read_errors(out)
    all_ids = list(ids) + [e[0] for e in errors]
    assert len(all_ids) == n and len(set(all_ids)) == n == run["counts"]["embedded"] + len(errors)
    assert sorted(all_ids) == list(range(n))
    listed = [f.uri for f in rio.list_files(s3_input["images"])]
    assert sorted(uris + [e[1] for e in errors]) == listed
    assert emb.shape == (run["counts"]["embedded"], 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert meta["fingerprint"] == run["fingerprint"] and meta["dim"] == 32
    assert run["timings"]["images_per_second"] > 0


def test_hostile_files_embedded_or_recorded_with_reason(reference, s3_input):
    errors = {u.rsplit("/", 1)[-1]: reason for _, u, reason in store.read_errors(reference["out"])}
    _, uris, _, _ = store.read_embeddings(reference["out"])
    embedded = {u.rsplit("/", 1)[-1] for u in uris}
    for name, (_, expected_error) in s3_input["files"].items():
        if expected_error is None:
            assert name in embedded, f"{name} should decode: {errors.get(name)}"
        else:
            assert name in errors, f"{name} should be refused"
            assert expected_error in errors[name], (name, errors[name])


def test_descriptors_equal_the_model_applied_directly(reference, s3_input, models):
    ids, uris, emb, _ = store.read_embeddings(reference["out"])
    model = load_embedder(models["a"])
    picks = [i for i, u in enumerate(uris) if "odd_" in u][:3] + [0, 1]
    pixels = np.stack([load_for_model(rio.read_bytes(uris[i]), 64) for i in picks])
    np.testing.assert_allclose(model.embed(pixels), emb[picks], atol=1e-5)


def test_shards_readable_by_pyarrow_and_fastparquet(reference, tmp_path):
    import fastparquet

    out = reference["out"]
    commit = store.committed_parts(out)[0]
    local = tmp_path / "part.parquet"
    local.write_bytes(rio.read_bytes(rio.join(out, commit["shard"])))
    table = pq.read_table(local)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    assert table.schema.field("id").type == pa.int64()
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert meta[store.META_FINGERPRINT] == reference["run"]["fingerprint"]
    assert meta[store.META_DIM] == "32" and meta[store.META_MODEL].startswith("student:")
    df = fastparquet.ParquetFile(str(local)).to_pandas()
    assert list(df["id"]) == table.column("id").to_pylist()
    np.testing.assert_array_equal(
        np.stack(df["embedding"].to_list()).astype(np.float32),
        np.asarray(table.column("embedding").to_pylist(), np.float32),
    )
    err_local = tmp_path / "errors.parquet"
    err_local.write_bytes(rio.read_bytes(rio.join(out, commit["errors_file"])))
    err_columns = set(fastparquet.ParquetFile(str(err_local)).to_pandas().columns)
    assert err_columns == {"id", "uri", "error"}


def test_resume_after_killed_driver_is_identical(reference, ray_local, s3_input, models):
    """Kill a run's driver half-way through writing its third part, re-run the same command,
    and get exactly the bytes of the uninterrupted run."""
    out = f"s3://{s3_input['bucket']}/runs/resumed"
    args = ["--images", s3_input["images"], "--model", models["a"], "--out", out,
            "--shard-size", str(SHARD), "--batch-size", str(BATCH), "--no-progress"]  # fmt: skip
    env = {**os.environ, CRASH_ENV: "2", "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.run([sys.executable, "-m", "jobs.embed", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 17, proc.stderr[-3000:]
    assert len(store.committed_parts(out)) == 2
    shards = [f.uri for f in rio.list_files(rio.join(out, store.SHARDS_DIR))]
    assert len(shards) == 3  # two committed, one half-written without a commit
    assert json.loads(rio.read_text(rio.join(out, "run.json")))["status"] == "running"

    assert main(["embed", *args]) == 0  # the same command again
    run = json.loads(rio.read_text(rio.join(out, "run.json")))
    assert run["counts"]["parts_skipped"] == 2
    assert run["counts"]["parts_written"] == run["counts"]["parts"] - 2
    assert len(run["attempts"]) == 1  # the killed attempt never finished its record
    a, b = store.read_embeddings(reference["out"]), store.read_embeddings(out)
    np.testing.assert_array_equal(a.ids, b.ids)
    assert a.uris == b.uris
    assert a.embeddings.tobytes() == b.embeddings.tobytes()
    assert store.read_errors(reference["out"]) == store.read_errors(out)
    for part in range(run["counts"]["parts"]):
        for ref_uri, new_uri in zip(store.part_uris(reference["out"], part)[:2],
                                    store.part_uris(out, part)[:2], strict=True):  # fmt: skip
            assert rio.read_bytes(ref_uri) == rio.read_bytes(new_uri), new_uri


def test_rerun_of_a_finished_run_does_nothing(reference, capsys):
    cfg = reference["cfg"]
    before = store.committed_parts(cfg.out)
    argv = ["embed", "--images", cfg.images, "--model", cfg.model, "--out", cfg.out,
            "--shard-size", str(SHARD), "--batch-size", str(BATCH), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert "0 written" in capsys.readouterr().out
    assert store.committed_parts(cfg.out) == before


def test_refuses_to_append_with_another_model(reference, models, capsys):
    cfg = reference["cfg"]
    listing = [f.uri for f in rio.list_files(cfg.out)]
    argv = ["embed", "--images", cfg.images, "--model", models["b"], "--out", cfg.out,
            "--shard-size", str(SHARD), "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "refusing to append" in err and "another --out" in err
    assert [f.uri for f in rio.list_files(cfg.out)] == listing  # nothing deleted or added
    argv = ["embed", "--images", cfg.images, "--model", cfg.model, "--out", cfg.out,
            "--shard-size", str(SHARD + 1), "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    assert "shard_size=6" in capsys.readouterr().err


def test_symlinked_images_are_embedded_and_broken_links_recorded(ray_local, tiny_student,
                                                                 photos, tmp_path):  # fmt: skip
    """Linked images and linked folders are embedded under their linked paths; broken links and
    loops end in errors/ with the reason; nothing listed vanishes."""
    root, expected = symlinked_tree(tmp_path, photos[0].read_bytes())
    out = str(tmp_path / "run")
    cfg = EmbedJobConfig(images=root, out=out, model=tiny_student, shard_size=4, batch_size=2,
                         progress=False)  # fmt: skip
    run = run_embed_job(cfg)
    listed = [u.removeprefix(root + os.sep) for u in store.read_manifest(out).uris]
    assert listed == sorted(expected)
    _, uris, _, _ = store.read_embeddings(out)
    errors = {u.removeprefix(root + os.sep): reason for _, u, reason in store.read_errors(out)}
    embedded = {u.removeprefix(root + os.sep) for u in uris}
    assert embedded == {"a.jpg", "link.jpg", "linkdir/b.jpg"}
    assert sorted(embedded | errors.keys()) == listed and len(uris) + len(errors) == len(listed)
    assert run["counts"]["images"] == len(listed)
    for name in ("broken.jpg", "cycle.jpg"):
        assert "broken symbolic link" in errors[name], errors[name]
    assert "truncated" in errors["real/x.jpg"].lower()  # 50 bytes of a JPEG: a decode error


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, start time, command line) of every live process, read from /proc."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_bytes().rsplit(b")", 1)[1].split()
            cmd = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if stat[0] not in (b"Z", b"X"):
            table[int(name)] = (int(stat[1]), int(stat[19]), cmd.strip())
    return table


def _tree(table: dict[int, tuple[int, int, str]], root: int) -> dict[int, tuple[int, int, str]]:
    found, stack = {}, [root]
    while stack:
        parent = stack.pop()
        for pid, row in table.items():
            if row[0] == parent and pid not in found:
                found[pid] = row
                stack.append(pid)
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_driver_leaves_no_ray_processes(tiny_student, photos, tmp_path):
    """SIGKILL an `rdcd embed` that started its own local Ray: every process it had started
    (raylet, GCS, agents, workers) is gone soon after. Without the watchdog, Ray's dashboard and
    runtime-env agents outlive the driver by about a minute."""
    import shutil
    import signal
    import tempfile
    import time

    images = tmp_path / "images"
    images.mkdir()
    for p in photos[:24]:
        shutil.copy(p, images / p.name)
    out = tmp_path / "run"
    ray_tmp = tempfile.mkdtemp(prefix="rdcd-ray-", dir="/tmp")  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = ray_tmp  # its own local Ray, never the test session's
    args = ["--images", str(images), "--model", tiny_student, "--out", str(out),
            "--shard-size", "4", "--batch-size", "2", "--no-progress"]  # fmt: skip
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jobs.embed", *args], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    seen: dict[int, tuple[int, int, str]] = {}
    try:
        deadline = time.monotonic() + 240
        while not list((out / store.COMMITS_DIR).glob("*.json")):  # Ray is up and working
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no part committed within 240 s"
            seen.update(_tree(_proc_table(), proc.pid))
            time.sleep(0.2)
        seen.update(_tree(_proc_table(), proc.pid))
        assert any("raylet" in cmd for _, _, cmd in seen.values()), seen
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        t_kill = time.monotonic()
        left = dict(seen)
        while left and time.monotonic() - t_kill < 20:
            time.sleep(0.5)
            now = _proc_table()
            left = {p: r for p, r in left.items() if p in now and now[p][1] == r[1]}
        names = [row[2][:60] for row in left.values()]
        assert not left, f"alive 20 s after the driver was killed: {names}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        now = _proc_table()
        for pid, row in seen.items():  # only what this test's driver started, by pid and start
            if pid in now and now[pid][1] == row[1]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


# ---- without Ray --------------------------------------------------------------------------------


def test_plan_leaves_cpu_for_decode_tasks():
    cfg = EmbedJobConfig(images="x", out="y")
    two = plan_actors(cfg, cpus=2, gpus=0)
    assert (two.actors, two.cpus_per_actor, two.threads, two.device) == (1, 1.5, 2, "cpu")
    big = plan_actors(cfg, cpus=16, gpus=0)
    assert big.actors * big.cpus_per_actor + cfg.decode_cpus <= 16 and big.threads == 4
    gpu = plan_actors(cfg, cpus=8, gpus=2)
    assert (gpu.actors, gpu.gpus_per_actor, gpu.device) == (2, 1.0, "cuda")
    with pytest.raises(ValueError, match="decode tasks would never run"):
        plan_actors(EmbedJobConfig(images="x", out="y", actors=2, cpus_per_actor=1), 2, 0)
    with pytest.raises(ValueError, match="GPU"):
        plan_actors(EmbedJobConfig(images="x", out="y", gpus_per_actor=1), 2, 0)


def test_plan_sizes_from_free_cpus():
    """A Serve app holding CPUs: the pool fits what is free, or the job is refused, never hung."""
    cfg = EmbedJobConfig(images="x", out="y")
    quiet = plan_actors(cfg, cpus=2, gpus=0, free_cpus=2)
    assert quiet == plan_actors(cfg, cpus=2, gpus=0)
    busy = plan_actors(cfg, cpus=16, gpus=0, free_cpus=6)
    assert busy.actors * busy.cpus_per_actor + cfg.decode_cpus <= 6
    full = plan_actors(cfg, cpus=16, gpus=0, free_cpus=16)
    assert busy.actors * busy.cpus_per_actor < full.actors * full.cpus_per_actor
    small = plan_actors(cfg, cpus=2, gpus=0, free_cpus=1.0)
    assert (small.actors, small.cpus_per_actor) == (1, 0.5)
    with pytest.raises(ValueError, match="only 0.5 of the Ray cluster's 2 CPUs are free"):
        plan_actors(cfg, cpus=2, gpus=0, free_cpus=0.5)
    explicit = EmbedJobConfig(images="x", out="y", actors=1, cpus_per_actor=1.0)
    assert plan_actors(explicit, cpus=2, gpus=0, free_cpus=0.5).actors == 1  # waits, as asked


def _identity(precision: str = "fp32") -> store.RunIdentity:
    return store.RunIdentity("f" * 64, "student:test/4", 4, 64, precision, 3)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_store_round_trip_sees_only_committed_parts(tmp_path, precision):
    out = str(tmp_path / "run")
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(6, 4)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ident = _identity(precision)
    # part 1 arrives shuffled and with one failure; part 0 is complete
    p0 = store.encode_part(0, ident, [0, 1, 2], ["a", "b", "c"], vectors[:3], ["", "", ""])
    p1 = store.encode_part(1, ident, [5, 3, 4], ["f", "d", "e"], vectors[[5, 3, 4]],
                           ["", "", "zero-byte file"])  # fmt: skip
    store.write_part(out, p0)
    store.write_part(out, p1)
    # a half-written part 2 (no commit) is invisible
    p2 = store.encode_part(2, ident, [6], ["g"], vectors[:1], [""])
    rio.write_bytes(store.part_uris(out, 2)[0], p2.shard[:50])
    ids, uris, emb, meta = store.read_embeddings(out)
    assert ids.tolist() == [0, 1, 2, 3, 5] and uris == ["a", "b", "c", "d", "f"]
    tol = 1e-3 if precision == "fp16" else 0
    np.testing.assert_allclose(emb, vectors[[0, 1, 2, 3, 5]], atol=tol)
    assert emb.dtype == np.float32 and meta["precision"] == precision and meta["errors"] == 1
    assert store.read_errors(out) == [(4, "e", "zero-byte file")]
    table = pq.read_table(store.part_uris(out, 1)[0])
    value_type = pa.float16() if precision == "fp16" else pa.float32()
    assert table.schema.field("embedding").type == pa.list_(value_type, 4)
    # encoding is deterministic: the same rows in another order give the same bytes
    again = store.encode_part(1, ident, [3, 4, 5], ["d", "e", "f"], vectors[3:6],
                              ["", "zero-byte file", ""])  # fmt: skip
    assert again.shard == p1.shard and again.errors == p1.errors


def test_store_refuses_other_model_and_settings(tmp_path):
    out = str(tmp_path / "run")
    store.write_part(out, store.encode_part(0, _identity(), [0], ["a"], np.ones((1, 4)), [""]))
    store.check_identity(out, _identity())
    other = store.RunIdentity("0" * 64, "sscd-onnx", 4, 64, "fp32", 3)
    with pytest.raises(store.StoreError, match="refusing to append.*sscd-onnx"):
        store.check_identity(out, other)
    with pytest.raises(store.StoreError, match="precision='fp32'"):
        store.check_identity(out, _identity("fp16"))
    assert store.committed_parts(out)[0]["fingerprint"] == "f" * 64  # nothing was touched
    training = str(tmp_path / "training")
    rio.write_text(rio.join(training, "run.json"), json.dumps({"student": "student.pt"}))
    with pytest.raises(store.StoreError, match="not an embedding run"):
        store.check_identity(training, _identity())


def test_manifest_is_stable_and_refuses_a_changed_input(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("b.jpg", "a.jpg", "c.png", "notes.txt"):
        (images / name).write_bytes(b"x" * 10)
    cfg = EmbedJobConfig(images=str(images), out=str(tmp_path / "out"))
    first = prepare_manifest(cfg)
    assert [Path(u).name for u in first.uris] == ["a.jpg", "b.jpg", "c.png"]  # sorted, images
    assert prepare_manifest(cfg).uris == first.uris  # unchanged input: same ids
    (images / "a2.jpg").write_bytes(b"new")
    with pytest.raises(store.StoreError, match="1 added, 0 removed, 0 modified"):
        prepare_manifest(cfg)
    cfg.reuse_manifest = True
    assert prepare_manifest(cfg).uris == first.uris


def test_manifest_file_input_keeps_its_order(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("# references\nz.jpg\ns3://bucket/a.jpg\nz.jpg\n/abs/b.jpg\n")
    m = list_inputs(str(listing))
    assert m.uris == [str(tmp_path / "z.jpg"), "s3://bucket/a.jpg", "/abs/b.jpg"]
    table = pa.table({"uri": ["s3://b/1.jpg", "s3://b/0.jpg"]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    (tmp_path / "list.parquet").write_bytes(buf.getvalue())
    assert list_inputs(str(tmp_path / "list.parquet")).uris == ["s3://b/1.jpg", "s3://b/0.jpg"]
