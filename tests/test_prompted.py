"""Prompted classification (data.task_type: prompted_classification), the MeZO / LM-BFF setting: a template turns
each example into a prompt and the LM head scores each label's words, at the next token for a decoder and at the
mask token for a masked LM. The label logits are the language model's own logits of those words; every method
trains it (loss falls) on tiny decoders and a tiny masked LM; READ starts as the frozen model; and what cannot work
is a one-line error before Ray starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rayeff.config import DataSpec, validate_job
from rayeff.data.task import load_examples, task_of
from rayeff.data.tokenized import Collator, label_word_ids, load_train_and_dev, prompt_ids, scoring_of
from rayeff.models import load_tokenizer, resolve_model
from rayeff.train.run_setup import build_base
from rayeff.train.runner import run_in_process

ADJECTIVES = {"pos": ["good", "fine", "great", "nice"], "neg": ["bad", "poor", "awful", "dull"]}
REVIEWS = [{"review": f"the {thing} was {word}", "sentiment": label}
           for label, words in ADJECTIVES.items() for word in words
           for thing in ("film", "plot twist", "cast", "story of the film")]
WORDS = {"pos": "yes", "neg": "no"}


@pytest.fixture
def reviews(tmp_path) -> Path:
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in REVIEWS))
    return path


def prompted_data(path: Path, template: str = "{text} Was it good? {mask}", **fields) -> dict:
    return {"train_file": str(path), "dev_fraction": 0.25, "task_type": "prompted_classification",
            "columns": {"text": "review", "label": "sentiment"}, "template": template, "label_words": WORDS,
            **fields}


def built(model: str, data: dict, method: dict | None = None):
    job = validate_job({"model": {"name": model}, "method": method or {"name": "full"}, "data": data})
    source = resolve_model(model)
    tokenizer = load_tokenizer(source)
    torch.manual_seed(0)
    lm, base = build_base(source, task_of(job.data), job, tokenizer)
    train, _ = load_train_and_dev(job.data, tokenizer, 64, scoring_of(job.data, source))
    collate = Collator(tokenizer.pad_token_id, 64, False, False, False)
    return lm.eval(), base.eval(), collate([dict(train[i], index=i) for i in range(5)]), tokenizer


def test_the_template_fills_each_prompt_and_the_labels_are_classes(reviews):
    examples = load_examples(DataSpec(**prompted_data(reviews, dev_fraction=None, dev_file=str(reviews))), "dev")
    assert examples["prompt"][0] == "the film was good Was it good? \ue000"
    assert examples["label"][:1] + examples["label"][-1:] == [1, 0]   # labels sorted: neg, pos


def test_a_decoders_label_logits_are_its_next_token_logits_of_the_label_words(reviews):
    """Right-padded rows of different lengths: each row's label logits are the causal LM's own logits (Hugging Face's
    AutoModelForCausalLM, run on the unpadded row) for the label words at the prompt's last token."""
    lm, base, batch, tokenizer = built("tiny-llama", prompted_data(reviews))
    words = [ids[0] for ids in label_word_ids(tokenizer, task_of(DataSpec(**prompted_data(reviews))))]
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1   # padding differs between rows
    with torch.no_grad():
        logits = base(**batch)
        for row in range(len(batch["input_ids"])):
            n = int(batch["attention_mask"][row].sum())
            own = lm(input_ids=batch["input_ids"][row:row + 1, :n]).logits[0, -1, words]
            torch.testing.assert_close(logits[row], own, rtol=1e-5, atol=1e-5)
    assert tokenizer.decode(batch["input_ids"][0][:int(batch["attention_mask"][0].sum())]) == \
        "the film was good was it good?"   # {mask} ends the prompt: the label word comes next


def test_a_masked_lms_label_logits_are_its_logits_at_the_mask_and_several_words_add_their_probability(reviews):
    data = prompted_data(reviews, template="{text}. It was {mask}!", label_words={"pos": ["yes", "good"],
                                                                                 "neg": "no"})
    lm, base, batch, tokenizer = built("tiny-bert", data)
    mask_at = (batch["input_ids"] == tokenizer.mask_token_id).nonzero()
    assert mask_at[:, 0].tolist() == list(range(5))   # one mask per row
    yes, good, no = (tokenizer.convert_tokens_to_ids(w) for w in ("yes", "good", "no"))
    with torch.no_grad():
        logits = base(**batch)
        full = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    at_mask = full[mask_at[:, 0], mask_at[:, 1]]
    torch.testing.assert_close(logits[:, 0], at_mask[:, no], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[:, 1], at_mask[:, [yes, good]].logsumexp(-1), rtol=1e-5, atol=1e-5)
    assert tokenizer.decode(batch["input_ids"][0][:int(batch["attention_mask"][0].sum())]) == \
        "[CLS] the film was good. it was [MASK]! [SEP]"


