"""Every file in clusters/ is checked: launcher configs by Ray's own validation, the KubeRay manifest by the fields
the operator requires."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import ray
import yaml

CLUSTERS = Path(__file__).resolve().parents[1] / "clusters"
LAUNCHER_CONFIGS = ["aws.yaml", "gcp.yaml"]


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
    assert raw["file_mounts"] == {"/home/ubuntu/rayeff": "."}
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
