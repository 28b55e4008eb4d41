"""Your own data for classification and regression: every file form read alike, columns mapped to roles, label sets
inferred or given, a seeded held-out dev share, SST-2 from a JSONL file training exactly as the GLUE preset does,
and each way the data can be wrong a one-line error before Ray starts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from rayeff.cli import main
from rayeff.config import DataSpec, validate_job
from rayeff.data.glue import load_split
from rayeff.data.task import load_examples, task_of
from rayeff.data.tokenized import load_train_and_dev
from rayeff.errors import UserError
from rayeff.models import load_tokenizer, resolve_model
from rayeff.train.runner import run_in_process

RECORDS = [{"review": f"a {'fine' if i % 3 else 'dull'} film, take {i}", "stars": ["neg", "pos", "mid"][i % 3],
            "note": f"note {i}"} for i in range(30)]


def write(path: Path, records: list[dict]) -> Path:
    """`records` in the form `path`'s suffix names (a folder without suffix: datasets' save_to_disk)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records, indent=1))
    elif path.suffix in (".csv", ".tsv"):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]), delimiter="\t" if path.suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(records)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        import datasets

        datasets.Dataset.from_list(records).save_to_disk(str(path))
    return path


def own(train: Path, **fields) -> DataSpec:
    return DataSpec(train_file=str(train), **{"columns": {"text": "review", "label": "stars"}, **fields})


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".parquet", ""])
def test_every_file_form_reads_the_same_examples(tmp_path, suffix):
    train, dev = write(tmp_path / f"train{suffix}", RECORDS), write(tmp_path / f"dev{suffix}", RECORDS[:7])
    spec = own(train, dev_file=str(dev))
    task = task_of(spec)
    assert task.labels == ("mid", "neg", "pos") and task.text_fields == 1 and task.metrics[0] == "accuracy"
    assert task.name == "train"
    examples = load_examples(spec, "train")
    assert examples["text_a"] == [r["review"] for r in RECORDS] and examples["text_b"] is None
    assert examples["label"] == [task.labels.index(r["stars"]) for r in RECORDS]
    assert load_examples(spec, "dev")["label"] == examples["label"][:7]


def test_a_saved_dataset_dict_gives_its_train_and_validation_splits(tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS),
                          "validation": datasets.Dataset.from_list(RECORDS[5:9])}).save_to_disk(str(folder))
    spec = own(folder, dev_file=str(folder))
    assert load_examples(spec, "dev")["text_a"] == [r["review"] for r in RECORDS[5:9]]
    assert len(load_examples(spec, "train")["text_a"]) == len(RECORDS)


def test_a_dataset_that_load_dataset_reads_gives_its_splits_as_your_files_do(tmp_path):
    """data.dataset takes what datasets.load_dataset takes: a hub id (the hub is not reachable here) or a local
    folder of data files; its splits read as the same examples as the files, and its tokenised cache is keyed by
    the splits' content."""
    from rayeff.data import files as data_files

    folder = tmp_path / "reviews"
    write(folder / "train.jsonl", RECORDS[:24])
    write(folder / "validation.jsonl", RECORDS[24:])
    columns = {"text": "review", "label": "stars"}
    spec = DataSpec(dataset=str(folder), dev_split="validation", columns=columns, cache_dir=str(tmp_path / "cache"))
    files = own(folder / "train.jsonl", dev_file=str(folder / "validation.jsonl"), cache_dir=str(tmp_path / "cache"))
    assert task_of(spec).name == "reviews" and task_of(spec).labels == task_of(files).labels
    for split in ("train", "dev"):
        assert load_examples(spec, split) == load_examples(files, split)
    held_out = DataSpec(dataset=str(folder), dev_fraction=0.25, columns=columns)
    assert len(load_examples(held_out, "dev")["label"]) == 6
    tokenizer = load_tokenizer(resolve_model("tiny-bert"))
    train, dev = load_train_and_dev(spec, tokenizer, 32)
    assert train["input_ids"] == load_train_and_dev(files, tokenizer, 32)[0]["input_ids"] and len(dev) == 6
    write(folder / "validation.jsonl", RECORDS[25:])   # new content, a new cache entry
    data_files._load_dataset.cache_clear()
    data_files._split_columns.cache_clear()
    assert len(load_train_and_dev(spec, tokenizer, 32)[1]) == 5


def test_labels_are_sorted_numerically_or_taken_in_the_order_data_labels_gives(tmp_path):
    numbers = [{"text": f"t{i}", "label": n} for i, n in enumerate([10, 2, 1, 2])]
    as_json = own(write(tmp_path / "n.jsonl", numbers), dev_fraction=0.25, columns={})
    as_csv = own(write(tmp_path / "n.csv", numbers), dev_fraction=0.25, columns={})
    assert task_of(as_json).labels == task_of(as_csv).labels == ("1", "2", "10")   # not "1", "10", "2"
    flags = [{"text": f"t{i}", "label": i % 2 == 0} for i in range(4)]
    assert task_of(own(write(tmp_path / "b.jsonl", flags), dev_fraction=0.25, columns={})).labels == \
        task_of(own(write(tmp_path / "b.csv", flags), dev_fraction=0.25, columns={})).labels == ("false", "true")
    assert load_examples(as_json, "train")["label"] == load_examples(as_csv, "train")["label"]
    given = own(write(tmp_path / "t.jsonl", RECORDS), dev_fraction=0.2, labels=["pos", "neg", "mid"])
    examples = load_examples(given, "train")
    assert task_of(given).labels == ("pos", "neg", "mid")
    texts = {r["review"]: r["stars"] for r in RECORDS}
    assert all(["pos", "neg", "mid"][y] == texts[t] for t, y in zip(examples["text_a"], examples["label"]))


