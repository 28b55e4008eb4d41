"""`rayeff export` and `rayeff.load`: a finished causal-LM run as a folder that `AutoModelForCausalLM.from_pretrained`
loads (full, LoRA merged, a native MoE model's), or a PEFT adapter folder (LoRA); a classifier as one that
`AutoModelForSequenceClassification` loads; READ, AdaZeta and an upcycled MoE as the trained tensors that
`rayeff.load` puts back into the base model; each giving the trained model's outputs. A prompted-classification run
of a masked LM exports as an `AutoModelForMaskedLM` folder that `rayeff predict` reads as the run. Bad runs and
folders are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rayeff.cli import main
from rayeff.config import load_job, validate_job
from rayeff.data.tokenized import Collator, load_train_and_dev
import rayeff
from rayeff.export import rebuild_trained
from rayeff.models import load_language_model, load_tokenizer, resolve_model
from rayeff.train.run_setup import token_losses
from rayeff.train.checkpointer import TRAINABLE_FILE
from rayeff.train.runner import run_in_process

SUMS = [{"question": f"What is {a} plus {b}?", "answer": f"{a + b}"} for a in range(6) for b in range(6)]


METHODS = {"full": {"name": "full"}, "lora": {"name": "lora", "rank": 4}, "moe": {"name": "moe"},
           "read": {"name": "read", "hidden_size": 8},
           "adazeta": {"name": "adazeta", "q_max": 2, "bottleneck": 8, "tt_rank": 2},
           "upcycled": {"name": "moe", "upcycle": {"experts": 2, "top_k": 1}, "trainable": "experts"}}


def trained_run(tmp_path: Path, model: str, method: str) -> tuple[Path, dict]:
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in SUMS))
    out = tmp_path / f"{model}-{method}"
    result = run_in_process(validate_job({
        "model": {"name": model}, "method": METHODS[method],
        "output_dir": str(out), "training": {"max_steps": 6, "batch_size": 8, "lr": 1e-2, "log_every": 3},
        "data": {"train_file": str(data), "dev_fraction": 0.25, "task_type": "causal_lm",
                 "template": "Q: {question}\nA: ", "columns": {"response": "answer"}}}))
    return out, result


def dev_loss(lm, run_dir: Path) -> float:
    """The mean loss per response token over the run's dev set, computed here with `lm` alone."""
    job = load_job(run_dir / "job.yaml")
    tokenizer = load_tokenizer(resolve_model(job.model.name))
    _, dev = load_train_and_dev(job.data, tokenizer, job.training.max_seq_length)
    batch = Collator(tokenizer.pad_token_id, 128, False, False, False)([dict(dev[i], index=i) for i in range(len(dev))])
    with torch.no_grad():
        logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return (token_losses(logits, batch["labels"]).sum() / (batch["labels"][:, 1:] != -100).sum()).item()


@pytest.mark.parametrize("model,method", [("tiny-llama", "full"), ("tiny-llama", "lora"), ("tiny-gpt2", "full"),
                                          ("tiny-gpt2", "lora"), ("tiny-mixtral", "moe")])
def test_an_exported_run_loads_with_from_pretrained_and_gives_the_trained_models_outputs(tmp_path, capsys, model,
                                                                                        method):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, result = trained_run(tmp_path, model, method)
    out = tmp_path / "export"
    assert main(["export", str(run_dir), "--output", str(out)]) == 0, capsys.readouterr().err
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    # the worker's own dev figure, measured again on the exported model
    assert dev_loss(exported, run_dir) == pytest.approx(result["metrics"]["eval_loss"], rel=1e-5)
    _, trained = rebuild_trained(run_dir / "final" / TRAINABLE_FILE, load_job(run_dir / "job.yaml"))   # LoRA unmerged
    assert json.loads((out / "rayeff_export.json").read_text())["form"] == "language_model"
    ids = torch.randint(5, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.allclose(exported(input_ids=ids, attention_mask=mask).logits, trained(ids, mask), atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("What is 2 plus 3?")["input_ids"] == load_tokenizer(resolve_model(model))("What is 2 plus 3?")[
        "input_ids"]
    card = (out / "README.md").read_text()
    assert f"# {method} · {model} · sums" in card and f"eval_loss {result['metrics']['eval_loss']:.4g}" in card
    assert f"source {result['energy']['source']}" in card and (out / "rayeff_job.yaml").is_file()


def test_a_lora_run_exports_as_a_peft_adapter_that_peft_loads(tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, _ = trained_run(tmp_path, "tiny-llama", "lora")
    assert main(["export", str(run_dir), "--output", str(tmp_path / "merged")]) == 0
    assert main(["export", str(run_dir), "--output", str(tmp_path / "adapter"), "--adapter-only"]) == 0
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4
    torch.manual_seed(load_job(run_dir / "job.yaml").training.seed)   # the tiny base, as the run built it
    base = load_language_model(resolve_model("tiny-llama")).eval()
    ids = torch.randint(5, 1000, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        a, b = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(plain, a, atol=1e-3)   # the adapter is the trained one, not an untrained (zero) B
    lines = tmp_path / "in.jsonl"
    lines.write_text('{"question": "What is 1 plus 2?"}\n')
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "adapter"), "--input", str(lines), "--output", str(tmp_path / "o")]) == 2
    assert "is an adapter-only export, which PEFT loads onto its base model" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["read", "adazeta", "upcycled"])
