"""`rayeff report PATH --output FILE.html` on a run folder (here), a sweep folder (tests/test_sweep.py) and a
`bench compare` JSON (tests/test_training.py): a self-contained page whose every image is a PNG that decodes, the
same PNGs beside it, and the run's figures drawn from its own histories."""

from __future__ import annotations

import json

from rayeff.cli import main
from rayeff.config import validate_job
from rayeff.train.runner import run_in_process


def test_a_run_report_has_its_curves_memory_and_settings(tmp_path, glue_dir, capsys, check_report):
    job = validate_job({
        "model": {"name": "tiny-bert"},
        "data": {"task": "sst2", "data_dir": str(glue_dir), "train_subset": 64, "eval_subset": 32},
        "method": {"name": "lora", "rank": 4},
        "training": {"max_steps": 8, "batch_size": 8, "lr": 1e-3, "log_every": 2, "eval_every": 4},
        "output_dir": str(tmp_path / "run")})
    result = run_in_process(job)
    # the histories the figures are drawn from: energy at each logged step, and each evaluation with its energy
    assert [e["step"] for e in result["energy_history"]] == [2, 4, 6, 8]
    joules = [e["joules"] for e in result["energy_history"]]
    assert joules == sorted(joules) and joules[0] > 0
    assert [e["step"] for e in result["eval_history"]] == [4, 8]
    assert result["eval_history"][-1]["metrics"] == result["metrics"]
    assert result["eval_history"][-1]["joules"] == result["energy"]["joules"]

    page = tmp_path / "out" / "report.html"
    assert main(["report", str(tmp_path / "run"), "--output", str(page)]) == 0
    assert f"wrote {page}" in capsys.readouterr().out
    check_report(page, {"curves", "memory"})
    text = page.read_text()
    assert "estimate" in text and "lora" in text and "eval_every: 4" in text   # energy's source, the settings

    # a result.json written before rayeff kept the histories (one loss_history entry per step) still reports
    older = {k: v for k, v in result.items() if k not in ("energy_history", "eval_history", "loss_history_steps")}
    older["loss_history"] = result["step_losses"]
    (tmp_path / "older").mkdir()
    (tmp_path / "older" / "result.json").write_text(json.dumps(older))
    assert main(["report", str(tmp_path / "older"), "--output", str(tmp_path / "older.html")]) == 0
    check_report(tmp_path / "older.html", {"curves", "memory"})


def test_report_refuses_what_it_cannot_read_in_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "other.json").write_text('{"a": 1}')
    for path, output, says in ((tmp_path / "missing", "r.html", "no such run folder"),
                               (tmp_path / "empty", "r.html", "holds neither result.json"),
                               (tmp_path / "other.json", "r.html", "not a `rayeff bench compare` JSON"),
                               (tmp_path / "empty", "r.png", "is not an .html file")):
        assert main(["report", str(path), "--output", str(tmp_path / output)]) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "other.json"]   # nothing written
