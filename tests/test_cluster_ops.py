"""Cluster operations: storage locations, job submission through Ray's Jobs API to a real Ray head on 127.0.0.1
(token authentication on) with a run written to an S3 server on loopback (moto), live metrics scraped from the
head's Prometheus endpoint, `rayeff status`, and node-local storage refused on a multi-node cluster."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from rayeff.cluster.jobs import Cluster, stage_job, stage_sweep, submit
from rayeff.cluster.live import METRICS, StatusBoard
from rayeff.cluster.storage import Storage, check_shared, filesystem_type
from rayeff.errors import UserError
from rayeff.train.runner import check_output_dir

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY_JOB = """
model: {name: tiny-bert}
data: {task: sst2, train_subset: 64, eval_subset: 16}
method: {name: full}
training: {max_steps: 4, batch_size: 8, lr: 1.0e-3, log_every: 1}
scaling: {num_workers: 1}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- storage -------------------------------------------------------------------------------------------------------

def test_local_storage_writes_whole_files_and_lists_folders(tmp_path):
    out = Storage(str(tmp_path / "run"))
    assert out.local and out.location == str((tmp_path / "run").resolve())
    out.make()
    out.write_text("result.json", '{"a": 1}')
    source = tmp_path / "weights.bin"
    source.write_bytes(b"\x00" * 10)
    out.upload(source, "final/weights.bin")
    assert out.exists("result.json") and not out.exists("nothing.json")
    assert out.names() == ["final", "result.json"] and out.names("absent") == []
    assert (tmp_path / "run" / "final" / "weights.bin").read_bytes() == b"\x00" * 10
    assert not list((tmp_path / "run").rglob(".*tmp*"))      # no temporary names left behind
    assert out.child("trials", "t1") == f"{out.location}/trials/t1"


def test_storage_refuses_options_in_the_uri():
    with pytest.raises(UserError, match="AWS_ENDPOINT_URL"):
        Storage("s3://bucket/run?endpoint_override=localhost:9000")


def test_filesystem_type_reads_the_mount_that_holds_a_path(tmp_path):
    assert filesystem_type("/proc/self") == "proc"
    assert filesystem_type(str(tmp_path / "not" / "yet" / "made")) == filesystem_type(str(tmp_path))


