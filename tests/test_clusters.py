"""Every file in clusters/ is checked: launcher configs by Ray's own validation, the KubeRay manifest by the fields
the operator requires, each cluster for token authentication on every node and a dashboard that only the head's
loopback serves, and the image's build context for what it leaves out."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
LAUNCHER_CONFIGS = ["aws.yaml", "gcp.yaml"]
ALL_INTERFACES = ("0.0.0.0", "::", "[::]")


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_configs_pass_rays_validation_and_start_what_rayeff_needs(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTERS / name).read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))   # raises on any schema violation
    head = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-port=8265" in head and "--metrics-export-port=8080" in head
    assert "--metrics-export-port=8080" in " ".join(raw["worker_start_ray_commands"])
    setup = " ".join(raw["setup_commands"])
    assert "pip install -q -e ~/rayeff" in setup and "/mnt/rayeff" in setup   # rayeff and the shared storage
    assert raw["file_mounts"]["/home/ubuntu/rayeff"] == "."
    types = raw["available_node_types"]
    assert types[raw["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())


def test_a_broken_launcher_config_fails_rays_validation():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTERS / "aws.yaml").read_text())
    raw["available_node_types"]["worker.gpu.a10g"]["min_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(raw))


def kuberay_documents() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all((CLUSTERS / "kuberay.yaml").read_text())}


def test_the_kuberay_manifest_has_what_the_operator_requires():
    docs = kuberay_documents()
    cluster, claim = docs["RayCluster"], docs["PersistentVolumeClaim"]
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["metadata"]["name"]
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())   # KubeRay takes strings only
        pod = group["template"]["spec"]
        assert pod["containers"] and all(c["name"] and c["image"] for c in pod["containers"])
        volumes = {v["name"]: v for v in pod["volumes"]}
        for mount in pod["containers"][0]["volumeMounts"]:
            assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    gpu = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu["nvidia.com/gpu"]) >= 1
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-port"] == "8265"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_the_dockerfile_installs_this_repository_on_the_matching_ray_image():
    text = (CLUSTERS / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-" in text
    assert "pip install --no-cache-dir -e /home/ray/rayeff" in text


# -- security: token authentication everywhere, the dashboard on the head's loopback ----------------------------------

def values(node) -> list[str]:
    """Every string in a parsed YAML document (keys and values): what the file really sets, not its comments."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (*values(k), *values(v))]
    if isinstance(node, list):
        return [s for item in node for s in values(item)]
    return [str(node)]


def binds_all_interfaces(strings: list[str]) -> list[str]:
    pattern = re.compile(r"(^|[=\s'\"])(0\.0\.0\.0|\[?::\]?)($|[\s:'\"])")
    return [s for s in strings if pattern.search(s)]


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_configs_start_every_node_with_token_authentication(name):
    raw = yaml.safe_load((CLUSTERS / name).read_text())
    user = raw["auth"]["ssh_user"]
    # Ray's documented way for `ray up`: the token made on the user's machine goes to every node ...
    assert raw["file_mounts"][f"/home/{user}/.ray/auth_token"] == "~/.ray/auth_token"
    # ... and every `ray start` (head and workers) runs with RAY_AUTH_MODE=token, so a node without it refuses to start.
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in raw[key] if "ray start" in c]
        assert starts, key
        for command in starts:
            before = command.split("ray start")[0]
            assert re.search(r"(^|[\s;])(export\s+)?RAY_AUTH_MODE=token([\s;]|$)", before), (key, command)
            assert "RAY_AUTH_MODE=disabled" not in command
    # Shells on the nodes (`ray exec ... rayeff run --address auto`) are clients of the cluster: token mode there too.
    assert any("export RAY_AUTH_MODE=token" in c and ".bashrc" in c for c in raw["setup_commands"])
    assert not any("RAY_AUTH_MODE=disabled" in s for s in values(raw))


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_configs_keep_the_dashboard_on_the_heads_loopback(name):
    raw = yaml.safe_load((CLUSTERS / name).read_text())
    head = " ".join(raw["head_start_ray_commands"])
    # Ray's default is localhost too; said explicitly so that no edit can drop it unnoticed. `ray dashboard` forwards
    # it over SSH (to localhost on the head).
    assert re.search(r"--dashboard-host[= ](127\.0\.0\.1|localhost)(\s|$)", head), head
    assert not binds_all_interfaces(values(raw)), binds_all_interfaces(values(raw))


def test_the_kuberay_cluster_enables_token_authentication_and_keeps_the_dashboard_on_loopback():
    docs = kuberay_documents()
    spec = docs["RayCluster"]["spec"]
    # KubeRay (1.5.1+) creates the Secret with a random token and sets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN in every
    # Ray container, the autoscaler's included; it needs Ray 2.52 or later.
    assert spec["authOptions"]["mode"] == "token" and not spec["authOptions"].get("enableK8sTokenAuth")
    assert tuple(int(x) for x in spec["rayVersion"].split(".")[:2]) >= (2, 52)
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            assert env.get("RAY_AUTH_MODE", {}).get("value", "token") == "token"   # nothing overrides it
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] in ("127.0.0.1", "localhost")   # KubeRay's default is 0.0.0.0
    assert head["serviceType"] == "ClusterIP"          # no LoadBalancer or NodePort: kubectl port-forward only
    assert not binds_all_interfaces(values(docs["RayCluster"])), binds_all_interfaces(values(docs["RayCluster"]))


# -- the image's build context ------------------------------------------------------------------------------------

def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule for a .dockerignore (patterns relative to the context root, Go filepath.Match plus `**`, a
    leading `!` re-includes, the last matching line wins, a matched folder excludes everything in it)."""
    def regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + "$")

    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for line in patterns:
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        pattern = pattern.strip().strip("/")
        if pattern.startswith("./"):
            pattern = pattern[2:]
        if any(regex(pattern).match(prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def test_the_image_build_context_leaves_out_history_environments_runs_and_caches():
    # clusters/Dockerfile is built with the repository root as its context (`docker build -f clusters/Dockerfile .`),
    # and Docker reads the .dockerignore at the context's root.
    assert "docker build -f clusters/Dockerfile" in (CLUSTERS / "Dockerfile").read_text()
    assert "COPY --chown=ray:users . /home/ray/rayeff" in (CLUSTERS / "Dockerfile").read_text()
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    for path in (".git", ".git/config", ".venv/bin/python", "runs/sst2/result.json", "runs", "build/lib/x.py",
                 "rayeff/__pycache__/cli.cpython-311.pyc", "tests/__pycache__/x.pyc", ".pytest_cache/v/cache",
                 "rayeff.egg-info/PKG-INFO", ".ruff_cache/x", ".mypy_cache/x", ".env"):
        assert dockerignore_excludes(patterns, path), path
    # What `pip install -e /home/ray/rayeff` and the jobs need stays in.
    for path in ("pyproject.toml", "README.md", "rayeff/cli.py", "rayeff/train/runner.py", "jobs/sst2-lora.yaml",
                 "search_spaces/read.yaml", "clusters/Dockerfile"):
        assert not dockerignore_excludes(patterns, path), path
    assert dockerignore_excludes(["runs"], "runs/x") and not dockerignore_excludes(["runs", "!runs"], "runs/x")
