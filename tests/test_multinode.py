"""A real multi-node Ray cluster on this machine, driven the way an operator drives one.

`ray start --head` and `ray start --address` run as separate process trees (each its own session,
ports and resources, one temp dir, token auth on). The head has one CPU, like the CPU head of
cluster/aws.yaml: it runs the job drivers and takes one task at a time, so work spills to the
worker. Jobs go in through `ray job submit` (the Jobs API of the head's dashboard) with the shared
cluster/runtime_env.yaml, from the repository root.

In the default run (about a minute): the index job over a real Parquet embedding run, its two
shard tasks on the two nodes, and an index that holds every reference once.

With RDCD_MULTINODE=1 (2-4 more minutes on a shared 2-core machine: starting nodes and three
fresh Pythons with torch dominate): the embed job over real photos, whose model actor only fits
the worker; once the worker has embedded a batch it is killed (SIGKILL of every process of its
session, as when a spot instance is reclaimed) and a replacement joins, as the autoscaler would
start one. The same submission must finish with every image embedded exactly once, and the index
job must index the result. `benchmarks/multinode.py` runs that scenario on more images and prints
its timings.

Ray refuses loopback addresses for `ray start`, so the nodes listen on this machine's own address;
nothing leaves the machine, and the Jobs API is bound to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from rdcd import io as rio
from rdcd import store

REPO = Path(__file__).resolve().parents[1]
BIN = Path(REPO / ".venv" / "bin") if (REPO / ".venv" / "bin" / "ray").exists() else None
N_IMAGES, SHARD, BATCH = 48, 16, 8  # 3 parts, 6 model batches
EMBED_TASK = "MapWorker(MapBatches(_EmbedActor)).submit"
DECODE_TASK = "MapBatches(_decode_groups)"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")

pytestmark = pytest.mark.slow
node_loss = pytest.mark.skipif(
    os.environ.get("RDCD_MULTINODE") != "1",
    reason="embed job losing a node: 2-4 minutes; set RDCD_MULTINODE=1 (benchmarks/multinode.py)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_where(match) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if match(int(entry)):
                    pids.append(int(entry))
            except (OSError, ProcessLookupError):
                pass
    return pids


def _kill(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class LocalCluster:
    """Ray nodes started with `ray start ... --block` as separate sessions under one temp dir.

    Every process this class starts can be found again: a node is the session of its `ray start`
    process, and job drivers (which Ray starts in sessions of their own) name the temp dir on
    their command line. `close` ends exactly those processes and nothing else.
    """

    def __init__(self, deadline_s: float = 120.0):
        self.tmp = tempfile.mkdtemp(prefix="rdcd-mn-", dir="/tmp")  # short: socket paths
        self.token = secrets.token_hex(32)
        ray_bin = str(BIN) if BIN else os.path.dirname(shutil.which("ray") or "")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(
            PATH=f"{ray_bin}{os.pathsep}{os.environ.get('PATH', '')}",  # the job's `python`
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
            PYTHONUNBUFFERED="1",
        )
        self.env = env
        self.ray = os.path.join(ray_bin, "ray")
        self.gcs_port, self.dash_port = _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{self.dash_port}"
        self.nodes: dict[str, subprocess.Popen] = {}
        self.deadline_s = deadline_s

    # -- nodes --------------------------------------------------------------------------------

    def _start(self, name: str, args: list[str], env: dict[str, str]) -> None:
        log = open(os.path.join(self.tmp, f"{name}.log"), "w")
        common = ["--block", f"--temp-dir={self.tmp}", "--object-store-memory=150000000",
                  "--disable-usage-stats",
                  f"--dashboard-agent-listen-port={_free_port()}"]  # fmt: skip
        self.nodes[name] = subprocess.Popen([self.ray, "start", *args, *common], env=env,
                                            cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)  # fmt: skip
        log.close()

    def start_head(self, cpus: int) -> str:
        # A lost node is noticed after ~5 failed health checks a second apart (default ~30 s).
        env = {**self.env, "RAY_health_check_period_ms": "1000",
               "RAY_health_check_timeout_ms": "5000",
               "RAY_health_check_failure_threshold": "5"}  # fmt: skip
        self._start("head", ["--head", f"--port={self.gcs_port}", f"--num-cpus={cpus}",
                             '--resources={"rdcd_head": 1}', "--include-dashboard=true",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dash_port}",
                             f"--ray-client-server-port={_free_port()}"], env)  # fmt: skip
        self._wait(lambda: self.get("/api/version"), "the head's dashboard")
        return self.wait_node("head")

    def add_node(self, name: str, cpus: int) -> str:
        self._start(name, [f"--address=127.0.0.1:{self.gcs_port}", f"--num-cpus={cpus}",
                           f'--resources={{"rdcd_{name}": 1}}'], self.env)  # fmt: skip
        return self.wait_node(name)

    def alive_nodes(self) -> dict[str, str]:
        """resource tag (head, worker, ...) -> node id, for the nodes the GCS holds alive."""
        rows = self.state("nodes")
        tags = {}
        for n in rows:
            if n["state"] == "ALIVE":
                for key in n["resources_total"]:
                    if key.startswith("rdcd_"):
                        tags[key[5:]] = n["node_id"]
        return tags

    def wait_node(self, name: str) -> str:
        self._wait(lambda: self.alive_nodes().get(name), f"node {name} to join")
        return self.alive_nodes()[name]

    def kill_node(self, name: str) -> None:
        """SIGKILL every process of the node's session: raylet, agents, workers, actors."""
        proc = self.nodes.pop(name)
        self._kill_all(lambda pid: os.getsid(pid) == proc.pid)
        proc.wait(timeout=10)

    @staticmethod
    def _kill_all(match, timeout: float = 20.0) -> list[int]:
        """SIGKILL the live processes `match` selects until none is left; those that remain."""

        def live(pid: int) -> bool:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    return False  # exited, waiting to be reaped
            return match(pid)

        end = time.monotonic() + timeout
        while (pids := _pids_where(live)) and time.monotonic() < end:
            _kill(pids)
            time.sleep(0.2)
        return pids

    # -- HTTP: the Jobs and State APIs of the dashboard ---------------------------------------

    def _request(self, path: str, method: str = "GET", body: dict | None = None, **query):
        url = self.url + path + ("?" + urllib.parse.urlencode(query, doseq=True) if query else "")
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"null")

    def get(self, path: str, **query):
        return self._request(path, **query)

    def state(self, resource: str, detail: bool = False, **filters: str) -> list[dict]:
        """`ray list <resource> [--detail]` over HTTP, with `key=value` filters."""
        query = {"limit": 10000, "detail": str(detail).lower(), "filter_keys": list(filters),
                 "filter_predicates": ["="] * len(filters),
                 "filter_values": list(filters.values())}  # fmt: skip
        return self.get(f"/api/v0/{resource}", **query)["data"]["result"]["result"]

    def _wait(self, probe, what: str, timeout: float | None = None):
        end = time.monotonic() + (timeout or self.deadline_s)
        last: Exception | None = None
        while time.monotonic() < end:
            try:
                value = probe()
                if value:
                    return value
            except (urllib.error.URLError, OSError, KeyError, ValueError) as exc:
                last = exc
            time.sleep(0.5)
        raise TimeoutError(f"timed out waiting for {what} (last error: {last}); logs in {self.tmp}")

    # -- jobs ---------------------------------------------------------------------------------

    def submit(self, job_id: str, entrypoint: list[str]) -> str:
        """`ray job submit --no-wait` from the repository root with the shared runtime env
        (cluster/runtime_env.yaml: this checkout as the working dir), as cluster/README.md says."""
        cmd = [self.ray, "job", "submit", f"--address={self.url}", f"--submission-id={job_id}",
               "--no-wait", "--runtime-env", "cluster/runtime_env.yaml",
               "--", *entrypoint]  # fmt: skip
        proc = subprocess.run(cmd, env=self.env, cwd=REPO, capture_output=True, text=True,
                              timeout=180)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return job_id

    def status(self, job_id: str) -> str:
        return self.get(f"/api/jobs/{job_id}")["status"]

    def ray_job_id(self, job_id: str) -> str:
        """The Ray job id (hex) of a submission: what tasks and actors are tagged with."""
        return self.get(f"/api/jobs/{job_id}")["job_id"]

    def logs(self, job_id: str) -> str:
        try:
            return self.get(f"/api/jobs/{job_id}/logs")["logs"]
        except (urllib.error.URLError, OSError, KeyError) as exc:
            return f"(no logs: {exc})"

    def wait_job(self, job_id: str, timeout: float) -> str:
        return self._wait(lambda: (s := self.status(job_id)) in TERMINAL and s,
                          f"job {job_id}", timeout)  # fmt: skip

    # -- teardown -----------------------------------------------------------------------------

    def close(self) -> None:
        try:
            for job in self.get("/api/jobs/"):
                if job.get("status") not in TERMINAL and job.get("submission_id"):
                    self._request(f"/api/jobs/{job['submission_id']}/stop", method="POST")
        except (urllib.error.URLError, OSError, ValueError, TypeError):
            pass
        sessions = {p.pid for p in self.nodes.values()}
        mine = self.tmp.encode()

        def ours(pid: int) -> bool:
            if os.getsid(pid) in sessions:
                return True
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return mine in f.read()

        # The nodes are throwaway: no graceful drain (it waits up to 30 s), SIGKILL them all.
        self.leftovers = self._kill_all(ours)
        for proc in self.nodes.values():
            proc.wait(timeout=10)
        shutil.rmtree(self.tmp, ignore_errors=True)


