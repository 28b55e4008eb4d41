"""`rayeff predict`: greedy generation that equals transformers' `generate` on the exported model, seeded sampling
that draws from the model's own (top-k / top-p) distribution whatever the batch, 10,000 lines through Ray Data on
two workers with the same predictions as the model in process, and bad input refused before Ray starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rayeff.cli import main
from rayeff.config import validate_job
from rayeff.predict import generation_prompt, load_for_inference, predict_records
from rayeff.train.runner import run_in_process

ROOT = Path(__file__).resolve().parents[1]
ANSWER = "the answer is easy"


def write_lines(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_greedy_generation_equals_transformers_generate_on_the_export(tmp_path):
    from transformers import AutoModelForCausalLM

    questions = [{"question": f"What is {a} plus {b}?", "answer": ANSWER} for a in range(6) for b in range(6)]
    data = write_lines(tmp_path / "qa.jsonl", questions)
    run = tmp_path / "run"
    run_in_process(validate_job({   # one answer for every question: a model that learned it says it
        "model": {"name": "tiny-llama"}, "method": {"name": "full"}, "output_dir": str(run),
        "data": {"train_file": str(data), "dev_fraction": 0.25, "task_type": "causal_lm",
                 "template": "Q: {question}\nA: ", "columns": {"response": "answer"}},
        "training": {"max_steps": 30, "batch_size": 8, "lr": 1e-2, "log_every": 10}}))
    assert main(["export", str(run), "--output", str(tmp_path / "export")]) == 0
    records = [{"question": "What is 7 plus 9?"}, {"question": "Is it easy?"}, {"question": "What is 12 plus 30?"}]
    from_run = predict_records(load_for_inference(run), records, 8)
    loaded = load_for_inference(tmp_path / "export")
    from_export = predict_records(loaded, records, 8)
    assert from_run == from_export == [ANSWER] * 3

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    prompts = [generation_prompt(loaded, r) for r in records]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = (ids != 0).long()
    generated = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                            eos_token_id=loaded.tokenizer.sep_token_id, pad_token_id=0)
    assert [loaded.tokenizer.decode(g[width:], skip_special_tokens=True).strip() for g in generated] == from_export


def test_nucleus_and_top_k_keep_the_tokens_they_should():
    from rayeff.generation import Sampling

    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = {p: Sampling(top_p=p).probabilities(logits)[0] for p in (0.7, 0.8, 0.81)}
    torch.testing.assert_close(kept[0.7], torch.tensor([0.625, 0.375, 0.0, 0.0]))
    torch.testing.assert_close(kept[0.8], kept[0.7])   # the first two reach 0.8: the third is not needed
    torch.testing.assert_close(kept[0.81], torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    torch.testing.assert_close(Sampling(top_k=3, temperature=0.5).probabilities(logits)[0],
                               torch.tensor([0.25, 0.09, 0.0225, 0.0]) / 0.3625)


def test_sampling_draws_from_the_models_distribution_and_each_prompt_alike_in_any_batch():
    from rayeff.generation import Sampling, generate
    from rayeff.models import build_causal_lm, resolve_model

    torch.manual_seed(0)
    model = build_causal_lm(resolve_model("tiny-llama")).eval()
    prompt, others = [5, 17, 300, 42], [[9, 8, 7], [1000, 2000, 3000, 4000, 5000]]
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), torch.ones(1, 4, dtype=torch.long))[0, -1] * 3.0   # temperature 1/3
    top = logits.topk(4)
    expected = dict(zip(top.indices.tolist(), top.values.softmax(-1).tolist()))
    draws = [generate(model, [prompt], 0, None, 1, sampling=Sampling(1 / 3, top_k=4, seed=s))[0][0]
             for s in range(600)]
    assert set(draws) <= set(expected)
    for token, p in expected.items():   # 600 draws: a frequency's standard error is at most 0.02
        assert abs(draws.count(token) / 600 - p) < 0.07, (token, draws.count(token) / 600, p)

    hot = Sampling(temperature=2.0, seed=1)
    alone = generate(model, [prompt], 0, None, 6, sampling=hot)[0]
    batched = generate(model, [others[0], prompt, others[1]], 0, None, 6, sampling=hot)
    assert batched[1] == alone
    assert any(generate(model, [p], 0, None, 6, sampling=Sampling(2.0, seed=2))[0] != b
               for p, b in zip([others[0], prompt, others[1]], batched))
    greedy = generate(model, [prompt, *others], 0, None, 6)
    assert generate(model, [prompt, *others], 0, None, 6, sampling=Sampling(5.0, top_k=1, seed=3)) == greedy


def trained_classifier(tmp_path: Path) -> Path:
    reviews = [{"review": f"{'a fine' if i % 2 else 'a dull'} film number {i}", "stars": ["neg", "pos"][i % 2]}
               for i in range(64)]
    run = tmp_path / "run"
    run_in_process(validate_job({
        "model": {"name": "tiny-bert"}, "method": {"name": "full"}, "output_dir": str(run),
        "data": {"train_file": str(write_lines(tmp_path / "reviews.jsonl", reviews)), "dev_fraction": 0.25,
                 "columns": {"text": "review", "label": "stars"}},
        "training": {"max_steps": 20, "batch_size": 16, "lr": 1e-3, "log_every": 10}}))
    return run


@pytest.mark.slow
@pytest.mark.ray
def test_rayeff_predict_runs_10000_lines_on_two_ray_workers_as_the_model_does_in_process(tmp_path):
    run = trained_classifier(tmp_path)
    lines = [{"id": i, "review": f"{['a fine', 'a dull', 'an odd'][i % 3]} film, take {i}"} for i in range(10_000)]
    source = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    done = subprocess.run([sys.executable, "-m", "rayeff.cli", "predict", str(run), "--input", str(source),
                           "--output", str(out), "--batch-size", "500", "--workers", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wrote 10000 predictions" in done.stdout and "on 2 worker(s)" in done.stdout, done.stdout
    predicted = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in p.items() if k != "prediction"} for p in predicted] == lines   # in order, kept
    assert {p["prediction"] for p in predicted} <= {"neg", "pos"}
    sample = lines[::50]
    assert [p["prediction"] for p in predicted[::50]] == predict_records(load_for_inference(run), sample, 1)
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("case,needle", [
    ("blank line", "line 2 is blank"),
    ("not json", "line 2: not valid JSON"),
    ("missing column", "line 2 has none of the columns the model reads (review)"),
    ("output exists", "already exists; choose another file"),
    ("not a run", "is neither a run's folder"),
    ("top-p without sampling", "--top-p and --top-k shape sampling; set --temperature above 0"),
])
def test_bad_predict_input_is_one_line_exit_2_before_ray(tmp_path, capsys, ray_calls, case, needle):
    run = trained_classifier(tmp_path)
    body = '{"review": "fine"}\n' + {"blank line": "\n", "not json": "{review: 1}\n",
                                     "missing column": '{"text": "x"}\n'}.get(case, '{"review": "ok"}\n')
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(body)
    if case == "output exists":
        out.write_text("kept\n")
    if case == "not a run":
        run = tmp_path
    extra = ["--top-p", "0.9"] if case == "top-p without sampling" else []
    capsys.readouterr()   # what training the model printed (a cold tokenised cache reports its writes)
    code = main(["predict", str(run), "--input", str(source), "--output", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not ray_calls and len(err.splitlines()) == 1 and needle in err, err
    assert (out.read_text() == "kept\n") if case == "output exists" else not out.exists()
