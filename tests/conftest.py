"""Shared fixtures. GLUE files come from ../shared/data/glue (beside the checkout); the tokenised-data cache of
the whole test session lives in one temporary folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rayeff.train.runner import keep_local_ray_on_loopback

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

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()
