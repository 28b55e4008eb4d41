"""The local Ray of a run without --address (`rayeff.cluster.connect.init_ray(None, ...)`, what `rayeff run`, `tune` and
`bench` call): it is always a new Ray of the run's own, whatever the machine holds (a cluster file left by a
`ray start` whose head has died, RAY_ADDRESS in the environment), and nothing of it listens beyond loopback.

Each case runs in a subprocess whose Ray temp folder (RAY_TMPDIR) is a fresh folder, so the real /tmp/ray is neither
read nor written."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Starts the run's Ray as `rayeff run JOB` does, runs one task (so a worker process exists), waits for the node's
# agents to listen, then reports the Ray it got and every listening TCP socket of this process and its descendants
# (GCS, raylet, dashboard, dashboard agent, runtime-env agent, autoscaler monitor, workers).
PROBE = r"""
import json, os, sys, time
import psutil
if sys.argv[1] == "ray imported first":
    import ray   # a library caller: ray read its settings before rayeff could set any
from rayeff.cluster.connect import init_ray, keep_local_ray_on_loopback
keep_local_ray_on_loopback()   # what rayeff.cli.main does first when no --address is given
init_ray(None, 1)              # then what run_job, run_sweep and the benchmarks do
import ray
ray.get(ray.remote(lambda: os.getpid()).remote())
me = psutil.Process()

def listening():
    pids = {me.pid} | {p.pid for p in me.children(recursive=True)}
    found = []
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            try:
                name = psutil.Process(c.pid).name()
            except psutil.NoSuchProcess:
                continue
            found.append([c.laddr.ip, c.laddr.port, name])
    return found

deadline = time.time() + 60
while time.time() < deadline:
    names = " ".join(name for _, _, name in listening())
    if all(agent in names for agent in ("DashboardAgent", "RuntimeEnvAgent", "raylet", "gcs_server")):
        break
    time.sleep(1)
time.sleep(2)
node = ray._private.worker._global_node
print(json.dumps({"gcs": node.gcs_address, "node_ip": node.node_ip_address, "session": node.get_session_dir_path(),
                  "ray_address_left": os.environ.get("RAY_ADDRESS"), "listening": listening()}))
ray.shutdown()
"""


def is_loopback(ip: str) -> bool:
    import ipaddress

    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def dead_address() -> str:
    """A loopback address where nothing listens: the GCS of a head that has died."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def ray_tmpdir():
    folder = tempfile.mkdtemp(prefix="rl", dir="/tmp")   # short: Ray's socket paths must stay under 108 bytes
    yield Path(folder)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.parametrize("situation", ["stale cluster file", pytest.param("RAY_ADDRESS", marks=pytest.mark.slow),
                                       pytest.param("ray imported first", marks=pytest.mark.slow)])
def test_a_run_without_address_starts_its_own_local_ray_on_loopback(situation, ray_tmpdir):
    bogus = dead_address()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}   # conftest's loopback switch too
    env["RAY_TMPDIR"] = str(ray_tmpdir)
    (ray_tmpdir / "ray").mkdir()
    if situation == "stale cluster file":
        # What `ray start --head` writes (ray._common.utils.get_ray_address_file) and leaves when its head dies.
        (ray_tmpdir / "ray" / "ray_current_cluster").write_text(bogus)
    elif situation == "RAY_ADDRESS":
        env["RAY_ADDRESS"] = bogus
    probe = subprocess.run([sys.executable, "-c", PROBE, situation], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    got = json.loads(probe.stdout.strip().splitlines()[-1])
    assert got["gcs"] != bogus and got["gcs"].startswith("127.0.0.1:") and got["node_ip"] == "127.0.0.1"
    assert Path(got["session"]).is_relative_to(ray_tmpdir)   # a new session, in the temp folder this test gave it
    assert got["ray_address_left"] is None                   # the run's Ray and its State API calls stay local
    names = {name for _, _, name in got["listening"]}
    assert {"gcs_server", "raylet"} <= names and any("DashboardAgent" in n for n in names), got["listening"]
    beyond = [s for s in got["listening"] if not is_loopback(s[0])]
    assert not beyond, f"listening beyond loopback: {beyond}"


@pytest.mark.parametrize("workers, user_set, interval", [(2, None, "0.25"), (32, None, "2.0"), (2, "5", "5")])
def test_the_controller_polls_small_worker_groups_often_unless_the_user_says_otherwise(
        tmp_path, monkeypatch, workers, user_set, interval):
    """What Ray Train hands its controller (read when `fit` starts it), as `make_trainer` leaves the driver."""
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    from rayeff.config import validate_job
    from rayeff.models import resolve_model
    from rayeff.train import runner

    monkeypatch.setenv(runner.HEALTH_CHECK_INTERVAL, "unset")   # so that monkeypatch restores the environment after
    monkeypatch.delenv(runner.HEALTH_CHECK_INTERVAL)
    monkeypatch.setattr(runner, "_health_check_set", [])
    if user_set is not None:
        monkeypatch.setenv(runner.HEALTH_CHECK_INTERVAL, user_set)
    job = validate_job({"model": {"name": "tiny-bert"}, "data": {"task": "sst2"}, "method": {"name": "full"},
                        "scaling": {"num_workers": workers}, "output_dir": str(tmp_path / "run")})
    runner.make_trainer(job, resolve_model("tiny-bert"))
    assert get_env_vars_to_propagate()[runner.HEALTH_CHECK_INTERVAL] == interval