def start_cluster() -> LocalCluster:
    """A CPU head with one CPU (drivers, decode tasks) and a worker with three (the model actor)."""
    c = LocalCluster()
    try:
        c.start_head(cpus=1)
        c.add_node("worker", cpus=3)
    except BaseException:
        c.close()
        raise
    return c


def embed_with_node_loss(cluster: LocalCluster, images: list[str], out: str, *, shard: int,
                         batch: int, model: str = "default") -> dict:  # fmt: skip
    """Submit the embed job, kill the worker node once it has embedded a batch, start a
    replacement, and wait for the same submission to end. Returns what happened, with timings."""
    listing = os.path.join(os.path.dirname(out), "images.txt")
    with open(listing, "w") as f:
        f.write("".join(f"{uri}\n" for uri in images))
    nodes = cluster.alive_nodes()
    # The model actor (2 CPUs) only fits a worker node (3 CPUs: room for decode tasks too); the
    # head's one CPU takes decode tasks.
    t0 = time.monotonic()
    job = cluster.submit(f"rdcd-embed-{secrets.token_hex(4)}", [
        "python", "-m", "jobs.embed", "--images", listing, "--model", model, "--out", out,
        "--shard-size", str(shard), "--batch-size", str(batch), "--actors", "1",
        "--cpus-per-actor", "2", "--no-progress"])  # fmt: skip

    def worker_embedded() -> bool:
        status = cluster.status(job)
        if status in TERMINAL:
            raise AssertionError(f"job {status} before the worker node embedded anything:\n"
                                 f"{cluster.logs(job)[-3000:]}")  # fmt: skip
        done = cluster.state("tasks", node_id=nodes["worker"], name=EMBED_TASK, state="FINISHED")
        return len(done) > 0

    cluster._wait(worker_embedded, "the worker node to embed a batch", timeout=300)
    first_batch_s = time.monotonic() - t0
    before = store.committed_parts(out)
    cluster.kill_node("worker")
    killed_at = time.monotonic()
    nodes["spare"] = cluster.add_node("spare", cpus=3)
    spare_s = time.monotonic() - killed_at
    status = cluster.wait_job(job, timeout=300)
    recovered_s = time.monotonic() - killed_at
    ray_job = cluster.ray_job_id(job)
    return {"job": job, "status": status, "logs": cluster.logs(job), "out": out,
            "nodes": nodes, "parts_before_kill": len(before),
            "timings": {"submit_to_first_worker_batch_s": round(first_batch_s, 1),
                        "kill_to_replacement_joined_s": round(spare_s, 1),
                        "kill_to_job_end_s": round(recovered_s, 1)},
            "tasks": cluster.state("tasks", name=EMBED_TASK, state="FINISHED", job_id=ray_job),
            "decodes": cluster.state("tasks", name=DECODE_TASK, state="FINISHED", job_id=ray_job),
            "actors": cluster.state("actors", detail=True,
                                    class_name="MapWorker(MapBatches(_EmbedActor))")}  # fmt: skip


