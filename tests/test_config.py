"""Job specs: every shipped job validates; overrides; and each kind of bad input is one clear line, exit code 2,
with nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from rayeff.cli import main
from rayeff.config import load_job
from rayeff.errors import UserError
from rayeff.methods.lora import LoraMethodConfig
from rayeff.methods.read import ReadConfig

ROOT = Path(__file__).resolve().parents[1]
JOBS = sorted(p for p in (ROOT / "jobs").glob("*.yaml") if not p.name.startswith("sweep-"))  # sweeps: test_sweep


def test_the_required_jobs_ship():
    names = {p.name for p in JOBS}
    assert {"sst2-full.yaml", "sst2-lora.yaml", "sst2-read.yaml", "rte-read.yaml"} <= names


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_every_shipped_job_validates(path):
    job = load_job(path)
    assert job.training.batch_size % job.scaling.num_workers == 0
    assert job.model_dump()["method"]["name"] == job.method.name


def test_method_section_becomes_the_methods_own_config():
    read = load_job(ROOT / "jobs" / "sst2-read.yaml")
    assert isinstance(read.method, ReadConfig) and read.method.hidden_size == 256
    lora = load_job(ROOT / "jobs" / "sst2-lora.yaml")
    assert isinstance(lora.method, LoraMethodConfig) and lora.method.rank == 8


def test_set_overrides_fields_with_yaml_typed_values():
    job = load_job(ROOT / "jobs" / "sst2-read.yaml",
                   ["training.lr=3e-4", "scaling.num_workers=1", "data.train_subset=100", "method.rnn=lstm"])
    assert job.training.lr == pytest.approx(3e-4)
    assert job.scaling.num_workers == 1
    assert job.data.train_subset == 100
    assert job.method.rnn == "lstm"


def test_task_names_are_normalised():
    job = load_job(ROOT / "jobs" / "sst2-read.yaml", ["data.task=SST-2"])
    assert job.data.task == "sst2"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


GOOD = """
model: {name: tiny-bert}
data: {task: sst2, train_subset: 16}
method: {name: read}
training: {max_steps: 1, batch_size: 4}
"""

BAD_INPUTS = [
    ("not yaml", "model: {name: tiny-bert\ndata: [", [], "not valid YAML"),
    ("unknown field", GOOD + "colour: blue\n", [], "colour"),
    ("unknown nested field", GOOD.replace("max_steps: 1", "max_step: 1"), [], "training.max_step"),
    ("wrong type", GOOD.replace("batch_size: 4", "batch_size: many"), [], "training.batch_size"),
    ("unknown method", GOOD.replace("name: read", "name: telepathy"), [], "method"),
    ("unknown method field", GOOD.replace("name: read}", "name: read, hiden_size: 3}"), [], "hiden_size"),
    ("bad READ option", GOOD, ["--set", "method.layers=bottom"], "method.layers: Input should be 'all' or 'top_half'"),
    ("READ dropout of 1", GOOD, ["--set", "method.dropout=1"], "method.dropout: Input should be less than 1"),
    ("negative lr", GOOD, ["--set", "training.lr=-0.1"], "training.lr"),
    ("zero workers", GOOD, ["--set", "scaling.num_workers=0"], "scaling.num_workers"),
    ("unknown task", GOOD.replace("task: sst2", "task: sst3"), [], "data.task"),
    ("batch not divisible", GOOD, ["--set", "scaling.num_workers=3"], "multiple of scaling.num_workers"),
    ("bad --set", GOOD, ["--set", "training.lr"], "FIELD=VALUE"),
]


@pytest.mark.parametrize("text,extra,needle", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_job_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, glue_dir, text, extra, needle):
    job = _write(tmp_path, text)
    out = tmp_path / "out"
    code = main(["run", str(job), "--data-dir", str(glue_dir), "--output", str(out), "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert needle in err
    assert not out.exists()


def test_missing_job_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "no such job file" in capsys.readouterr().err


def test_missing_data_dir_is_named(tmp_path, capsys):
    job = _write(tmp_path, GOOD)
    out = tmp_path / "out"
    code = main(["run", str(job), "--data-dir", str(tmp_path / "no-glue"), "--output", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "data.data_dir" in err and "no-glue" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_unknown_model_is_named(tmp_path, capsys, glue_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from rayeff.hub import hub_reachable

    hub_reachable.cache_clear()
    job = _write(tmp_path, GOOD.replace("tiny-bert", "no-such-org/no-such-model"))
    out = tmp_path / "out"
    code = main(["run", str(job), "--data-dir", str(glue_dir), "--output", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    hub_reachable.cache_clear()
    assert code == 2 and "model.name" in err and "no-such-org/no-such-model" in err
    assert not out.exists()


def test_load_job_raises_user_error_naming_the_file(tmp_path):
    path = _write(tmp_path, "- just\n- a list\n")
    with pytest.raises(UserError, match="job.yaml"):
        load_job(path)


def test_unreachable_cluster_address_is_one_line_and_fast(tmp_path, capsys, glue_dir):
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job = _write(tmp_path, GOOD)
    start = time.time()
    code = main(["run", str(job), "--data-dir", str(glue_dir), "--output", str(tmp_path / "out"), "--no-progress",
                 "--address", f"127.0.0.1:{port}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and f"127.0.0.1:{port}" in err and len(err.splitlines()) == 1
    assert time.time() - start < 60
    assert not (tmp_path / "out").exists()


def test_a_failure_inside_training_is_short_and_exit_1(tmp_path, capsys, monkeypatch):
    import rayeff.cli

    def failing_run(args):
        raise RuntimeError("worker 1 died\nlong traceback follows")

    monkeypatch.setattr(rayeff.cli, "cmd_run", failing_run)
    monkeypatch.delenv("RAYEFF_DEBUG", raising=False)
    assert main(["run", str(_write(tmp_path, GOOD))]) == 1
    err = capsys.readouterr().err
    assert "RuntimeError: worker 1 died" in err and "long traceback" not in err and "--resume" in err
