"""Benchmarks that write JSON: one module per `rayeff bench` command."""

from __future__ import annotations

import time
from pathlib import Path

from rayeff.checks import check_output_file, check_output_location
from rayeff.config import JobSpec
from rayeff.results import RunResult
from rayeff.train.runner import run_job


def output_and_runs_dir(output: str, runs_dir: str | None, overwrite: bool = False) -> tuple[Path, Path]:
    """The JSON file to write and the folder for the benchmark's runs (default: beside it, stamped with the time,
    so a second benchmark never meets the first one's runs). Both are checked before anything runs: the file's
    folder exists or can be created and is writable, the file is not a folder, and an existing file is refused
    unless `overwrite` (`--overwrite`), so a finished benchmark is never silently replaced."""
    output_path = check_output_file(output, "--output", overwrite)
    if runs_dir:
        check_output_location(runs_dir, "--runs-dir")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return output_path, Path(runs_dir) if runs_dir else output_path.parent / f"{output_path.stem}-runs-{stamp}"


def run_measured(job: JobSpec, address: str | None, show_progress: bool) -> RunResult:
    """One of a benchmark's runs, through `rayeff run`'s own path, read back through result.json's schema."""
    return RunResult.model_validate(run_job(job, address=address, show_progress=show_progress))