def build_index_job(cluster: LocalCluster, embeddings: str, root: str) -> dict:
    """`ray job submit -- python -m jobs.build_index` with two shard tasks; waits for the end."""
    t0 = time.monotonic()
    job = cluster.submit(f"rdcd-index-{secrets.token_hex(4)}", [
        "python", "-m", "jobs.build_index", "--embeddings", embeddings, "--out", root,
        "--shards", "2", "--task-cpus", "1"])  # fmt: skip
    status = cluster.wait_job(job, timeout=300)
    return {"job": job, "status": status, "logs": cluster.logs(job),
            "seconds": round(time.monotonic() - t0, 1),
            "tasks": cluster.state("tasks", name="build_shard", state="FINISHED",
                                   job_id=cluster.ray_job_id(job))}  # fmt: skip


@pytest.fixture(scope="module")
def cluster():
    if BIN is None and shutil.which("ray") is None:
        pytest.skip("the `ray` CLI is not installed")
    c = start_cluster()
    try:
        yield c
    finally:
        c.close()
    assert not c.leftovers, f"processes left behind: {c.leftovers}"


def test_index_job_spreads_shard_tasks_over_the_nodes(cluster, tmp_path):
    """Two shard tasks of one CPU: the head holds one, the other spills to the worker. The index
    holds every reference of the run once and finds each as its own nearest neighbour."""
    from rdcd.index import load_index, read_manifest

    n, dim = 600, 64
    vectors = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    run = str(tmp_path / "emb")
    identity = store.RunIdentity("f" * 64, "synthetic", dim, 64, "fp32", 100)  # 6 parts
    store.write_embeddings(run, [f"/refs/{i:04d}.jpg" for i in range(n)], vectors, identity)
    root = str(tmp_path / "index")
    job = build_index_job(cluster, run, root)
    assert job["status"] == "SUCCEEDED", job["logs"][-4000:]
    nodes = cluster.alive_nodes()
    built_on = {t["node_id"] for t in job["tasks"]}
    assert len(job["tasks"]) >= 2 and built_on == {nodes["head"], nodes["worker"]}, built_on
    manifest = read_manifest(root)
    assert manifest["ntotal"] == n and len(manifest["shards"]) == 2
    index = load_index(root)
    assert sorted(np.concatenate([s.ids for s in index.shards]).tolist()) == list(range(n))
    found = index.search(vectors[:20], k=1, fingerprint=identity.fingerprint)
    assert found.ids[:, 0].tolist() == list(range(20))


