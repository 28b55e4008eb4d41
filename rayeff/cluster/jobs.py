"""Jobs and sweeps on a Ray cluster, through Ray's own Jobs API (`JobSubmissionClient`): submit, list, status, logs,
stop.

    rayeff submit jobs/sst2-read.yaml --address http://HEAD:8265 --output /mnt/rayeff/runs/sst2-read
    rayeff jobs logs rayeff-run-sst2-read-1a2b3c --follow

A submission carries its files in the runtime environment: a working folder holding the job (or the sweep with its
base job and search space) exactly as validated here, with `--set` overrides applied and paths made absolute, and
this rayeff package as a py_module, so the cluster runs the code that validated it. On the cluster the entrypoint is
`python -m rayeff.cli run|tune FILE --address auto`: the same command as on one machine.

Token authentication stays on, and the client sends a token exactly when Ray's own CLI does: with RAY_AUTH_MODE=token,
read from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (never unasked to an address given by hand, which
could leak it). A missing or rejected token is a one-line error.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import yaml

from rayeff.cluster.storage import absolute
from rayeff.errors import UserError

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_S = 60   # how long a submission waits for a freshly started head's job agent


def resolve_address(address: str | None) -> str:
    """--address, else the variables Ray's job CLI reads."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("--address: give the head's dashboard address, e.g. --address http://HEAD:8265 (or set "
                        "RAY_API_SERVER_ADDRESS)")
    return address if "://" in address else f"http://{address}"


TOKEN_HELP = ("set RAY_AUTH_MODE=token and give the head's token (`ray get-auth-token` on the head prints it) in "
              "~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH")


def auth_error(address: str, err: Exception) -> UserError:
    if "Forbidden" in str(err) or "invalid or incorrect" in str(err):
        return UserError(f"--address {address}: the cluster rejected this authentication token; {TOKEN_HELP}")
    return UserError(f"--address {address}: the cluster requires an authentication token and none was sent; "
                     f"{TOKEN_HELP}")


class Cluster:
    """A Jobs API client whose failures (unreachable head, token, unknown id) are one-line `UserError`s."""

    def __init__(self, address: str | None):
        from ray.exceptions import AuthenticationError
        from ray.job_submission import JobSubmissionClient

        self.address = resolve_address(address)
        self._auth_error = AuthenticationError
        try:
            self.client = JobSubmissionClient(self.address)
        except AuthenticationError as err:
            raise auth_error(self.address, err) from None
        except ConnectionError:
            raise UserError(f"--address {self.address}: no Ray dashboard answers there; check the head's address "
                            "and dashboard port (http://HEAD:8265), or start a cluster (clusters/README.md)") from None

    def call(self, method: str, *args, **kwargs):
        try:
            return getattr(self.client, method)(*args, **kwargs)
        except self._auth_error as err:
            raise auth_error(self.address, err) from None
        except RuntimeError as err:   # "Request failed with status code 404: Job x does not exist.."
            first = (str(err).strip().splitlines() or ["refused"])[0]
            raise UserError(f"{self.address}: {first.split(': ', 1)[-1].rstrip('.')}") from None

    def status(self, submission_id: str) -> str:
        return str(self.call("get_job_status", submission_id).value)

    def follow(self, submission_id: str, write=print) -> str:
        """Stream the job's logs until it ends; return its final status."""
        async def tail():
            async for lines in self.client.tail_job_logs(submission_id):
                write(lines.rstrip("\n"))
        self.status(submission_id)   # an unknown id is an error here, not an empty stream
        asyncio.run(tail())
        status = self.status(submission_id)
        while status not in TERMINAL:   # the log stream can close a moment before the status turns
            time.sleep(0.5)
            status = self.status(submission_id)
        return status


def _absolute(path: str | None) -> str | None:
    return None if path is None else absolute(path)


