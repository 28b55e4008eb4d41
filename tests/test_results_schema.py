"""result.json and progress have one schema (rayeff/results.py): a real run's result.json reads back through it
unchanged, and a summary that does not fit is refused where it is made.

    pytest tests/test_results_schema.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from rayeff.results import Progress, RunResult

METHODS = {"full": {"name": "full"},
           "adazeta": {"name": "adazeta", "bottleneck": 4, "tt_rank": 2, "q_target": None, "beta": 0.0, "alpha": 2,
                       "q_max": 2}}


@pytest.fixture(scope="module", params=sorted(METHODS))
def run_output(request, tmp_path_factory, glue_dir) -> tuple[str, dict, Path]:
    from rayeff.config import validate_job
    from rayeff.train.runner import run_in_process

    out = tmp_path_factory.mktemp(request.param)
    job = validate_job({"model": {"name": "tiny-bert"}, "method": METHODS[request.param],
                        "data": {"task": "sst2", "data_dir": str(glue_dir), "train_subset": 16, "eval_subset": 8},
                        "training": {"max_steps": 2, "batch_size": 8, "log_every": 1, "checkpoint_every": 2,
                                     "eval_every": 2},
                        "output_dir": str(out / "run"), "energy": {"meter": "estimate"}})
    returned = run_in_process(job)
    return request.param, returned, out / "run" / "result.json"


def test_a_real_result_json_reads_back_through_the_schema_unchanged(run_output):
    method, returned, path = run_output
    text = path.read_text()
    on_disk = json.loads(text)
    result = RunResult.model_validate(on_disk)
    assert result.dump() == on_disk == returned
    assert list(result.dump()) == list(on_disk)   # the same keys in the same order
    assert (result.zeroth_order is not None) == (method == "adazeta")
    assert (result.method_figures is not None) == (method == "adazeta") and result.moe is None
    if result.zeroth_order is None:
        assert "zeroth_order" not in on_disk and "perturbation_snapshot_bytes" not in on_disk["memory"]
    else:
        assert result.zeroth_order.schedule.q_max == 2 and result.zeroth_order.queries_total == 4
    assert result.energy.source == "estimate" and result.energy.formula and "fallback" not in on_disk["energy"]
    assert result.time.steps == 2 and result.weights and result.job["method"]["name"] == method


def test_the_progress_a_run_reports_fits_the_schema(run_output):
    from rayeff.train.reporter import Reporter
    from rayeff.train.state import TrainState
    from rayeff.config import validate_job

    _, returned, _ = run_output
    job = validate_job(returned["job"])
    state = TrainState(step=2, losses=[0.7, 0.6], samples=16, train_seconds=1.0, last_eval={"accuracy": 0.5})
    energy = {"joules": 3.0, "source": "estimate"}
    first = Reporter(0, job, "sst2", "accuracy", {}).progress(state, 4, energy)
    assert "queries" not in first and first["eval"] == {"accuracy": 0.5}
    zeroth = Reporter(0, job, "sst2", "accuracy", {}).progress(state, 4, energy, {"queries": 2,
                                                                                  "queries_per_second": 4.0})
    assert Progress.model_validate(zeroth).queries == 2 and Progress.model_validate(zeroth).dump() == zeroth
    with pytest.raises(ValidationError, match="queries_typo"):
        Reporter(0, job, "sst2", "accuracy", {}).progress(state, 4, energy, {"queries_typo": 2})


def test_a_summary_missing_a_field_or_of_a_wrong_type_is_refused(run_output):
    _, returned, _ = run_output
    missing = {k: v for k, v in returned.items() if k != "train_loss"}
    with pytest.raises(ValidationError, match=r"train_loss\n  Field required"):
        RunResult.model_validate(missing)
    wrong = {**returned, "memory": {**returned["memory"], "grad_bytes": "lots"}}
    with pytest.raises(ValidationError, match=r"memory.grad_bytes\n  Input should be a valid integer"):
        RunResult.model_validate(wrong)
    unknown = {**returned, "energy": {**returned["energy"], "jouls": 1.0}}
    with pytest.raises(ValidationError, match=r"energy.jouls\n  Extra inputs are not permitted"):
        RunResult.model_validate(unknown)