@pytest.mark.parametrize("scoring,expected", [
    ("next_token", ["e", "f", "g", "h", "i", "j", "k"]),                  # the start goes (there is no BOS here)
    ("mask", ["[CLS]", "j", "k", "[MASK]", "x", "y", "z", "[SEP]"]),     # the start, then nothing after the mask
])
def test_a_prompt_too_long_loses_its_start_and_keeps_the_scored_position(scoring, expected):
    tokenizer = load_tokenizer(resolve_model("tiny-bert"))
    prompt = "a b c d e f g h i j k \ue000" + (" x y z" if scoring == "mask" else "")
    assert tokenizer.convert_ids_to_tokens(prompt_ids(prompt, tokenizer, 8 - (scoring == "next_token"), scoring)) \
        == expected
    long_tail = "a \ue000 " + " ".join("uvwxyz")   # all the text before the mask goes, then the end of the rest
    assert tokenizer.convert_ids_to_tokens(prompt_ids(long_tail, tokenizer, 6, "mask")) == \
        ["[CLS]", "[MASK]", "u", "v", "w", "[SEP]"]


def test_read_on_a_prompted_decoder_starts_as_the_model_and_trains_only_its_side_network(reviews):
    from rayeff.methods import get_method
    from rayeff.methods.read import ReadConfig

    _, base, batch, _ = built("tiny-llama", prompted_data(reviews))
    with torch.no_grad():
        plain = base(**batch)
    model = get_method("read").build(base, ReadConfig(hidden_size=8)).train()
    logits = model(**batch)
    assert torch.equal(logits, plain)
    torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
    assert all(p.grad is None for p in base.parameters())
    assert torch.count_nonzero(model.side.out.weight.grad) > 0


EVERY_METHOD = [  # (model, method section, lr)
    *[("tiny-llama", method, lr) for method, lr in [
        ({"name": "full"}, 1e-2), ({"name": "lora"}, 2e-2), ({"name": "read", "hidden_size": 16}, 2e-2),
        ({"name": "adazeta", "q_target": 2, "q_max": 4, "bottleneck": 16, "tt_rank": 3}, 1e-2),
        ({"name": "mezo"}, 1e-2), ({"name": "mezo", "target": "lora"}, 1e-1)]],
    ("tiny-mixtral", {"name": "moe"}, 1e-2),
    ("tiny-gpt2", {"name": "lora"}, 2e-2),
    ("tiny-bert", {"name": "read", "hidden_size": 16}, 2e-2),
    ("tiny-bert", {"name": "full"}, 1e-2),
]


def test_every_registered_method_trains_prompted_classification_here():
    from rayeff.methods import METHODS

    assert {m["name"] for _, m, _ in EVERY_METHOD} == set(METHODS)
    assert all("prompted_classification" in d.task_types for d in METHODS.values())


@pytest.mark.parametrize("model,method,lr", EVERY_METHOD,
                         ids=[f"{m['name']}{'-' + m['target'] if 'target' in m else ''}-{model}"
                              for model, m, _ in EVERY_METHOD])
def test_every_method_lowers_the_prompted_loss(tmp_path, reviews, model, method, lr):
    template = "{text}. It was {mask}!" if model == "tiny-bert" else "{text} Was it good? {mask}"
    zeroth_order = method["name"] in ("adazeta", "mezo")
    result = run_in_process(validate_job({
        "model": {"name": model}, "method": method, "output_dir": str(tmp_path / "out"),
        "data": prompted_data(reviews, template=template, train_subset=8),   # one batch, every step: its loss falls
        "training": {"max_steps": 30 if zeroth_order else 12, "batch_size": 8, "lr": lr, "log_every": 4}}))
    losses, steps = result["loss_history"], result["step_losses"]
    assert losses[-1] < losses[0] - 0.02, losses   # the mean of the last 4 steps against the first 4
    assert result["loss_history_steps"] == ([4, 8, 12, 16, 20, 24, 28, 30] if zeroth_order else [4, 8, 12])
    assert losses[1] == pytest.approx(sum(steps[4:8]) / 4, rel=1e-12) and len(steps) == (30 if zeroth_order else 12)
    assert set(result["metrics"]) == {"accuracy", "macro_f1"}
    memory = result["memory"]
    if method["name"] in ("lora", "read", "adazeta") or method.get("target") == "lora":
        assert memory["trainable_params"] < 0.05 * memory["total_params"]   # the LM head stays frozen