def stage_job(path: str, overrides: list[str], data_dir: str | None, folder: Path) -> tuple[str, dict]:
    """The job file, validated with its overrides, paths made absolute, written into `folder`."""
    from rayeff.config import load_job   # here, not at the top: it imports every method (and torch), which
                                         # `rayeff jobs list|status|stop` never need

    job = load_job(path, overrides + ([f"data.data_dir={data_dir}"] if data_dir else []))
    job.output_dir = _absolute(job.output_dir)
    job.data.data_dir = _absolute(job.data.data_dir)
    (folder / "job.yaml").write_text(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False))
    return "run job.yaml", {"kind": "run", "file": Path(path).name, "output_dir": job.output_dir}


def stage_sweep(path: str, overrides: list[str], data_dir: str | None, folder: Path) -> tuple[str, dict]:
    """The sweep, checked as `rayeff tune` checks it, written into `folder` with copies of its base job and search
    space; overrides and absolute paths go into the sweep file."""
    from rayeff.tune.spec import load_sweep

    sweep, job, _ = load_sweep(path, overrides, data_dir)
    shutil.copyfile(sweep.base_job, folder / "base_job.yaml")
    shutil.copyfile(sweep.search_space, folder / "search_space.yaml")
    raw = sweep.model_dump(mode="json")
    raw.update(base_job="base_job.yaml", search_space="search_space.yaml", output_dir=_absolute(sweep.output_dir))
    raw["priors"]["store"] = _absolute(sweep.priors.store)
    if job.data.data_dir is not None:
        raw["overrides"]["data.data_dir"] = _absolute(job.data.data_dir)
    (folder / "sweep.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return "tune sweep.yaml", {"kind": "sweep", "file": Path(path).name, "output_dir": raw["output_dir"]}


def submit(path: str, overrides: list[str], data_dir: str | None, address: str | None, resume: bool = False
           ) -> tuple[Cluster, str, str]:
    """Validate the job or sweep here (nothing is submitted if it fails), then submit it; returns the client, the
    submission id and the output location as the cluster will see it."""
    import rayeff
    from rayeff.config import read_yaml_mapping

    raw = read_yaml_mapping(path, "job or sweep", "a job's `data` and `method`, or a sweep's `base_job`")
    stage = stage_sweep if "base_job" in raw else stage_job
    folder = Path(tempfile.mkdtemp(prefix="rayeff-submit-"))
    try:
        command, metadata = stage(path, list(overrides), data_dir, folder)
        cluster = Cluster(address)
        submission_id = f"rayeff-{metadata['kind']}-{Path(path).stem}-{uuid.uuid4().hex[:6]}"
        # A run's progress lines go to the job's log (plain lines: the log is no terminal).
        entrypoint = f"python -m rayeff.cli {command} --address auto" + (" --resume" if resume else "")
        request = dict(entrypoint=entrypoint, submission_id=submission_id,
                       metadata={f"rayeff_{k}": v for k, v in metadata.items()},
                       runtime_env={"working_dir": str(folder), "py_modules": [str(Path(rayeff.__file__).parent)],
                                    "excludes": ["__pycache__"]})
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                cluster.call("submit_job", **request)
                break
            except UserError as err:   # a head that has just started answers before its job agent is up
                if "No available agent" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(1)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return cluster, submission_id, metadata["output_dir"]


def job_rows(cluster: Cluster) -> list[dict]:
    """One row per submitted job on the cluster, newest first (drivers that joined by hand are not jobs here)."""
    rows = []
    for info in sorted(cluster.call("list_jobs"), key=lambda i: i.start_time or 0, reverse=True):
        if not info.submission_id:
            continue
        meta = info.metadata or {}
        rows.append({"id": info.submission_id, "status": str(info.status.value),
                     "kind": meta.get("rayeff_kind", "-"), "file": meta.get("rayeff_file", "-"),
                     "output_dir": meta.get("rayeff_output_dir", "-"),
                     "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((info.start_time or 0) / 1000))})
    return rows
