"""Benchmarks that write JSON: one module per `rayeff bench` command."""

from __future__ import annotations

import time
from pathlib import Path

from rayeff.errors import UserError


def output_and_runs_dir(output: str, runs_dir: str | None) -> tuple[Path, Path]:
    """The JSON file to write (its folder must exist) and the folder for the benchmark's runs (default: beside it,
    stamped with the time, so a second benchmark never meets the first one's runs)."""
    output_path = Path(output)
    if not output_path.parent.is_dir():
        raise UserError(f"--output: folder {output_path.parent} does not exist")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return output_path, Path(runs_dir) if runs_dir else output_path.parent / f"{output_path.stem}-runs-{stamp}"
