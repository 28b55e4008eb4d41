"""Cluster operations: storage locations, job submission through Ray's Jobs API to a real Ray head on 127.0.0.1
(token authentication on, every socket of it on loopback) with a run written to an S3 server on loopback (moto),
live metrics scraped from the head's Prometheus endpoint, `rayeff status`, and node-local storage refused on a
multi-node cluster."""

from __future__ import annotations

import ipaddress
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

def _ray_processes_of(temp_dir: str, starters: list[subprocess.Popen]) -> list[psutil.Process]:
    """What this test started: its `ray start --block` processes and every Ray process whose command line names its
    temp folder, with their children (raylet -> workers, job supervisors -> job drivers)."""
    roots = [s.pid for s in starters if s.poll() is None]
    roots += [p.pid for p in psutil.process_iter(["cmdline"]) if any(temp_dir in a for a in p.info["cmdline"] or [])]
    found = {}
    for pid in roots:
        try:
            root = psutil.Process(pid)
            found.update({q.pid: q for q in (root, *root.children(recursive=True))})
        except psutil.NoSuchProcess:
            pass
    return list(found.values())


def _stop_ray_processes_of(temp_dir: str, starters: list[subprocess.Popen]) -> None:
    """Stop only what this test started (`_ray_processes_of`)."""
    doomed = _ray_processes_of(temp_dir, starters)
    for p in doomed:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    for p in starters:
        p.wait(timeout=30)


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)   # ::ffff:127.0.0.1, an IPv6 socket bound to IPv4 loopback
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def listening_sockets(processes: list[psutil.Process]) -> list[tuple[str, int, int, str]]:
    """(address, port, pid, process) for every listening TCP socket of these processes."""
    names = {}
    for p in processes:
        try:
            names[p.pid] = " ".join(p.cmdline())[:80]
        except psutil.NoSuchProcess:
            pass
    return sorted((c.laddr.ip, c.laddr.port, c.pid, names[c.pid]) for c in psutil.net_connections(kind="tcp")
                  if c.status == psutil.CONN_LISTEN and c.pid in names)


def assert_on_loopback_only(head: dict) -> list[tuple[str, int, int, str]]:
    """Every socket the test head's processes listen on, and every address they were told to advertise, is
    loopback. With RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 every Ray component (GCS, raylet's node and object managers,
    dashboard and its metrics, dashboard agent with the metrics export and its gRPC port, runtime-env agent, Ray
    Client server, autoscaler monitor, workers, job supervisors and drivers) binds 127.0.0.1.

    One socket is left that Ray cannot move: torch.distributed's rendezvous store (TCPStore), which the rank-0 Train
    worker of each running job serves. torch binds its server to all interfaces ("::" or "0.0.0.0", in
    TCPStoreLibUvBackend's UvTcpServer::makeWithPort and likewise the legacy backend) and has no setting for the
    address; only a pre-bound socket (`master_listen_fd`) would do, and Ray Train's process-group setup creates the
    store without one. So: at most one all-interfaces socket per RayTrainWorker process, and nothing else."""
    expected = {head["ports"][name] for name in ("gcs", "dashboard", "metrics", "client")}
    address_file = Path(head["temp_dir"]) / "ray_current_cluster"
    deadline = time.time() + 60                # the agents (metrics export) may start after the dashboard answers
    while True:
        processes = _ray_processes_of(head["temp_dir"], head["starters"])
        sockets = listening_sockets(processes)
        if (expected <= {s[1] for s in sockets} and address_file.is_file()) or time.time() > deadline:
            break
        time.sleep(1)
    assert expected <= {s[1] for s in sockets}, sockets
    beyond = [s for s in sockets if not is_loopback(s[0])]
    torch_stores = [s for s in beyond if s[0] in ("::", "0.0.0.0") and "RayTrainWorker" in s[3]]
    assert len({s[2] for s in torch_stores}) == len(torch_stores), torch_stores   # one per worker at most
    assert not [s for s in beyond if s not in torch_stores], f"Ray listens beyond loopback: {beyond}"
    advertised = set()
    for p in processes:
        try:
            advertised |= {re.split("[= ]", arg, maxsplit=1)[-1] for arg in p.cmdline()
                           if re.match(r"--node[-_]ip[-_]address=", arg)}
        except psutil.NoSuchProcess:
            pass
    assert advertised == {"127.0.0.1"}, advertised
    assert address_file.read_text().strip() == head["gcs"]      # what `ray start` tells later clients
    return sockets


@pytest.fixture(scope="module")
def ray_head(s3_server):
    """`ray start --head` on 127.0.0.1 with token authentication, the dashboard and the metrics export on free
    ports. Clients get the token the documented way: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH.

    Loopback: `--node-ip-address=127.0.0.1` alone is not enough. Ray turns a loopback node address into the
    machine's own (services.resolve_ip_for_localhost) unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and then its
    components bind that address or all interfaces (0.0.0.0 / ::). With the switch off (it also makes `ray start`
    refuse to add worker nodes, which a one-machine head never needs) every one of them binds 127.0.0.1; set here
    rather than inherited from conftest, so that the head does not depend on how the suite was started."""
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")   # short: Ray's socket paths must stay under 108 bytes
    token = Path(temp_dir) / "token"
    token.write_text(secrets.token_hex(32))
    ports = {name: free_port() for name in ("gcs", "dashboard", "metrics", "client")}
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_enable_metrics_collection": "1",
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
            "starters": [head], "ports": ports}
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
def test_the_test_head_listens_and_advertises_on_loopback_only(ray_head):
    assert_on_loopback_only(ray_head)


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
    # With jobs running: their supervisors, drivers and Train workers stay on loopback too.
    sockets = assert_on_loopback_only(ray_head)
    assert any("RayTrainWorker" in s[3] for s in sockets), sockets
    status = rayeff("status", "--address", ray_head["gcs"], env=env)
    assert status.returncode == 0, status.stderr[-2000:]
    line = next(x for x in status.stdout.splitlines() if x.startswith("long "))
    # status_text's format: energy and power (known from the second update on) share one source label
    shown = re.fullmatch(r"long  full  running  step (\d+)/100000  ([\d,]+\.\d) J, -?[\d,]+\.\d W \(estimate\)"
                         r"(  dev \d\.\d{4})?  updated \d+ s ago", line)
    assert shown, line
    assert int(shown[1]) >= 5 and float(shown[2].replace(",", "")) >= readings[-1] - 0.05, (line, readings)
    stopped = rayeff("jobs", "stop", long_id, "--address", ray_head["dashboard"], env=env)
    assert stopped.returncode == 0 and "stopping" in stopped.stdout
    deadline = time.time() + 60
    while time.time() < deadline and rayeff("jobs", "status", long_id, "--address", ray_head["dashboard"],
                                            env=env).stdout.strip() != "STOPPED":
        time.sleep(1)
    assert rayeff("jobs", "status", long_id, "--address", ray_head["dashboard"], env=env).stdout.strip() == "STOPPED"