def test_dev_fraction_holds_out_a_seeded_share_that_train_never_sees(tmp_path):
    train = write(tmp_path / "t.jsonl", RECORDS)
    dev_a, train_a = (load_examples(own(train, dev_fraction=0.2), s)["text_a"] for s in ("dev", "train"))
    assert len(dev_a) == 6 and len(train_a) == 24 and not set(dev_a) & set(train_a)
    assert sorted(dev_a + train_a) == sorted(r["review"] for r in RECORDS)
    assert load_examples(own(train, dev_fraction=0.2), "dev")["text_a"] == dev_a        # the same seed, the same share
    assert load_examples(own(train, dev_fraction=0.2, seed=1), "dev")["text_a"] != dev_a


def test_tsv_quotes_are_text_as_in_glue_and_csv_quotes_are_quoting(tmp_path):
    """A TSV has no quoting (QNLI's dev.tsv has fields that open with a quote and end elsewhere); a CSV field may be
    quoted to hold the delimiter; a TSV row with a field too many names the fix."""
    (tmp_path / "q.tsv").write_text('review\tstars\n"quoted" start, and "more\tpos\nplain\tneg\n')
    read = load_examples(own(tmp_path / "q.tsv", dev_fraction=0.5, seed=0), "train")["text_a"] + \
        load_examples(own(tmp_path / "q.tsv", dev_fraction=0.5, seed=0), "dev")["text_a"]
    assert sorted(read) == ['"quoted" start, and "more', "plain"]
    (tmp_path / "q.csv").write_text('review,stars\n"a, b",pos\nc,neg\n')
    assert load_examples(own(tmp_path / "q.csv", dev_file=str(tmp_path / "q.csv")), "dev")["text_a"] == ["a, b", "c"]
    (tmp_path / "wide.tsv").write_text("review\tstars\na\tb\tpos\n")
    with pytest.raises(UserError, match="line 2: 3 fields but the header names 2; a TSV field cannot hold a tab"):
        load_examples(own(tmp_path / "wide.tsv", dev_fraction=0.5), "train")


def test_a_text_pair_column_and_k_shot_sampling(tmp_path):
    spec = own(write(tmp_path / "t.parquet", RECORDS), dev_fraction=0.1, k_shot=4,
               columns={"text": "review", "text_pair": "note", "label": "stars"})
    assert task_of(spec).text_fields == 2
    tokenizer = load_tokenizer(resolve_model("tiny-bert"))
    train, dev = load_train_and_dev(spec, tokenizer, 64)
    assert sorted(train["label"]) == [0] * 4 + [1] * 4 + [2] * 4 and len(dev) == 3
    assert tokenizer.sep_token_id in train[0]["input_ids"][1:-1]   # the pair is joined with a separator


@pytest.mark.slow
def test_sst2_from_a_jsonl_file_trains_exactly_as_the_glue_preset_on_minilm(tmp_path, glue_dir):
    """READ, 1 epoch on a 96-example subset: the same examples, tokens, draws and so the same run."""
    for split in ("train", "dev"):
        examples = load_split("sst2", split, glue_dir)
        write(tmp_path / f"sst2-{split}.jsonl", [{"sentence": t, "polarity": y}
                                                 for t, y in zip(examples["text_a"], examples["label"])])
    common = {"model": {"name": "minilm-l6"}, "method": {"name": "read"},
              "training": {"epochs": 1, "batch_size": 16, "log_every": 1}}
    sampling = {"train_subset": 96, "eval_subset": 64}
    preset = run_in_process(validate_job({**common, "output_dir": str(tmp_path / "preset"),
                                          "data": {"task": "sst2", "data_dir": str(glue_dir), **sampling}}))
    mine = run_in_process(validate_job({**common, "output_dir": str(tmp_path / "mine"), "data": {
        "train_file": str(tmp_path / "sst2-train.jsonl"), "dev_file": str(tmp_path / "sst2-dev.jsonl"),
        "columns": {"text": "sentence", "label": "polarity"}, "name": "my-sst2", **sampling}}))
    assert mine["metrics"]["accuracy"] == preset["metrics"]["accuracy"]
    assert mine["loss_history"] == preset["loss_history"] and len(mine["loss_history"]) == 6
    assert mine["task"] == "my-sst2" and set(mine["metrics"]) == {"accuracy", "macro_f1"}


