"""Starting or joining Ray: a local Ray of the run's own on loopback, or the cluster at `--address`, with a
wrong address or token a one-line error in seconds. Kept apart from the runner so that commands that only talk to
a cluster (`rayeff status`) start without importing torch and the models."""

from __future__ import annotations

import math
import os
import socket

from rayeff.errors import UserError


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A TCP connection to a `HOST:PORT` or `ray://HOST:PORT` address, so that a wrong address fails in seconds
    (ray.init itself retries for minutes)."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address {address}: expected HOST:PORT (the head's GCS port, e.g. 10.0.0.1:6379) or "
                        "ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise UserError(f"--address {address}: cannot reach a Ray cluster there ({err.strerror or err}); start one "
                        "with `ray start --head` or leave --address out to run on a local Ray") from None


LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def keep_local_ray_on_loopback() -> None:
    """A local Ray serves this machine alone, so all of it (GCS, raylet, dashboard and its agent, runtime-env agent,
    Ray Client, workers) binds to 127.0.0.1 rather than the machine's network address. Ray's switch for that is named
    for Windows and macOS, where it is the default: with it off, Ray takes 127.0.0.1 as the node's address, and every
    component binds to the node's address. Ray reads it when first imported (and its processes read it from the
    environment they inherit): call this before; `init_ray` also applies it to a ray imported earlier."""
    os.environ.setdefault(LOOPBACK_SWITCH, "0")


def init_ray(address: str | None, cpus_needed: float) -> None:
    """Join the cluster at `address`, or start a local Ray of this run's own, on loopback, with at least
    `cpus_needed` logical CPUs. Joining is only ever what `address` asks for: neither RAY_ADDRESS nor the cluster
    file an earlier `ray start` left (TEMP/ray/ray_current_cluster, kept even after its head died) is followed."""
    if not address:
        keep_local_ray_on_loopback()
    import ray
    from ray.exceptions import AuthenticationError

    if ray.is_initialized():
        return
    try:
        if address:
            check_reachable(address)
            ray.init(address=address, logging_level="WARNING", log_to_driver=True)
            return
        from ray._private import ray_constants

        # ray imported before keep_local_ray_on_loopback (a library caller) read the switch already: apply it.
        ray_constants.ENABLE_RAY_CLUSTER = ray_constants.env_bool(LOOPBACK_SWITCH, True)
        # This Ray's processes inherit the environment, and Ray's State API (which Train and Tune call) follows
        # RAY_ADDRESS / RAY_API_SERVER_ADDRESS: neither may lead to another cluster.
        for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            os.environ.pop(name, None)
        # address="local": a new local Ray whatever this machine holds (ray.init without it joins RAY_ADDRESS or the
        # cluster file's address, and then fails on num_cpus). Logical CPUs: enough for the workers even where they
        # outnumber the cores (they then share them).
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(cpus_needed)),
                 logging_level="WARNING", dashboard_host="127.0.0.1")
    except ConnectionError as err:
        token = "" if os.environ.get("RAY_AUTH_MODE") == "token" else \
            "; if the cluster uses token authentication, set RAY_AUTH_MODE=token"
        raise UserError(f"--address {address}: cannot reach a Ray cluster there ({err}){token}; start one with "
                        "`ray start --head` or leave --address out to run on a local Ray") from None
    except AuthenticationError:
        raise UserError(f"--address {address}: the cluster refused the connection for its authentication token "
                        "(missing or wrong); give the head's token (`ray get-auth-token` on the head prints it) in "
                        "~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH") from None
