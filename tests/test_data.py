"""GLUE loading (directory layout for all nine tasks, hub failure), sampling, tokenised cache, metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rayeff.config import DataSpec
from rayeff.data.glue import TASKS, get_task, load_split
from rayeff.data.metrics import compute_metrics
from rayeff.data.tokenized import load_train_and_dev, sample_indices, tokenized_split
from rayeff.errors import UserError
from rayeff.models import load_tokenizer, resolve_model


def test_shared_glue_files_load_with_official_row_counts(glue_dir):
    expected = {("sst2", "train"): 67349, ("sst2", "dev"): 872, ("rte", "train"): 2490, ("rte", "dev"): 277,
                ("stsb", "train"): 5749, ("stsb", "dev"): 1500, ("wnli", "train"): 635, ("qnli", "dev"): 5463}
    for (task, split), rows in expected.items():
        data = load_split(task, split, glue_dir)
        assert len(data["label"]) == rows, (task, split)
        assert len(data["text_a"]) == rows
    rte = load_split("rte", "dev", glue_dir)
    assert set(rte["label"]) == {0, 1} and len(rte["text_b"]) == 277
    # the first two rows of RTE's dev.tsv: sentence2 is text_b, not_entailment is 1 and entailment 0
    assert rte["text_b"][:2] == ["Christopher Reeve had an accident.",
                                 "Bacteria is winning the war against antibiotics."]
    assert rte["label"][:2] == [1, 0] and rte["text_a"][0].startswith("Dana Reeve, the widow of the actor")
    assert isinstance(load_split("stsb", "dev", glue_dir)["label"][0], float)
    assert load_split("sst2", "dev", glue_dir)["text_b"] is None


# One tiny file per task in GLUE's download layout, with the header (or none, for CoLA) GLUE ships.
SYNTHETIC = {
    "CoLA/train.tsv": "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\ngj04\t0\t*\tThe more books.\n",
    "MRPC/train.tsv": "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tA cat sat.\tA cat was sitting.\n"
                      "0\t3\t4\tIt rains.\tStocks fell.\n",
    "QQP/train.tsv": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n0\t1\t2\tHow?\tHow so?\t1\n"
                     "1\t3\t4\tWhy?\tWhen?\t0\nbroken line\n",
    "MNLI/train.tsv": "index\tpromptID\tpairID\tgenre\ts1b\ts2b\ts1p\ts2p\tsentence1\tsentence2\tlabel1\tgold_label\n"
                      "0\t1\t1\tfic\t-\t-\t-\t-\tA man eats.\tSomeone eats.\tentailment\tentailment\n"
                      "1\t2\t2\tfic\t-\t-\t-\t-\tA man eats.\tNobody eats.\tcontradiction\tcontradiction\n"
                      "2\t3\t3\tfic\t-\t-\t-\t-\tA man eats.\tHe is hungry.\tneutral\tneutral\n",
}


@pytest.fixture
def synthetic_glue(tmp_path):
    for rel, text in SYNTHETIC.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        dev = {"MNLI": ["dev_matched.tsv", "dev_mismatched.tsv"]}.get(path.parent.name, ["dev.tsv"])
        for name in dev:
            (path.parent / name).write_text(text)
    return tmp_path


def test_every_task_layout_parses(synthetic_glue, glue_dir):
    cola = load_split("cola", "train", synthetic_glue)
    assert cola["label"] == [1, 0] and cola["text_a"][1] == "The more books."
    mrpc = load_split("mrpc", "dev", synthetic_glue)
    assert mrpc["label"] == [1, 0] and mrpc["text_b"][0] == "A cat was sitting."
    qqp = load_split("qqp", "train", synthetic_glue)
    assert qqp["label"] == [1, 0]  # the broken line is dropped, as GLUE does
    assert load_split("mnli", "dev", synthetic_glue)["label"] == [0, 2, 1]
    assert load_split("mnli-mm", "dev", synthetic_glue)["label"] == [0, 2, 1]
    assert set(TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "mnli-mm", "qnli", "rte", "wnli"}


def test_missing_task_files_name_the_file(tmp_path):
    (tmp_path / "SST-2").mkdir()
    with pytest.raises(UserError, match=r"SST-2/train.tsv not found"):
        load_split("sst2", "train", tmp_path)


def test_unreachable_hub_is_a_clear_error_at_once(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from rayeff.hub import hub_reachable

    hub_reachable.cache_clear()
    with pytest.raises(UserError, match="--data-dir"):
        load_split("sst2", "dev", None)
    hub_reachable.cache_clear()


def test_subset_and_k_shot_are_seeded_and_sized():
    labels = [i % 3 for i in range(300)]
    a = sample_indices(labels, DataSpec(task="sst2", train_subset=50, seed=1), False)
    b = sample_indices(labels, DataSpec(task="sst2", train_subset=50, seed=1), False)
    c = sample_indices(labels, DataSpec(task="sst2", train_subset=50, seed=2), False)
    assert len(a) == 50 and len(set(a.tolist())) == 50 and np.array_equal(a, b) and not np.array_equal(a, c)
    k = sample_indices(labels, DataSpec(task="sst2", k_shot=16, seed=0), False)
    assert np.bincount(np.asarray(labels)[k]).tolist() == [16, 16, 16]
    with pytest.raises(ValueError, match="k_shot"):
        sample_indices([0.5, 1.0], DataSpec(task="stsb", k_shot=2), True)


def test_tokenised_cache_is_keyed_and_reused(glue_dir):
    tokenizer = load_tokenizer(resolve_model("minilm-l6"))
    spec = DataSpec(task="rte", data_dir=str(glue_dir))
    first = tokenized_split(spec, "dev", tokenizer, 64)
    again = tokenized_split(spec, "dev", tokenizer, 64)
    assert first.cache_files[0]["filename"] == again.cache_files[0]["filename"]
    longer = tokenized_split(spec, "dev", tokenizer, 128)
    assert longer.cache_files[0]["filename"] != first.cache_files[0]["filename"]
    assert max(len(x) for x in first["input_ids"]) == 64 < max(len(x) for x in longer["input_ids"])
    train, dev = load_train_and_dev(DataSpec(task="rte", data_dir=str(glue_dir), k_shot=4, eval_subset=10),
                                    tokenizer, 64)
    assert sorted(train["label"]) == [0, 0, 0, 0, 1, 1, 1, 1] and len(dev) == 10


def test_metrics_match_hand_computed_values():
    assert compute_metrics(get_task("sst2").metrics, [1, 0, 1, 1], [1, 0, 0, 1]) == {"accuracy": 0.75}
    # MRPC: tp=2, fp=1, fn=1 -> precision = recall = 2/3, F1 = 2/3
    m = compute_metrics(get_task("mrpc").metrics, [1, 1, 1, 0, 0], [1, 1, 0, 1, 0])
    assert m["f1"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(0.6)
    # CoLA: tp=2, tn=1, fp=1, fn=0 -> MCC = (2*1 - 1*0) / sqrt(3*2*1*2)
    assert compute_metrics(get_task("cola").metrics, [1, 1, 1, 0], [1, 1, 0, 0])["matthews_correlation"] == \
        pytest.approx(2 / math.sqrt(12))
    s = compute_metrics(get_task("stsb").metrics, [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 9.0])
    assert s["spearmanr"] == pytest.approx(1.0) and 0.98 < s["pearson"] < 1.0


def test_a_utf8_byte_order_mark_is_accepted(synthetic_glue):
    """GLUE's own MRPC download starts with a UTF-8 byte-order mark; read naively it glues itself to the first header
    name ("\\ufeffQuality") and the label column goes missing."""
    for name in ("train.tsv", "dev.tsv"):
        path = synthetic_glue / "MRPC" / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    mrpc = load_split("mrpc", "train", synthetic_glue)
    assert mrpc["label"] == [1, 0] and mrpc["text_a"][0] == "A cat sat."
    cola = synthetic_glue / "CoLA" / "train.tsv"   # headerless: the mark must not end up in the first cell either
    cola.write_bytes(b"\xef\xbb\xbf" + cola.read_bytes())
    assert load_split("cola", "train", synthetic_glue)["label"] == [1, 0]


@pytest.mark.parametrize("encoding,says", [("utf-16", "is UTF-16 text"), ("utf-16-le", "holds NUL bytes"),
                                           ("latin-1", "is not UTF-8 text (byte 0xe9 on line 2)")])
def test_a_file_in_another_encoding_is_one_line_naming_it(synthetic_glue, encoding, says):
    path = synthetic_glue / "MRPC" / "train.tsv"
    path.write_bytes(SYNTHETIC["MRPC/train.tsv"].replace("A cat sat.", "Un caf\xe9.").encode(encoding))
    with pytest.raises(UserError) as err:
        load_split("mrpc", "train", synthetic_glue)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and says in message and "UTF-8" in message
    assert len(message.splitlines()) == 1


def test_every_worker_gets_dev_examples_even_when_they_are_fewer_than_the_workers():
    from rayeff.train.state import epoch_order

    assert [epoch_order(1, r, 4, 0, 0, shuffle=False) for r in range(4)] == [[0], [0], [0], [0]]
    assert [epoch_order(5, r, 4, 0, 0, shuffle=False) for r in range(4)] == [[0, 4], [1, 0], [2, 1], [3, 2]]
    assert [epoch_order(3, r, 2, 0, 0, shuffle=False) for r in range(2)] == [[0, 2], [1, 0]]
