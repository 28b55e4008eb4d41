"""Broken inputs through the real command line (`rayeff.cli.main`, in this process): every file and folder a command
reads or writes, and every size or seed that would only fail mid-run, is refused before Ray starts with one line on
stderr naming it, exit code 2, and no output written.

`ray.init` is replaced by one that records the call and raises (the `ray_calls` fixture): a case that got as far
as starting Ray fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rayeff.cli import main

GOOD = """model: {name: tiny-bert}
data: {task: sst2, train_subset: 8}
method: {name: read}
training: {max_steps: 2, batch_size: 4}
"""
ROWS = "sentence\tlabel\n" + "".join(f"a good film {i}\t1\na dull film {i}\t0\n" for i in range(6))
STSB = "sentence1\tsentence2\tscore\n" + "a\tb\t1.5\nc\td\t4.0\n"


class World:
    """Files shared by the cases: a tiny GLUE folder, a job, a sweep, a plain file, broken model folders."""

    def __init__(self, root: Path):
        self.root = root
        self.glue = self.tasks("glue", {"SST-2": ROWS, "STS-B": STSB})
        self.job = self.write("job.yaml", GOOD)
        self.file = self.write("plain.txt", "just a file\n")
        space = self.write("space.yaml", "method: read\nparams:\n  training.lr: {type: float, low: 1.0e-4, "
                                         "high: 1.0e-2, log: true}\n")
        self.sweep = self.write("sweep.yaml", f"base_job: {self.job}\nsearch_space: {space}\nnum_trials: 2\n")
        self.existing = self.write("existing.json", '{"kept": true}\n')
        self.no_weights = root / "no-weights"
        self.no_weights.mkdir()
        (self.no_weights / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8,
                                                                 "num_hidden_layers": 1, "num_attention_heads": 2,
                                                                 "intermediate_size": 8}))
        self.no_tokenizer = root / "no-tokenizer"
        self.no_tokenizer.mkdir()
        (self.no_tokenizer / "config.json").write_text((self.no_weights / "config.json").read_text())
        (self.no_tokenizer / "model.safetensors").write_bytes(b"")
        self.bad_config = root / "bad-config"
        self.bad_config.mkdir()
        (self.bad_config / "config.json").write_text("{not json")
        (self.bad_config / "model.safetensors").write_bytes(b"")
        (self.bad_config / "tokenizer.json").write_text("{}")

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def tasks(self, name: str, files: dict[str, str | bytes]) -> Path:
        for folder, content in files.items():
            (self.root / name / folder).mkdir(parents=True, exist_ok=True)
            for split in ("train.tsv", "dev.tsv"):
                path = self.root / name / folder / split
                path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return self.root / name

    def job_with(self, name: str, text: str | bytes) -> str:
        return str(self.write(name, text))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("bad-input"))


def run(w: World, out: Path, job: str | Path | None = None, *extra: str, data: Path | None = None) -> list[str]:
    return ["run", str(job or w.job), "--data-dir", str(data or w.glue), "--output", str(out), "--no-progress",
            *extra]


def tune(w: World, out: Path, sweep: str | Path | None = None, *extra: str) -> list[str]:
    return ["tune", str(sweep or w.sweep), "--data-dir", str(w.glue), "--output", str(out), *extra]


def bench(w: World, out: Path, kind: str, *extra: str, output: Path | None = None, job: str | None = None
          ) -> list[str]:
    args = ["bench", kind, "--output", str(output or out.with_suffix(".json")), "--runs-dir", str(out), *extra]
    if kind == "priors":
        return args + ["--data-dir", str(w.glue)]
    return args + ["--job", str(job or w.job), "--data-dir", str(w.glue), "--no-progress"]


def zo_job(w: World) -> str:
    return w.job_with("zo.yaml", GOOD.replace("name: read", "name: adazeta, beta: 0.0, q_target: null"))


# (id, argv from (world, output folder), what the one line must name)
CASES = [
    # the job file
    ("job file is a folder", lambda w, o: run(w, o, w.glue), "is a folder, not a job file"),
    ("job file is a device", lambda w, o: run(w, o, "/dev/null"), "not a regular file"),
    ("job file in Latin-1", lambda w, o: run(w, o, w.job_with("latin1.yaml", (GOOD + "# caf\xe9\n").encode("latin-1"))),
     "the job file is not UTF-8 text (byte 0xe9 on line 5)"),
    ("job file in UTF-16", lambda w, o: run(w, o, w.job_with("utf16.yaml", GOOD.encode("utf-16"))), "UTF-16"),
    ("job file with NUL bytes", lambda w, o: run(w, o, w.job_with("nul.yaml", GOOD.encode() + b"\x00\x00")),
     "NUL bytes"),
    ("job file is a YAML list", lambda w, o: run(w, o, w.job_with("list.yaml", "- data\n- method\n")),
     "must be a YAML mapping"),
    ("job file with a python tag", lambda w, o: run(w, o, w.job_with("tag.yaml", "!!python/object/apply:os.system "
                                                                                  "['true']\n")), "not valid YAML"),
    ("unknown section", lambda w, o: run(w, o, w.job_with("unknown.yaml", GOOD + "schedule: {warmup: 3}\n")),
     "schedule"),
    # data
    ("--data-dir is a file", lambda w, o: run(w, o, data=w.file), "data.data_dir"),
    ("--data-dir with own data", lambda w, o: run(w, o, w.job_with("own.yaml", GOOD.replace(
        "task: sst2", f"train_file: {w.glue / 'SST-2' / 'train.tsv'}, dev_fraction: 0.25"))),
     "data_dir (from the job or --data-dir) is GLUE's folder; this job trains on its own data: leave it out"),
    ("train.tsv is a folder", lambda w, o: run(w, o, data=_folder_as_train(w)), "train.tsv is a folder"),
    ("train.tsv empty", lambda w, o: run(w, o, data=w.tasks("empty", {"SST-2": ""})), "train.tsv: the file is empty"),
    ("train.tsv header only", lambda w, o: run(w, o, data=w.tasks("header", {"SST-2": "sentence\tlabel\n"})),
     "train.tsv: no examples"),
    ("train.tsv in UTF-16", lambda w, o: run(w, o, data=w.tasks("utf16", {"SST-2": ROWS.encode("utf-16")})),
     "train.tsv: the GLUE SST-2 file is UTF-16"),
    ("train.tsv in Latin-1", lambda w, o: run(w, o, data=w.tasks("latin1", {"SST-2": (ROWS + "caf\xe9\t1\n")
                                                                              .encode("latin-1")})),
     "train.tsv: the GLUE SST-2 file is not UTF-8 text (byte 0xe9 on line 14)"),
    ("STS-B score not a number", lambda w, o: run(w, o, w.job_with("stsb.yaml", GOOD.replace("sst2", "stsb")),
                                                  data=w.tasks("stsb-bad", {"STS-B": STSB + "e\tf\tfive\n"})),
     "STS-B/train.tsv: score 'five' is not a number"),
    ("STS-B score nan", lambda w, o: run(w, o, w.job_with("stsb.yaml", GOOD.replace("sst2", "stsb")),
                                         data=w.tasks("stsb-nan", {"STS-B": STSB + "e\tf\tnan\n"})),
     "STS-B/train.tsv: a score is not finite"),
    ("data.cache_dir is a file", lambda w, o: run(w, o, None, "--set", f"data.cache_dir={w.file}"), "data.cache_dir"),
    ("data.data_dir with NUL", lambda w, o: ["run", w.job_with("nuldir.yaml", GOOD.replace(
        "train_subset: 8", 'train_subset: 8, data_dir: "a\\0b"')), "--output", str(o)], "data.data_dir"),
    # the output folder
    ("output under a file", lambda w, o: run(w, w.file / "out"), "output_dir"),
    ("output is a file", lambda w, o: run(w, w.file), "output_dir"),
    ("output name too long", lambda w, o: run(w, o.parent / ("x" * 300)), "longer than"),
    ("output in /proc", lambda w, o: run(w, Path("/proc/rayeff-test-out")), "output_dir: /proc/rayeff-test-out"),
    ("output_dir with NUL", lambda w, o: ["run", w.job_with("nulout.yaml", GOOD + 'output_dir: "a\\0b"\n'),
                                          "--data-dir", str(w.glue)], "output_dir"),
    # numbers that fail mid-run
    ("seed 2**40", lambda w, o: run(w, o, None, "--set", f"training.seed={2**40}"), "training.seed"),
    ("negative seed", lambda w, o: run(w, o, None, "--set", "training.seed=-1"), "training.seed"),
    ("zeroth-order seed 2**23", lambda w, o: run(w, o, zo_job(w), "--set", f"training.seed={2**23}"),
     "training.seed: 8388608 is too large for method adazeta"),
    ("zeroth-order steps 2**28", lambda w, o: run(w, o, zo_job(w), "--set", f"training.max_steps={2**28}"),
     "training.max_steps"),
    ("negative data seed", lambda w, o: run(w, o, None, "--set", "data.seed=-3"), "data.seed"),
    ("negative batch size", lambda w, o: run(w, o, None, "--set", "training.batch_size=-4"), "training.batch_size"),
    ("max_seq_length past the positions", lambda w, o: run(w, o, None, "--set", "training.max_seq_length=4096"),
     "training.max_seq_length: 4096 exceeds the 512 positions"),
    ("max_seq_length below the special tokens", lambda w, o: run(w, o, None, "--set", "training.max_seq_length=2"),
     "training.max_seq_length: 2 leaves no room"),
    ("GPUs this machine lacks", lambda w, o: run(w, o, None, "--set", "scaling.gpus_per_worker=64"),
     "scaling.gpus_per_worker"),
    # the model
    ("model folder with a broken config", lambda w, o: run(w, o, w.job_with("badcfg.yaml", GOOD.replace(
        "tiny-bert", str(w.bad_config)))), "its config cannot be read"),
    ("model folder without weights", lambda w, o: run(w, o, w.job_with("noweights.yaml", GOOD.replace(
        "tiny-bert", str(w.no_weights)))), "has no weights file"),
    ("model folder without tokenizer", lambda w, o: run(w, o, w.job_with("notok.yaml", GOOD.replace(
        "tiny-bert", str(w.no_tokenizer)))), "has no tokenizer file"),
    # sweeps
    ("sweep file is a folder", lambda w, o: tune(w, o, w.glue), "is a folder, not a sweep file"),
    ("sweep output under a file", lambda w, o: tune(w, w.file / "sweep"), "output_dir"),
    ("sweep searcher seed negative", lambda w, o: tune(w, o, None, "--set", "searcher.seed=-1"), "searcher.seed"),
    ("prior store under a file", lambda w, o: tune(w, o, None, "--set", f"priors.store={w.file}/p.db"),
     "priors.store"),
    ("prior store not a store", lambda w, o: tune(w, o, None, "--set", f"priors.store={w.file}"),
     "is not a rayeff prior store"),
    ("sweep base job in UTF-16", lambda w, o: tune(w, o, _sweep_of_utf16_job(w)), "UTF-16"),
    # benchmarks
    ("bench compare output exists", lambda w, o: bench(w, o, "compare", output=w.existing), "--overwrite"),
    ("bench zo output exists", lambda w, o: bench(w, o, "zo", output=w.existing, job=zo_job(w)), "--overwrite"),
    ("bench moe output exists", lambda w, o: bench(w, o, "moe", output=w.existing), "--overwrite"),
    ("bench priors output exists", lambda w, o: bench(w, o, "priors", output=w.existing), "--overwrite"),
    ("bench output is a folder", lambda w, o: bench(w, o, "compare", output=w.glue), "is a folder"),
    ("bench output in /proc", lambda w, o: bench(w, o, "compare", output=Path("/proc/rayeff-test.json")),
     "--output: /proc/rayeff-test.json"),
    ("bench runs-dir under a file", lambda w, o: bench(w, w.file / "runs", "compare",
                                                       output=o.with_suffix(".json")), "--runs-dir"),
    ("bench compare target full without full",
     lambda w, o: bench(w, o, "compare", "--methods", "read", "--target", "full", "--eval-every", "2"),
     "add full to --methods"),
    ("bench compare target without interval", lambda w, o: bench(w, o, "compare", "--target"),
     "--eval-every N"),
    ("bench compare target not a number", lambda w, o: bench(w, o, "compare", "--target", "high", "--eval-every",
                                                             "2"), "--target 'high'"),
    ("bench compare target nan", lambda w, o: bench(w, o, "compare", "--target", "nan", "--eval-every", "2"),
     "--target 'nan'"),
    ("bench compare eval every 0", lambda w, o: bench(w, o, "compare", "--target", "full", "--eval-every", "0"),
     "training.eval_every"),
    ("bench zo queries past the limit", lambda w, o: bench(w, o, "zo", "--queries", "5000", job=zo_job(w)),
     "--queries: 5000"),
    ("bench priors no seeds", lambda w, o: bench(w, o, "priors", "--seeds", ","), "--seeds"),
    ("bench priors seed 2**40", lambda w, o: bench(w, o, "priors", "--seeds", str(2**40)), "--seeds"),
    ("bench priors target fraction 0", lambda w, o: bench(w, o, "priors", "--target-fraction", "0"),
     "--target-fraction"),
]


def _sweep_of_utf16_job(w: World) -> str:
    base = w.job_with("base16.yaml", GOOD.encode("utf-16"))
    return w.job_with("sweep16.yaml", f"base_job: {base}\nsearch_space: {w.root / 'space.yaml'}\nnum_trials: 1\n")


def _folder_as_train(w: World) -> Path:
    data = w.tasks("folder-train", {"SST-2": ROWS})
    train = data / "SST-2" / "train.tsv"
    if train.is_file():
        train.unlink()
        train.mkdir()
    return data


@pytest.mark.parametrize("argv,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_before_ray_with_nothing_written(world, tmp_path, capsys, ray_calls, argv,
                                                                      needle):
    if needle == "scaling.gpus_per_worker" and torch.cuda.device_count() >= 64:
        pytest.skip("this machine has the GPUs")
    if "/proc" in needle and not Path("/proc/self").exists():
        pytest.skip("no /proc here")
    out = tmp_path / "out"
    kept = world.existing.read_bytes()
    code = main(argv(world, out))
    err = capsys.readouterr().err.strip()
    assert not ray_calls, "Ray was started"
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("rayeff: error: ") and needle in err, err
    assert not out.exists() and not out.with_suffix(".json").exists(), "something was written"
    assert world.existing.read_bytes() == kept


def test_the_same_inputs_made_valid_pass_every_check_and_reach_ray(world, tmp_path, capsys, ray_calls):
    """The control: a job file and GLUE files that start with a UTF-8 byte-order mark are valid; the run gets as far
    as starting Ray (which the test stops) with nothing written to its output folder yet."""
    bom = b"\xef\xbb\xbf"
    job = world.job_with("bom.yaml", bom + GOOD.encode())
    data = world.tasks("bom-glue", {"SST-2": bom + ROWS.encode()})
    out = tmp_path / "out"
    code = main(run(world, out, job, data=data))
    assert ray_calls and code == 1, capsys.readouterr().err
    assert not out.exists()


def test_bench_overwrite_replaces_an_existing_output_only_when_asked(world, tmp_path, capsys, ray_calls):
    output = tmp_path / "compare.json"
    output.write_text('{"earlier": "result"}')
    assert main(bench(world, tmp_path / "runs", "compare", "--methods", "read", output=output)) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert output.read_text() == '{"earlier": "result"}' and not ray_calls
    main(bench(world, tmp_path / "runs", "compare", "--methods", "read", "--overwrite", output=output))
    assert ray_calls, "with --overwrite the benchmark goes on to run"


HOLD_LOCK = """
import sys, time
from rayeff.cluster.storage import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""