@pytest.fixture(scope="module")
def embed_run(cluster, photos, tmp_path_factory) -> dict:
    """The embed job on the two-node cluster; the worker node dies after its first batch."""
    if len(photos) < N_IMAGES:
        pytest.skip(f"needs {N_IMAGES} photos, found {len(photos)}")
    out = str(tmp_path_factory.mktemp("multinode") / "emb")
    run = embed_with_node_loss(cluster, [str(p) for p in photos[:N_IMAGES]], out, shard=SHARD,
                               batch=BATCH)  # fmt: skip
    print(f"embed job: {run['timings']}, {run['parts_before_kill']} parts committed before")
    return run


def _count_by_node(tasks: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in tasks:
        counts[t["node_id"]] = counts.get(t["node_id"], 0) + 1
    return counts


@node_loss
def test_embed_job_spreads_over_the_nodes(embed_run):
    """Decode tasks ran on the head and on a worker, model batches on the worker (before it died)
    and on its replacement; none on the head, which has no room for the actor."""
    nodes = embed_run["nodes"]
    decoded = _count_by_node(embed_run["decodes"])
    embedded = _count_by_node(embed_run["tasks"])
    assert decoded.get(nodes["head"], 0) >= 1, decoded
    assert decoded.keys() - {nodes["head"]}, decoded
    assert embedded.get(nodes["worker"], 0) >= 1, embedded
    assert embedded.get(nodes["spare"], 0) >= 1, embedded
    assert nodes["head"] not in embedded, embedded


@node_loss
def test_embed_job_survives_losing_the_worker_node(embed_run):
    """The same submission finishes: the actor restarts on the replacement node, blocks lost with
    the node are rebuilt from lineage, and the driver keeps one copy of any row delivered twice."""
    assert embed_run["status"] == "SUCCEEDED", embed_run["logs"][-4000:]
    n_parts = -(-N_IMAGES // SHARD)
    assert embed_run["parts_before_kill"] < n_parts  # the kill came mid-job
    assert any(int(a["num_restarts"]) >= 1 for a in embed_run["actors"]), embed_run["actors"]
    run = json.loads(rio.read_text(rio.join(embed_run["out"], "run.json")))
    assert run["status"] == "complete"
    assert len(run["attempts"]) == 1  # one submission, no resume needed
    assert run["counts"] == {"images": N_IMAGES, "embedded": N_IMAGES, "errors": 0,
                             "parts": n_parts, "parts_skipped": 0,
                             "parts_written": n_parts}  # fmt: skip


@node_loss
def test_every_image_embedded_exactly_once(embed_run, photos):
    ids, uris, emb, meta = store.read_embeddings(embed_run["out"])
    assert ids.tolist() == list(range(N_IMAGES))  # sorted, none missing, none twice
    assert uris == [str(p) for p in photos[:N_IMAGES]]
    assert store.read_errors(embed_run["out"]) == []
    assert len(store.committed_parts(embed_run["out"])) == -(-N_IMAGES // SHARD)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-3)
    # Rows computed before the loss and after the restart are the model's output for that image.
    from rdcd.decode import load_for_model
    from rdcd.embed import load_embedder

    model = load_embedder("default", threads=1)
    picks = [0, 1, N_IMAGES // 2, N_IMAGES - 2, N_IMAGES - 1]
    pixels = np.stack([load_for_model(rio.read_bytes(uris[i]), model.image_size) for i in picks])
    np.testing.assert_allclose(model.embed(pixels), emb[picks], atol=1e-4)
    assert meta["fingerprint"] == model.fingerprint


@node_loss
def test_index_job_holds_every_id_once(cluster, embed_run, tmp_path):
    """`ray job submit -- python -m jobs.build_index`: two shard tasks on the cluster, an index
    that holds every reference of the run once and finds each one as its own nearest neighbour."""
    from rdcd.index import load_index, read_manifest

    assert embed_run["status"] == "SUCCEEDED"
    root = str(tmp_path / "index")
    job = build_index_job(cluster, embed_run["out"], root)
    assert job["status"] == "SUCCEEDED", job["logs"][-4000:]
    built = job["tasks"]
    assert len(built) == 2 and {t["node_id"] for t in built} <= set(cluster.alive_nodes().values())
    manifest = read_manifest(root)
    assert manifest["ntotal"] == N_IMAGES and len(manifest["shards"]) == 2
    index = load_index(root)
    held = np.concatenate([s.ids for s in index.shards])
    assert sorted(held.tolist()) == list(range(N_IMAGES))
    ids, uris, emb, meta = store.read_embeddings(embed_run["out"])
    found = index.search(emb[:8], k=1, fingerprint=meta["fingerprint"])
    assert found.ids[:, 0].tolist() == ids[:8].tolist()  # each reference finds itself
    assert [row[0] for row in found.uris] == uris[:8]