def test_a_node_local_folder_is_refused_on_a_cluster_of_several_nodes(tmp_path, monkeypatch):
    """Ray's node table is replaced here (two nodes on one machine cannot share loopback); the decision is ours."""
    import ray

    from rayeff.cluster import storage

    nodes = [{"NodeID": "a", "Alive": True}, {"NodeID": "b", "Alive": False}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    check_shared(str(tmp_path))                    # one alive node: any folder will do
    nodes[1]["Alive"] = True
    with pytest.raises(UserError, match=r"output_dir .*own disk .* 2 nodes .*s3://"):
        check_shared(str(tmp_path / "run"))
    check_shared("gs://bucket/runs/x")             # an object store is shared by every node
    monkeypatch.setattr(storage, "filesystem_type", lambda path: "nfs4")
    check_shared(str(tmp_path / "run"))            # so is an NFS mount (EFS, Filestore)


# -- submission, checked before anything is sent ----------------------------------------------------------------------

def test_staged_job_carries_overrides_and_absolute_paths(tmp_path, monkeypatch):
    job = tmp_path / "job.yaml"
    job.write_text(TINY_JOB)
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "staged"
    folder.mkdir()
    command, meta = stage_job(str(job), ["training.lr=0.5", "output_dir=runs/x"], "data", folder)
    staged = yaml.safe_load((folder / "job.yaml").read_text())
    assert command == "run job.yaml" and meta["kind"] == "run"
    assert staged["training"]["lr"] == 0.5
    assert staged["output_dir"] == meta["output_dir"] == str(tmp_path / "runs" / "x")
    assert staged["data"]["data_dir"] == str(tmp_path / "data")


def test_staged_sweep_is_self_contained(tmp_path, monkeypatch):
    from rayeff.tune.spec import load_sweep

    monkeypatch.chdir(ROOT)
    folder = tmp_path / "staged"
    folder.mkdir()
    command, meta = stage_sweep("jobs/sweep-read.yaml", ["num_trials=2", "output_dir=runs/s"], "../shared/data/glue",
                                folder)
    assert command == "tune sweep.yaml" and meta["output_dir"] == str(ROOT / "runs" / "s")
    assert sorted(p.name for p in folder.iterdir()) == ["base_job.yaml", "search_space.yaml", "sweep.yaml"]
    monkeypatch.chdir(folder)   # the cluster's working folder: everything the sweep needs is in it
    sweep, job, space = load_sweep("sweep.yaml")
    assert sweep.num_trials == 2 and job.data.data_dir == str((ROOT / "../shared/data/glue").resolve())
    assert space.method == "read" and Path(sweep.priors.store).is_absolute()


def test_an_invalid_job_is_refused_before_any_connection(tmp_path):
    job = tmp_path / "bad.yaml"
    job.write_text(TINY_JOB.replace("lr: 1.0e-3", "lr: -1"))
    with pytest.raises(UserError, match="training.lr"):   # not the unreachable address: nothing was sent
        submit(str(job), [], None, "http://127.0.0.1:1")


def test_an_unreachable_address_is_one_clear_error():
    with pytest.raises(UserError, match="no Ray dashboard answers"):
        Cluster(f"http://127.0.0.1:{free_port()}")


def test_status_board_keeps_the_latest_line_per_run():
    board = StatusBoard()
    board.put("a", {"run": "a", "started": 2.0, "step": 1})
    board.put("b", {"run": "b", "started": 1.0, "step": 1})
    board.put("a", {"run": "a", "started": 2.0, "step": 5})
    assert [(line["run"], line["step"]) for line in board.snapshot()] == [("b", 1), ("a", 5)]


def test_grafana_dashboard_plots_every_exported_metric():
    dashboard = json.loads((ROOT / "clusters" / "grafana-rayeff.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exported = {f"ray_{name}" + ("_total" if kind == "counter" else "") for name, (kind, _) in METRICS.items()}
    plotted = {m for e in exprs for m in re.findall(r"ray_rayeff_\w+", e)}
    assert plotted == exported
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"])
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"datasource", "run", "method"}


# -- a real Ray head on loopback ------------------------------------------------------------------------------------

def _stop_ray_processes_of(temp_dir: str, starters: list[subprocess.Popen]) -> None:
    """Stop only what this test started: its `ray start --block` processes, then any Ray process whose command
    line names its temp folder, with their children."""
    doomed = [psutil.Process(p.pid) for p in starters if p.poll() is None]
    for p in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in p.info["cmdline"] or []):
            doomed += [p, *p.children(recursive=True)]
    for p in doomed:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    for p in starters:
        p.wait(timeout=30)


@pytest.fixture(scope="module")
def ray_head(s3_server):
    """`ray start --head` on 127.0.0.1 with token authentication, the dashboard and the metrics export on free
    ports. Clients get the token the documented way: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH."""
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")   # short: Ray's socket paths must stay under 108 bytes
    token = Path(temp_dir) / "token"
    token.write_text(secrets.token_hex(32))
    ports = {name: free_port() for name in ("gcs", "dashboard", "metrics", "client")}
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [BIN / "ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={ports['gcs']}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
         f"--metrics-export-port={ports['metrics']}", f"--ray-client-server-port={ports['client']}", "--num-cpus=2",
         f"--temp-dir={temp_dir}", '--system-config={"metrics_report_interval_ms": 1000}'],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    info = {"dashboard": f"http://127.0.0.1:{ports['dashboard']}", "gcs": f"127.0.0.1:{ports['gcs']}",
            "metrics": f"http://127.0.0.1:{ports['metrics']}/metrics", "env": env, "temp_dir": temp_dir,
            "starters": [head]}
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{info['dashboard']}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:   # it answers (and asks for the token): it is up
                break
            except OSError:
                assert head.poll() is None, "ray start --head exited"
                time.sleep(1)
        else:
            pytest.fail("the Ray head's dashboard did not come up in 120 s")
        yield info
    finally:
        _stop_ray_processes_of(temp_dir, info["starters"])
        shutil.rmtree(temp_dir, ignore_errors=True)


def rayeff(*args, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "rayeff.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def scrape(url: str) -> dict[str, float]:
    """rayeff's energy counter per run label, from the Prometheus text the head exports."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("ray_rayeff_energy_joules_total{"):
            run = re.search(r'run="([^"]*)"', line).group(1)
            assert 'method="full"' in line and 'trial=""' in line
            values[run] = values.get(run, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


@pytest.mark.slow
def test_submit_follow_status_metrics_and_stop_on_a_real_head(ray_head, s3_server, tmp_path, glue_dir):
    env = ray_head["env"]
    job = tmp_path / "tiny.yaml"
    job.write_text(TINY_JOB)

    # Token: none sent, or a wrong one -> one line, exit 2.
    no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    for bad_env, says in ((no_token, "requires an authentication token"),
                          ({**env, "RAY_AUTH_TOKEN": "0" * 64}, "rejected this authentication token")):
        refused = rayeff("jobs", "list", "--address", ray_head["dashboard"], env=bad_env)
        assert refused.returncode == 2 and says in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1

    # A job that fails validation is refused here, and nothing reaches the cluster.
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY_JOB.replace("method: {name: full}", "method: {name: fulll}"))
    refused = rayeff("submit", bad, "--address", ray_head["dashboard"], env=env)
    assert refused.returncode == 2 and "fulll" in refused.stderr
    assert rayeff("jobs", "list", "--address", ray_head["dashboard"], env=env).stdout == ""
    unknown = rayeff("jobs", "status", "rayeff-run-nothing", "--address", ray_head["dashboard"], env=env)
    assert unknown.returncode == 2 and "rayeff-run-nothing does not exist" in unknown.stderr

    # A long job, started first so that it runs beside the small one (both fit the head's 2 CPUs).
    long_out = tmp_path / "long"
    started = rayeff("submit", job, "--address", ray_head["dashboard"], "--data-dir", glue_dir, "--output", long_out,
                     "--set", "training.max_steps=100000", "--set", "training.log_every=5", env=env)
    assert started.returncode == 0, started.stderr[-3000:]
    long_id = started.stdout.strip()

    # A small job, followed to its end, writing its checkpoint and results to S3.
    out = f"{s3_server}/runs/small"
    done = rayeff("submit", job, "--address", ray_head["dashboard"], "--data-dir", glue_dir, "--output", out,
                  "--follow", env=env)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    submission_id = done.stdout.splitlines()[0]
    assert submission_id.startswith("rayeff-run-tiny-")
    assert f"wrote {out}/result.json" in done.stdout and "step 4/4" in done.stdout   # the job's log, streamed
    assert rayeff("jobs", "status", submission_id, "--address", ray_head["dashboard"], env=env).stdout.strip() \
        == "SUCCEEDED"
    listed = rayeff("jobs", "list", "--address", ray_head["dashboard"], env=env).stdout
    assert submission_id in listed and "SUCCEEDED" in listed and out in listed and long_id in listed
    stored = Storage(out)
    assert stored.names() == ["final", "job.yaml", "result.json", "train"]
    assert "step_00000004" in stored.names("train") and stored.names("final") == ["trainable.safetensors"]
    result = json.loads(stored.read_text("result.json"))
    assert result["output_dir"] == out and result["time"]["steps"] == 4
    with pytest.raises(UserError, match="already holds a run"):   # a second run there is refused
        check_output_dir(stored, resume=False)

    # The long job's metrics grow on the head's Prometheus endpoint, `rayeff status` shows it, then it is stopped.
    readings, deadline = [], time.time() + 300
    while len(readings) < 3 and time.time() < deadline:
        energy = scrape(ray_head["metrics"]).get("long")
        if energy is not None and (not readings or energy != readings[-1]):
            readings.append(energy)
        time.sleep(1)
    assert len(readings) == 3 and readings == sorted(readings) and readings[0] > 0, readings
    status = rayeff("status", "--address", ray_head["gcs"], env=env)
    assert status.returncode == 0, status.stderr[-2000:]
    line = next(x for x in status.stdout.splitlines() if x.startswith("long "))
    assert "full  running  step " in line and "J (estimate)" in line
    stopped = rayeff("jobs", "stop", long_id, "--address", ray_head["dashboard"], env=env)
    assert stopped.returncode == 0 and "stopping" in stopped.stdout
    deadline = time.time() + 60
    while time.time() < deadline and rayeff("jobs", "status", long_id, "--address", ray_head["dashboard"],
                                            env=env).stdout.strip() != "STOPPED":
        time.sleep(1)
    assert rayeff("jobs", "status", long_id, "--address", ray_head["dashboard"], env=env).stdout.strip() == "STOPPED"
