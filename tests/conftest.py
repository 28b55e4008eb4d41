"""Shared fixtures. GLUE files come from ../shared/data/glue (beside the checkout); the tokenised-data cache of
the whole test session lives in one temporary folder."""

from __future__ import annotations

import contextlib
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


# The Ray lane. The suite runs in two xdist workers (pyproject's addopts); the tests that start a Ray (the session's
# local Ray, a head, or `rayeff` in a subprocess) all run in one of them, one after another, while the other runs
# everything else: two Rays at once on this 2-core machine slow each other past the kill-and-resume tests' timing.
RAY_FIXTURES = {"local_ray", "ray_head"}


def starts_ray(item: pytest.Item) -> bool:
    return item.get_closest_marker("ray") is not None or bool(RAY_FIXTURES & set(item.fixturenames))


def uses_session_ray(item: pytest.Item) -> bool:
    return "local_ray" in item.fixturenames


@pytest.hookimpl(tryfirst=True)   # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    in_lane = [starts_ray(item) for item in items]
    lane = [item for item, ray in zip(items, in_lane) if ray]
    for item in lane:
        item.add_marker(pytest.mark.xdist_group("ray"))
    # The lane first: xdist's loadgroup hands a group to one worker as one unit, in the order collected. In it, the
    # tests that start Rays of their own before those that share the session's, which stays up once started.
    lane.sort(key=uses_session_ray)
    items[:] = lane + [item for item, ray in zip(items, in_lane) if not ray]


@pytest.hookimpl(trylast=True)   # after xdist has named the groups
def pytest_collection_finish(session: pytest.Session) -> None:
    """A lane xdist did not group would run two Rays at once, silently (pytest-xdist issue #1386): stop instead."""
    if getattr(session.config.option, "loadgroup", False):   # set in xdist's workers only
        ungrouped = [item.nodeid for item in session.items if starts_ray(item) and not item.nodeid.endswith("@ray")]
        if ungrouped:
            raise pytest.UsageError(f"pytest-xdist did not put {ungrouped[0]} in the Ray lane; pin a pytest and "
                                    "pytest-xdist that group tests (pyproject.toml)")


OTHER_LANE_NICENESS = 19   # below Ray's worker processes, which Ray starts at nice 15 (its worker_niceness)


@pytest.fixture(autouse=True)
def _other_lane_yields_the_cpu(request):
    """The worker that runs the other tests runs them at the lowest CPU priority (nice 19), it and every thread and
    process it starts: the Ray lane is the suite's longest path, and the cores are busy throughout. At nice 10 it
    still took three quarters of a core from the lane's Ray Train workers (nice 15). The lane's worker takes the lane
    first, so it keeps nice 0 for all its Rays."""
    if os.environ.get("PYTEST_XDIST_WORKER") and not starts_ray(request.node):
        tasks = Path("/proc/self/task")   # Linux's nice is per thread: torch's thread pool too
        for thread in [int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [0]:
            with contextlib.suppress(ProcessLookupError):   # a thread that ended since the listing
                if os.getpriority(os.PRIO_PROCESS, thread) < OTHER_LANE_NICENESS:
                    os.setpriority(os.PRIO_PROCESS, thread, OTHER_LANE_NICENESS)
    yield


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    os.environ["RAYEFF_CACHE"] = str(tmp_path_factory.mktemp("rayeff-cache"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Ray's own metrics export off in the tests' Rays (the head in test_cluster_ops turns it back on, its metrics are
    # the subject): its OpenTelemetry reader thread once segfaulted a Ray Train SynchronizationActor mid-checkpoint
    # (SIGSEGV in TemporalMetricStorage::buildMetrics), failing a ZeRO test that has nothing to do with metrics.
    os.environ.setdefault("RAY_enable_metrics_collection", "0")
    yield


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    if not (GLUE_DIR / "SST-2" / "dev.tsv").is_file():
        pytest.fail(f"GLUE data not found at {GLUE_DIR}; the tests expect ../shared beside the checkout")
    return GLUE_DIR


@pytest.fixture(scope="session")
def local_ray(s3_server):
    """One local Ray for the session's in-process runs (started once: a start costs 6-11 CPU seconds here), after
    the tests that start Rays of their own (pytest_collection_modifyitems). With its dashboard: Ray Train cleans up a
    trial that Tune stops through the State API. After the S3 server, so that its workers can write there."""
    import ray

    ray.init(address="local", num_cpus=2, logging_level="WARNING", dashboard_host="127.0.0.1")
    yield
    ray.shutdown()


@pytest.fixture
def ray_calls(monkeypatch) -> list:
    """`ray.init` replaced by one that records the call and raises: a command that got as far as starting Ray
    fails, and the list says it got there."""
    import ray

    calls = []

    def init(*args, **kwargs):
        calls.append(kwargs)
        raise RuntimeError("ray.init was called")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    return calls


@pytest.fixture
def refused_run(tmp_path, capsys, ray_calls):
    """`refused_run(job)` runs `rayeff run` on the job (a dict) and returns its error line, having checked that the
    run was refused before Ray started: exit 2, one line, no output folder."""
    import json

    from rayeff.cli import main

    def run(job: dict) -> str:
        path = tmp_path / "job.yaml"
        path.write_text(json.dumps(job))
        code = main(["run", str(path), "--output", str(tmp_path / "out"), "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert not ray_calls and code == 2 and len(err.splitlines()) == 1, err
        assert not (tmp_path / "out").exists()
        return err

    return run


@pytest.fixture
def one_worker_runs_in_process(monkeypatch):
    """A benchmark's one-worker runs go through `run_in_process` (the same loop, checkpoints and result.json, without
    starting Ray Train, about 20 s a run here); its runs of more workers still go through Ray. For tests whose
    subject is the benchmark's bookkeeping, not Ray."""
    import rayeff.bench
    from rayeff.train.runner import run_in_process, run_job

    def run(job, address=None, show_progress=True):
        return run_in_process(job) if job.scaling.num_workers == 1 else run_job(job, address, show_progress)

    monkeypatch.setattr(rayeff.bench, "run_job", run)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (`mlflow server`) on a free loopback port, its store a SQLite file; its URI."""
    import urllib.request

    folder = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([Path(sys.executable).parent / "mlflow", "server", "--host", "127.0.0.1", "--port",
                               str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                               "--default-artifact-root", str(folder / "artifacts")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).read()
            break
        except OSError:
            assert time.time() < deadline and server.poll() is None, "mlflow server did not start"
            time.sleep(0.5)
    yield uri
    os.killpg(server.pid, 15)   # the server and its workers
    server.wait(timeout=30)


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


@pytest.fixture
def check_report():
    """A check of a `rayeff report` page: it embeds exactly the figures named, each a PNG that decodes, each the
    same image as the PNG written beside the page (FILE-<figure>.png)."""
    import base64
    import io
    import re

    from PIL import Image

    def check(page: Path, names: set[str]) -> None:
        text = page.read_text()
        found = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)">', text)
        assert text.count("<img") == len(found) and {alt for alt, _ in found} == names, [alt for alt, _ in found]
        for name, data in found:
            image = Image.open(io.BytesIO(base64.b64decode(data)))
            image.load()   # decodes the whole image: a truncated or corrupt one raises
            beside = Image.open(page.with_name(f"{page.stem}-{name}.png"))
            assert beside.tobytes() == image.tobytes() and image.width > 300 and image.height > 200, name

    return check