RACE = """
import sys
from rayeff.cli import main
from rayeff.config import load_job
from rayeff.errors import UserError
from rayeff.train.runner import run_in_process
job = load_job(sys.argv[1], ["output_dir=" + sys.argv[2]])
try:
    run_in_process(job)
    print("proceeded")
except UserError as err:
    print("refused:", err)
"""


def test_one_command_per_output_folder_and_a_killed_holder_leaves_it_free(tmp_path, capsys, ray_calls, glue_dir):
    """Two runs on one folder, started together: exactly one proceeds, the other is refused with one line. A folder
    held by a command that is then killed (SIGKILL: no clean-up) is free again."""
    import subprocess
    import sys

    job = tmp_path / "job.yaml"
    job.write_text(GOOD.replace("train_subset: 8}", f"train_subset: 8, data_dir: {glue_dir}}}"))
    out = tmp_path / "out"
    racers = [subprocess.Popen([sys.executable, "-c", RACE, str(job), str(out)], stdout=subprocess.PIPE, text=True)
              for _ in range(2)]
    said = sorted(p.communicate(timeout=300)[0].strip().splitlines()[-1] for p in racers)
    assert said[0] == "proceeded" and said[1].startswith(f"refused: output_dir: {out} "), said
    # refused while the other runs, or (had it been slower to start) once the other's run is there
    assert "is in use by another rayeff run running now" in said[1] or "already holds a run" in said[1], said
    assert (out / "result.json").is_file()

    held = tmp_path / "held"   # (the lock lives in rayeff's cache folder, RAYEFF_CACHE, which the tests set)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(held)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    code = main(["run", str(job), "--output", str(held), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not ray_calls and len(err.splitlines()) == 1, err
    assert f"output_dir: {held} is in use by another rayeff run running now" in err
    assert not held.exists()   # nothing written
    holder.kill()
    holder.wait()
    from rayeff.config import load_job
    from rayeff.train.runner import run_in_process

    assert run_in_process(load_job(job, [f"output_dir={held}"]))["status"] == "finished"
