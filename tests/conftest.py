"""Shared fixtures. GLUE files come from ../shared/data/glue (beside the checkout); the tokenised-data cache of
the whole test session lives in one temporary folder."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rayeff.cluster.connect import keep_local_ray_on_loopback

keep_local_ray_on_loopback()  # before anything imports ray: the tests' local Rays stay on 127.0.0.1

ROOT = Path(__file__).resolve().parents[1]
GLUE_DIR = ROOT.parent / "shared" / "data" / "glue"


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    os.environ["RAYEFF_CACHE"] = str(tmp_path_factory.mktemp("rayeff-cache"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    if not (GLUE_DIR / "SST-2" / "dev.tsv").is_file():
        pytest.fail(f"GLUE data not found at {GLUE_DIR}; the tests expect ../shared beside the checkout")
    return GLUE_DIR


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for a test module's in-process runs (started once: each start costs seconds)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free port with a bucket, and the environment pyarrow reads it from (set before any Ray
    that uses it starts, so its workers inherit it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([Path(sys.executable).parent / "moto_server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import pyarrow.fs

        deadline = time.time() + 60
        while True:
            try:
                fs, bucket = pyarrow.fs.FileSystem.from_uri("s3://rayeff-test?allow_bucket_creation=true")
                fs.create_dir(bucket)
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "moto_server did not start"
                time.sleep(0.5)
        yield "s3://rayeff-test"
    finally:
        server.terminate()
        server.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