def test_regression_on_your_own_csv_trains_and_reports_correlations(tmp_path):
    rows = [{"a": f"first {i}", "b": f"second {i % 5}", "score": str(i % 5 * 0.5)} for i in range(10)]
    result = run_in_process(validate_job({
        "model": {"name": "tiny-bert"}, "method": {"name": "full"}, "output_dir": str(tmp_path / "out"),
        "data": {"train_file": str(write(tmp_path / "pairs.csv", rows)), "dev_fraction": 0.25,
                 "task_type": "regression", "columns": {"text": "a", "text_pair": "b", "label": "score"}},
        "training": {"max_steps": 8, "batch_size": 8, "lr": 1e-3, "log_every": 1}}))   # one batch: all 8 train rows
    assert set(result["metrics"]) == {"pearson", "spearmanr"} and result["task"] == "pairs"
    assert result["loss_history"][-1] < result["loss_history"][0]


def _case(tmp_path: Path, name: str) -> tuple[str, str]:
    """A job whose data is wrong in the way `name` says, and the words its one-line error must hold."""
    good = write(tmp_path / "good.jsonl", RECORDS)
    data = {"train_file": str(good), "dev_fraction": 0.2, "columns": {"text": "review", "label": "stars"}}
    needle = None
    if name == "missing column":
        data["columns"] = {"text": "body", "label": "stars"}
        needle = "data.columns.text: data.train_file"
    elif name == "empty split":
        (tmp_path / "empty.jsonl").write_text("\n")
        data = {**data, "dev_fraction": None, "dev_file": str(tmp_path / "empty.jsonl")}
        needle = "holds no examples"
    elif name == "label outside the label set":
        data = {**data, "dev_fraction": None, "dev_file": str(write(tmp_path / "dev.jsonl", [
            {"review": "fine", "stars": "pos"}, {"review": "odd", "stars": "great"}]))}
        needle = "example 2: label 'great' is not in the label set [mid, neg, pos]"
    elif name == "malformed json line":
        (tmp_path / "bad.jsonl").write_text(json.dumps(RECORDS[0]) + "\n{review: 1}\n")
        data["train_file"] = str(tmp_path / "bad.jsonl")
        needle = "bad.jsonl line 2: not valid JSON"
    elif name == "unknown format":
        (tmp_path / "data.xlsx").write_text("x")
        data["train_file"] = str(tmp_path / "data.xlsx")
        needle = "unknown format '.xlsx'"
    elif name == "missing file":
        data["train_file"] = str(tmp_path / "nowhere.jsonl")
        needle = "data.train_file: " + str(tmp_path / "nowhere.jsonl") + " not found"
    elif name == "no dev":
        data["dev_fraction"] = None
        needle = "set dev_file or dev_fraction"
    elif name == "task and train_file":
        data["task"] = "sst2"
        needle = "set one of task (a GLUE preset such as sst2), train_file (your own file) or dataset"
    elif name == "a hub dataset offline":
        data = {"dataset": "stanfordnlp/imdb", "dev_split": "test", "columns": data["columns"]}
        needle = "data.dataset: 'stanfordnlp/imdb' is not a local folder and the Hugging Face hub cannot be reached"
    elif name == "a split the dataset lacks":
        folder = tmp_path / "dataset"
        write(folder / "train.jsonl", RECORDS)
        data = {"dataset": str(folder), "dev_split": "validation", "columns": data["columns"]}
        needle = f"data.dev_split: {folder} has no split 'validation' (its splits: train)"
    elif name == "a text that is not text":
        data["train_file"] = str(write(tmp_path / "null.jsonl", [*RECORDS[:3], {"review": None, "stars": "pos"}]))
        needle = "example 4: its text is None, not text"
    elif name == "one label":
        data["train_file"] = str(write(tmp_path / "one.jsonl", [{"review": "x", "stars": "pos"}] * 4))
        needle = "has one label ('pos') only"
    elif name == "regression label not a number":
        data = {**data, "task_type": "regression"}
        needle = "example 1: label 'neg' is not a finite number"
    job = {"model": {"name": "tiny-bert"}, "data": {k: v for k, v in data.items() if v is not None},
           "method": {"name": "read"}, "training": {"max_steps": 2, "batch_size": 4}}
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(job))
    return str(path), needle


@pytest.mark.parametrize("name", ["missing column", "empty split", "label outside the label set",
                                  "malformed json line", "unknown format", "missing file", "no dev",
                                  "task and train_file", "a text that is not text", "one label",
                                  "regression label not a number", "a hub dataset offline",
                                  "a split the dataset lacks"])
def test_bad_own_data_is_one_line_exit_2_before_ray_with_nothing_written(tmp_path, capsys, ray_calls, monkeypatch,
                                                                         name):
    from rayeff.hub import hub_reachable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")   # as on this machine, whatever the one running the tests can reach
    hub_reachable.cache_clear()
    job, needle = _case(tmp_path, name)
    out = tmp_path / "out"
    code = main(["run", job, "--output", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert not ray_calls, "Ray was started"
    assert code == 2 and len(err.splitlines()) == 1, err
    assert needle in err, err
    assert not out.exists()