@pytest.mark.parametrize("model,data,needle", [
    ("tiny-llama", {"label_words": {"pos": "yes"}}, "data.label_words: label 'neg' has no word"),
    ("tiny-llama", {"label_words": {"pos": "yes", "neg": "no", "meh": "so"}}, "data.label_words: 'meh' is not a "
                                                                                 "label"),
    ("tiny-llama", {"label_words": {"pos": "yes", "neg": "unbelievably"}}, "data.label_words: 'unbelievably' (label "
                                                                             "neg) is 5 tokens"),
    ("tiny-llama", {"label_words": {"pos": "yes", "neg": "yes"}}, "two labels share a word"),
    ("tiny-llama", {"template": "{text} It was {mask}."}, "has text after {mask}; a decoder predicts the label word"),
    ("tiny-llama", {"template": "{review} {stars} {mask}"}, "data.template names 'stars', which data.train_file"),
    ("tiny-bert", {"template": "{text} It was"}, "has no {mask}; a masked LM scores the label words at its mask"),
    ("tiny-t5", {}, "t5 is an encoder-decoder"),
    ("tiny-llama", {"template": "{mask} {text} {mask}"}, "data.template: {mask} appears more than once"),
    ("tiny-llama", {"label_words": None}, "set label_words"),
    ("tiny-llama", {"template": None}, "set template"),
])
def test_what_cannot_work_is_one_line_exit_2_before_ray(reviews, refused_run, model, data, needle):
    err = refused_run({"model": {"name": model}, "method": {"name": "lora"},
                       "training": {"max_steps": 2, "batch_size": 4},
                       "data": {k: v for k, v in {**prompted_data(reviews), **data}.items() if v is not None}})
    assert needle in err, err


def test_a_masked_lm_saved_without_its_head_is_refused_and_one_saved_with_it_is_not(tmp_path, reviews, refused_run):
    """The pip-installed MiniLM was saved as a bare encoder: its masked-LM head would start random."""
    from transformers import AutoModelForMaskedLM

    from rayeff.models import tiny_config
    from rayeff.train.preflight import missing_head_weights

    data = prompted_data(reviews, template="{text} It was {mask}.")
    err = refused_run({"model": {"name": "minilm-l6"}, "method": {"name": "full"}, "data": data,
                       "training": {"max_steps": 2, "batch_size": 4}})
    assert "model.name: minilm-l6 has no pretrained masked-LM head (cls.predictions.bias and 4 more" in err, err
    folder = tmp_path / "bert-with-head"
    AutoModelForMaskedLM.from_config(tiny_config(resolve_model("tiny-bert"))).save_pretrained(folder)
    load_tokenizer(resolve_model("tiny-bert")).save_pretrained(folder)
    assert missing_head_weights(resolve_model(str(folder))) == []
    from safetensors.torch import load_file, save_file   # old BERT checkpoints name LayerNorm's weights gamma/beta

    weights = load_file(str(folder / "model.safetensors"))
    save_file({k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in weights.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert missing_head_weights(resolve_model(str(folder))) == []
    assert missing_head_weights(resolve_model("minilm-l6"))[1:] == [
        "cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
        "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias"]


def test_a_prompted_read_run_predicts_from_its_folder_and_from_an_export_without_its_data(tmp_path, reviews):
    """READ does not merge into the model, so it exports as its trained tensors (rayeff.load); the export keeps its
    task, so predicting from it needs neither the training file nor the hub."""
    from rayeff.cli import main
    from rayeff.predict import load_for_inference, predict_records

    data = tmp_path / "mine.jsonl"
    data.write_text(reviews.read_text())
    run = tmp_path / "run"
    run_in_process(validate_job({
        "model": {"name": "tiny-llama"}, "method": {"name": "read", "hidden_size": 8}, "output_dir": str(run),
        "data": prompted_data(data), "training": {"max_steps": 4, "batch_size": 8, "lr": 1e-2}}))
    assert main(["export", str(run), "--output", str(tmp_path / "export")]) == 0
    records = [{"review": "the cast was good"}, {"review": "the plot was dull"}, {"review": "odd"}]
    loaded = load_for_inference(run)
    from_run = predict_records(loaded, records, 0)
    batch = loaded.tokenizer([f"{r['review']} Was it good?" for r in records], padding=True, return_tensors="pt",
                             add_special_tokens=False)   # a decoder's prompt: the text, its label word next
    with torch.no_grad():
        expected = loaded.model(**batch).argmax(-1).tolist()
    assert from_run == [("neg", "pos")[i] for i in expected]
    data.unlink()
    assert predict_records(load_for_inference(tmp_path / "export"), records, 0) == from_run


def test_a_glue_preset_is_prompted_by_its_own_column_names_or_text(glue_dir):
    spec = DataSpec(task="sst2", data_dir=str(glue_dir), task_type="prompted_classification",
                    template="{sentence} It was {mask}", label_words={0: "terrible", 1: "great"})
    same = spec.model_copy(update={"template": "{text} It was {mask}"})
    glue = load_examples(DataSpec(task="sst2", data_dir=str(glue_dir)), "dev")
    prompted = load_examples(spec, "dev")
    assert prompted["prompt"][3] == glue["text_a"][3] + " It was \ue000" and prompted["label"] == glue["label"]
    assert load_examples(same, "dev") == prompted
    assert task_of(spec).metrics == ("accuracy",) and task_of(spec).label_words == (("terrible",), ("great",))


def test_a_prompt_line_for_predict_needs_the_templates_columns(reviews):
    from rayeff.data.task import input_columns

    spec = DataSpec(**prompted_data(reviews))
    assert input_columns(spec, task_of(spec)) == [("review",)]
    other = DataSpec(**prompted_data(reviews, template="{review} by {author}: {mask}"))
    assert input_columns(other, task_of(spec)) == [("review", "author")]