def test_a_run_that_does_not_merge_into_the_model_exports_its_tensors_and_rayeff_load_gives_its_outputs(
        tmp_path, capsys, method):
    run_dir, result = trained_run(tmp_path, "tiny-llama", method)
    out = tmp_path / "export"
    assert main(["export", str(run_dir), "--output", str(out)]) == 0
    assert "rayeff.load" in capsys.readouterr().out
    assert json.loads((out / "rayeff_export.json").read_text()) == {
        "form": "rayeff", "method": METHODS[method]["name"], "base_model": "tiny-llama",
        "task": {"kind": "causal_lm", "name": "sums", "template": "Q: {question}\nA: ",
                 "metrics": ["eval_loss", "perplexity"]}}
    loaded = rayeff.load(out)
    assert not loaded.training and loaded is not rayeff.load(out)

    class Logits(torch.nn.Module):   # dev_loss reads `.logits`, as of a Hugging Face model
        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": loaded(input_ids=input_ids, attention_mask=attention_mask)})

    if method != "upcycled":   # (an upcycled MoE's expert capacity, and so its loss, depends on the batch)
        assert dev_loss(Logits(), run_dir) == pytest.approx(result["metrics"]["eval_loss"], rel=1e-5)
    untrained = tmp_path / "untrained.safetensors"   # the same tensors before training: other outputs
    from safetensors.torch import load_file, save_file

    save_file({k: torch.zeros_like(v) if method != "read" or "out" in k else v
               for k, v in load_file(str(out / "trainable.safetensors")).items()}, str(untrained))
    _, zeroed = rebuild_trained(untrained, load_job(out / "rayeff_job.yaml"))
    ids = torch.randint(5, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mask = torch.ones_like(ids)
        assert not torch.allclose(zeroed(input_ids=ids, attention_mask=mask), loaded(input_ids=ids,
                                                                                   attention_mask=mask), atol=1e-4)


@pytest.mark.parametrize("method,pooling,form", [("full", "auto", "sequence_classifier"),
                                                 ("lora", "auto", "sequence_classifier"),
                                                 ("full", "mean", "rayeff")])
def test_a_classifier_exports_as_hugging_faces_own_sequence_classifier_where_its_layout_is_theirs(
        tmp_path, capsys, method, pooling, form):
    from transformers import AutoModelForSequenceClassification

    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"text": f"a {w} film {i}", "label": label}) + "\n" for i in range(8)
                            for label, w in (("pos", "fine"), ("neg", "dull"))))
    run_dir = tmp_path / "run"
    run_in_process(validate_job({
        "model": {"name": "tiny-bert", "pooling": pooling}, "method": METHODS[method], "output_dir": str(run_dir),
        "training": {"max_steps": 4, "batch_size": 8, "lr": 1e-2, "log_every": 2},
        "data": {"train_file": str(data), "dev_fraction": 0.25}}))
    out = tmp_path / "export"
    assert main(["export", str(run_dir), "--output", str(out)]) == 0, capsys.readouterr().err
    assert json.loads((out / "rayeff_export.json").read_text())["form"] == form
    trained = rebuild_trained(run_dir / "final" / TRAINABLE_FILE, load_job(run_dir / "job.yaml"))[1]
    tokenizer = load_tokenizer(resolve_model("tiny-bert"))
    batch = tokenizer(["a fine film", "a rather dull film indeed"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = trained(**batch)
        torch.testing.assert_close(rayeff.load(out)(**batch), expected, rtol=1e-5, atol=1e-5)
        if form == "sequence_classifier":
            hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
            torch.testing.assert_close(hf(**batch).logits, expected, rtol=1e-5, atol=1e-5)
            assert hf.config.id2label == {0: "neg", 1: "pos"}


def test_a_prompted_masked_lm_run_exports_as_a_masked_lm_whose_label_word_logits_are_the_runs(tmp_path, capsys):
    from transformers import AutoModelForMaskedLM

    from rayeff.predict import load_for_inference, predict_records

    data = tmp_path / "reviews.jsonl"
    rows = [{"text": f"the film was {w}", "label": label} for label, words in
            {"pos": ("good", "great", "fine"), "neg": ("bad", "dull", "poor")}.items() for w in words] * 3
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "run"
    run_in_process(validate_job({
        "model": {"name": "tiny-bert"}, "method": {"name": "full"}, "output_dir": str(run_dir),
        "training": {"max_steps": 6, "batch_size": 6, "lr": 1e-2, "log_every": 3},
        "data": {"train_file": str(data), "dev_fraction": 0.3, "task_type": "prompted_classification",
                 "template": "{text}. It was {mask}!", "label_words": {"pos": "yes", "neg": "no"}}}))
    out = tmp_path / "export"
    assert main(["export", str(run_dir), "--output", str(out)]) == 0, capsys.readouterr().err
    exported = AutoModelForMaskedLM.from_pretrained(out).eval()
    from_run, from_export = load_for_inference(run_dir), load_for_inference(out)
    tokenizer = from_run.tokenizer
    batch = tokenizer(["the film was good. it was [MASK]!", "the film was so dull. it was [MASK]!"], padding=True,
                      return_tensors="pt")
    mask_at = (batch["input_ids"] == tokenizer.mask_token_id).nonzero()
    words = tokenizer.convert_tokens_to_ids(["no", "yes"])
    with torch.no_grad():
        trained = from_run.model(batch["input_ids"], batch["attention_mask"])
        own = exported(**batch).logits[mask_at[:, 0], mask_at[:, 1]][:, words]
    assert torch.allclose(own, trained, atol=1e-5)
    records = [{"text": "the film was good"}, {"text": "the film was so dull"}, {"text": "what a fine cast"}]
    assert predict_records(from_export, records, 0) == predict_records(from_run, records, 0)
    assert "label words {\"pos\": \"yes\", \"neg\": \"no\"}" in (out / "README.md").read_text()


@pytest.mark.parametrize("case,needle", [
    ("no result", "has no result.json; export a finished run"),
    ("output in use", "already exists and is not an empty folder"),
    ("adapter of full", "--adapter-only: a full run has no adapter"),
    ("not a folder", "is not a folder"),
])
def test_bad_exports_are_one_line_exit_2(tmp_path, capsys, case, needle):
    run_dir, _ = trained_run(tmp_path, "tiny-gpt2", "full")
    out, extra = tmp_path / "export", []
    if case == "no result":
        (run_dir / "result.json").unlink()
    elif case == "output in use":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "adapter of full":
        extra = ["--adapter-only"]
    elif case == "not a folder":
        run_dir = tmp_path / "nowhere"
    code = main(["export", str(run_dir), "--output", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert case == "output in use" and (out / "keep.txt").read_text() == "mine" or not out.exists()


def test_read_weights_under_the_earlier_cell_names_load_and_foreign_ones_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from rayeff.errors import UserError

    run_dir, _ = trained_run(tmp_path, "tiny-gpt2", "read")
    job, weights = load_job(run_dir / "job.yaml"), load_file(str(run_dir / "final" / TRAINABLE_FILE))
    legacy = {name.replace("side.rnn.", "side.cell.").removesuffix("_l0") if "side.rnn." in name else name: t
              for name, t in weights.items()}
    assert "side.cell.weight_ih" in legacy and "side.rnn.weight_ih_l0" not in legacy
    save_file(legacy, str(tmp_path / "legacy.safetensors"))
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        now = rebuild_trained(run_dir / "final" / TRAINABLE_FILE, job)[1](**batch)
        then = rebuild_trained(tmp_path / "legacy.safetensors", job)[1](**batch)
    assert torch.equal(now, then)
    other = validate_job({**job.model_dump(mode="json"), "method": {"name": "read", "hidden_size": 16}})
    with pytest.raises(UserError, match="was the job changed"):   # tensors of other shapes
        rebuild_trained(run_dir / "final" / TRAINABLE_FILE, other)
    save_file({**weights, "side.extra": torch.zeros(2)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(UserError, match="was the job changed"):   # a tensor the model does not have
        rebuild_trained(tmp_path / "extra.safetensors", job)
