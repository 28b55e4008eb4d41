"""Supervised fine-tuning of decoders on prompt/response or chat data (data.task_type: causal_lm): the prompt's
tokens are never learned (in chat data, only the assistant's replies are), the loss falls for every method on
tiny-llama and tiny-gpt2 (MoE: tiny-mixtral, and upcycled), READ runs the decoder without autograd, dev is scored
by loss and perplexity, runs resume exactly, AdaZeta's queries split over two Ray workers through `rayeff run` end
bit-exact with one worker, and what cannot work is a one-line error before Ray starts."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rayeff.cli import main
from rayeff.config import DataSpec, validate_job
from rayeff.data.task import load_examples
from rayeff.data.tokenized import IGNORE_INDEX, Collator, tokenized_split
from rayeff.models import load_tokenizer, resolve_model
from rayeff.train.run_setup import token_losses
from rayeff.train.runner import run_in_process

ROOT = Path(__file__).resolve().parents[1]
SUMS = [{"question": f"What is {a} plus {b}?", "answer": f"{a + b}"} for a in range(6) for b in range(6)]


@pytest.fixture
def sums(tmp_path) -> Path:
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in SUMS))
    return path


def lm_data(path: Path, **fields) -> dict:
    return {"train_file": str(path), "dev_fraction": 0.25, "task_type": "causal_lm",
            "template": "Q: {question}\nA: ", "columns": {"response": "answer"}, **fields}


def test_the_template_builds_each_prompt_from_its_columns(sums):
    examples = load_examples(DataSpec(**lm_data(sums, dev_fraction=None, dev_file=str(sums))), "dev")
    assert examples["prompt"][7] == "Q: What is 1 plus 1?\nA: " and examples["response"][7] == "2"


def test_only_the_response_is_learned_whatever_the_prompt(tmp_path):
    """Two examples whose prompts differ (same length) and whose responses agree: the labels mask every prompt
    position, so for the same logits the loss and its gradient with respect to the logits are the same, and that
    gradient is zero at each position that would predict a prompt token."""
    rows = [{"prompt": "the cat sat on", "response": "the mat"}, {"prompt": "a dog ran to", "response": "the mat"}]
    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = DataSpec(train_file=str(path), dev_file=str(path), task_type="causal_lm")
    tokenizer = load_tokenizer(resolve_model("tiny-llama"))
    data = tokenized_split(spec, "train", tokenizer, 32)
    a, b = data[0], data[1]
    prompt_len = len(tokenizer("the cat sat on", add_special_tokens=False)["input_ids"])
    assert len(a["input_ids"]) == len(b["input_ids"]) and a["input_ids"][:prompt_len] != b["input_ids"][:prompt_len]
    assert a["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert a["labels"][prompt_len:] == a["input_ids"][prompt_len:] == b["labels"][prompt_len:]
    assert a["labels"][-1] == tokenizer.sep_token_id   # the end of the response is learned too

    collate = Collator(tokenizer.pad_token_id, 32, False, False, False)
    torch.manual_seed(0)
    logits = torch.randn(1, len(a["input_ids"]), len(tokenizer))
    grads = []
    for example in (a, b):
        x = logits.clone().requires_grad_(True)
        labels = collate([dict(example, index=0)])["labels"]
        loss = token_losses(x, labels).sum()
        loss.backward()
        grads.append((loss.item(), x.grad))
    assert grads[0][0] == grads[1][0] and torch.equal(grads[0][1], grads[1][1])
    g = grads[0][1][0]
    assert torch.count_nonzero(g[:prompt_len - 1]) == 0 and torch.count_nonzero(g[-1]) == 0   # predicting prompt
    assert all(torch.count_nonzero(g[t]) > 0 for t in range(prompt_len - 1, len(a["input_ids"]) - 1))


EVERY_METHOD = [  # (model, method section, lr): every registered method, on both tiny decoders (MoE: native, upcycled)
    *[(model, method, lr) for model in ("tiny-llama", "tiny-gpt2") for method, lr in [
        ({"name": "full"}, 1e-2), ({"name": "lora"}, 1e-2), ({"name": "read", "hidden_size": 16}, 1e-2),
        ({"name": "adazeta", "q_target": 2, "q_max": 4, "bottleneck": 16, "tt_rank": 3}, 1e-2),
        ({"name": "mezo"}, 1e-4), ({"name": "mezo", "target": "lora"}, 1e-2)]],
    ("tiny-mixtral", {"name": "moe"}, 1e-2),
    ("tiny-llama", {"name": "moe", "upcycle": {"experts": 4, "top_k": 2}, "trainable": "experts"}, 1e-2),
]


def test_every_registered_method_is_run_on_a_decoder_here():
    from rayeff.methods import METHODS

    assert {m["name"] for _, m, _ in EVERY_METHOD} == {n for n, d in METHODS.items() if "causal_lm" in d.task_types}
    assert set(METHODS) == {m["name"] for _, m, _ in EVERY_METHOD}


@pytest.mark.parametrize("model,method,lr", EVERY_METHOD,
                         ids=[f"{m['name']}{'-' + m.get('target', '') if 'target' in m else ''}"
                              f"{'-upcycled' if 'upcycle' in m else ''}-{model}" for model, m, _ in EVERY_METHOD])
def test_every_method_lowers_the_response_loss_on_decoders(tmp_path, sums, model, method, lr):
    result = run_in_process(validate_job({
        "model": {"name": model}, "method": method, "output_dir": str(tmp_path / "out"),
        "data": lm_data(sums, train_subset=8),   # one batch, every step: its loss must fall
        "training": {"max_steps": 12, "batch_size": 8, "lr": lr, "log_every": 4}}))
    losses = result["loss_history"]
    assert losses[-1] < losses[0] - (0.5 if method["name"] == "full" else 0.0), losses
    assert set(result["metrics"]) == {"eval_loss", "perplexity"}
    assert result["metrics"]["perplexity"] == pytest.approx(math.exp(result["metrics"]["eval_loss"]), rel=1e-12)
    uniform = math.log(30522)   # the loss of a uniform guess over the vocabulary, where random weights start
    if method["name"] == "full":   # it learned what answers look like, not only the 8 examples it saw
        assert result["metrics"]["eval_loss"] < uniform - 1
    memory = result["memory"]
    if method["name"] in ("lora", "read", "adazeta") or method.get("target") == "lora":
        # the pretrained LM head (tied to the embeddings in GPT-2) stays frozen with the backbone
        assert memory["trainable_params"] < 0.01 * memory["total_params"]
    elif method["name"] in ("full", "mezo"):
        assert memory["trainable_params"] == memory["total_params"]


def test_read_on_a_decoder_starts_as_the_backbone_and_builds_no_graph_through_it():
    """W_o starts at zero, so READ's logits equal the frozen decoder's at every position; the backbone runs without
    autograd (no layer output needs a gradient, so none is saved), and only the side network gets gradients."""
    from rayeff.methods import get_method
    from rayeff.methods.read import ReadConfig
    from rayeff.models import build_causal_lm

    torch.manual_seed(0)
    base = build_causal_lm(resolve_model("tiny-llama")).eval()
    ids = torch.randint(5, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0   # padding in the second row
    with torch.no_grad():
        plain = base(ids, mask)
    model = get_method("read").build(base, ReadConfig(hidden_size=8)).train()
    outputs_needing_grad = []
    for layer in base.backbone.layers:
        layer.register_forward_hook(lambda _m, _i, out: outputs_needing_grad.append(
            (out[0] if isinstance(out, tuple) else out).requires_grad))
    logits = model(input_ids=ids, attention_mask=mask)
    assert torch.equal(logits, plain)
    assert outputs_needing_grad == [False, False]
    logits[mask.bool()].logsumexp(-1).sum().backward()
    assert all(p.grad is None for p in base.parameters())
    assert torch.count_nonzero(model.side.out.weight.grad) > 0


@pytest.mark.parametrize("method", [{"name": "lora"}, {"name": "adazeta", "q_max": 2, "bottleneck": 8,
                                                                  "tt_rank": 2}], ids=["lora", "adazeta"])
def test_a_causal_lm_run_stopped_half_way_resumes_to_the_same_weights(tmp_path, sums, method):
    def job(name, **extra):
        return validate_job({"model": {"name": "tiny-gpt2"}, "method": method, "data": lm_data(sums),
                             "training": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "log_every": 2},
                             "output_dir": str(tmp_path / name), **extra})

    straight = run_in_process(job("straight"))
    stopped = run_in_process(job("resumed", energy={"budget_j": 1e-9}))   # spent at the first report, step 2
    assert stopped["status"] == "stopped: energy budget" and stopped["time"]["steps"] == 2
    resumed = run_in_process(job("resumed", resume=True))
    assert resumed["status"] == "finished" and resumed["time"]["steps"] == 4
    assert resumed["step_losses"] == straight["step_losses"]
    a, b = (load_file(r["weights"]) for r in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


ZO_JOB = {"model": {"name": "tiny-llama"}, "training": {"max_steps": 4, "batch_size": 8, "lr": 1e-2, "log_every": 1},
          # Q over steps 1, 2, 3, 3: a step with fewer queries than workers, and steps with more
          "method": {"name": "adazeta", "alpha": 1.0, "beta": 1.0, "q_max": 3, "schedule_over": "steps",
                     "bottleneck": 8, "tt_rank": 2},
          "scaling": {"num_workers": 2, "threads_per_worker": 1}}


@pytest.mark.slow
@pytest.mark.ray
def test_rayeff_run_splits_a_decoders_queries_over_two_ray_workers_bit_exactly(tmp_path, sums):
    """AdaZeta on a causal-LM job through the command line on a local Ray, its queries split over 2 workers, ends
    with the same weights and losses, bit for bit, as the same job on one worker in process."""
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({**ZO_JOB, "data": lm_data(sums)}))
    done = subprocess.run([sys.executable, "-m", "rayeff.cli", "run", str(job), "--output", str(tmp_path / "two"),
                           "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    one = run_in_process(validate_job({**ZO_JOB, "data": lm_data(sums), "output_dir": str(tmp_path / "one"),
                                       "scaling": {"num_workers": 1, "threads_per_worker": 1}}))
    assert two["workers"] == 2 and two["task"] == "sums" and two["status"] == "finished"
    assert two["zeroth_order"]["queries_total"] == 1 + 2 + 3 + 3
    assert two["step_losses"] == one["step_losses"] and two["metrics"] == one["metrics"]
    a, b = load_file(str(tmp_path / "two" / "final" / "trainable.safetensors")), load_file(one["weights"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last_up_cores = [t for n, t in a.items() if ".up.cores.2" in n]   # zero at the start: it trained
    assert len(last_up_cores) == 2 and all(torch.count_nonzero(t) for t in last_up_cores)


def test_a_prompt_too_long_loses_its_start_but_keeps_bos(tmp_path):
    from rayeff.data.tokenized import _tokenize_prompts_and_responses

    tokenizer = load_tokenizer(resolve_model("tiny-llama"))
    tokenizer.bos_token = "[CLS]"   # a tokenizer with a BOS of its own, as Llama's
    prompt = " ".join(f"w{i}" for i in range(100))
    example = _tokenize_prompts_and_responses({"prompt": [prompt], "response": ["the end"]}, tokenizer, 16)[0]
    assert len(example["input_ids"]) == 16 and example["input_ids"][0] == tokenizer.cls_token_id
    assert tokenizer.decode(example["input_ids"][1:]).endswith("w99 the end [SEP]")
    assert example["labels"][-3:] == example["input_ids"][-3:] and example["labels"][-4] == IGNORE_INDEX


def test_squad_exact_match_and_token_f1():
    from rayeff.generation import exact_match, normalise_answer, token_f1

    assert normalise_answer("The  Eiffel Tower!") == "eiffel tower"
    assert exact_match("the eiffel tower", "Eiffel Tower.") == 1.0 and exact_match("eiffel", "Eiffel Tower") == 0.0
    assert token_f1("eiffel tower in paris", "the Eiffel Tower") == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert token_f1("", "") == 1.0 and token_f1("paris", "") == 0.0 and token_f1("rome", "paris") == 0.0


def test_dev_generation_scores_a_model_that_learned_its_answer_perfectly(tmp_path):
    rows = [{"question": f"What is {a} plus {b}?", "answer": "the answer is easy"} for a in range(6) for b in range(6)]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = {"model": {"name": "tiny-llama"}, "method": {"name": "full"},
              "data": {**lm_data(data), "eval_max_new_tokens": 8},
              "training": {"max_steps": 30, "batch_size": 8, "lr": 1e-2, "log_every": 10}}
    trained = run_in_process(validate_job({**common, "output_dir": str(tmp_path / "trained")}))
    assert trained["metrics"]["exact_match"] == 1.0 and trained["metrics"]["token_f1"] == 1.0
    sampled = run_in_process(validate_job({   # sampling from the top token only is greedy decoding
        **common, "data": {**common["data"], "eval_temperature": 1.5, "eval_top_k": 1},
        "output_dir": str(tmp_path / "sampled")}))
    assert sampled["metrics"] == trained["metrics"]
    untrained = run_in_process(validate_job({**common, "output_dir": str(tmp_path / "untrained"),
                                             "training": {**common["training"], "max_steps": 1, "lr": 1e-9}}))
    assert untrained["metrics"]["exact_match"] == 0.0 and untrained["metrics"]["token_f1"] == 0.0


def test_a_sweep_that_maximises_eval_loss_is_refused(tmp_path, sums, capsys, ray_calls):
    job, space, sweep = tmp_path / "job.yaml", tmp_path / "space.yaml", tmp_path / "sweep.yaml"
    job.write_text(json.dumps({"model": {"name": "tiny-llama"}, "method": {"name": "lora"}, "data": lm_data(sums),
                               "training": {"max_steps": 2, "batch_size": 4}}))
    space.write_text("method: lora\nparams:\n  training.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n")
    sweep.write_text(json.dumps({"base_job": str(job), "search_space": str(space), "num_trials": 2,
                                 "output_dir": str(tmp_path / "sweep")}))
    assert main(["tune", str(sweep)]) == 2 and not ray_calls
    assert "objective.mode is max but eval_loss is lower-is-better; set objective.mode: min" in capsys.readouterr().err


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CHATS = [{"messages": [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": f"{a} + {b}?"},
                       {"role": "assistant", "content": f"{a + b}"}, {"role": "user", "content": "Doubled?"},
                       {"role": "assistant", "content": f"twice that is {2 * (a + b)}"}]}
         for a in range(5) for b in range(5)]


def test_chat_messages_learn_the_assistants_replies_only(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    spec = DataSpec(train_file=str(path), dev_file=str(path), task_type="causal_lm", chat_template=CHAT_TEMPLATE)
    tokenizer = load_tokenizer(resolve_model("tiny-llama"))
    example = tokenized_split(spec, "dev", tokenizer, 128)[7]   # 1 + 2
    learned = tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])
    assert learned == "3 twice that is 6"
    other = DataSpec(**{**spec.model_dump(), "chat_template": CHAT_TEMPLATE.replace("<|", "[[").replace("|>", "]]")})
    assert "[ [ system ] ]" in tokenizer.decode(tokenized_split(other, "dev", tokenizer, 128)[7]["input_ids"])
    assert "you add numbers" in tokenizer.decode(example["input_ids"])   # in the input, not learned
    result = run_in_process(validate_job({
        "model": {"name": "tiny-llama"}, "method": {"name": "full"}, "output_dir": str(tmp_path / "out"),
        "data": {"train_file": str(path), "dev_fraction": 0.2, "task_type": "causal_lm",
                 "chat_template": CHAT_TEMPLATE, "train_subset": 8},
        "training": {"max_steps": 6, "batch_size": 8, "lr": 1e-2, "log_every": 2}}))
    assert result["loss_history"][-1] < result["loss_history"][0] - 0.5 and "eval_loss" in result["metrics"]


@pytest.mark.parametrize("conversation,needle", [
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}], 'message 2 ({"role": "bot"'),
    ([{"role": "user", "content": "hi"}, {"role": "assistant"}], "message 2"),
    ([{"role": "user", "content": "hi"}], "no assistant message, so nothing to learn"),
    ("hi there", "messages is str, not a list of {role, content} messages"),
])
def test_a_malformed_chat_is_one_line_exit_2_before_ray(tmp_path, capsys, ray_calls, conversation, needle):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in [*CHATS[:3], {"messages": conversation}]))
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({"model": {"name": "tiny-llama"}, "method": {"name": "lora"},
                               "data": {"train_file": str(path), "dev_fraction": 0.25, "task_type": "causal_lm",
                                        "chat_template": CHAT_TEMPLATE}, "training": {"max_steps": 1}}))
    code = main(["run", str(job), "--output", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not ray_calls and len(err.splitlines()) == 1, err
    assert "chat.jsonl example 4: " in err and needle in err, err


def test_chat_data_without_a_chat_template_is_one_line_exit_2(tmp_path, capsys, ray_calls):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({"model": {"name": "tiny-llama"}, "method": {"name": "lora"},
                               "training": {"max_steps": 1},
                               "data": {"train_file": str(path), "dev_fraction": 0.25, "task_type": "causal_lm"}}))
    assert main(["run", str(job), "--output", str(tmp_path / "out"), "--no-progress"]) == 2 and not ray_calls
    assert "data.chat_template: the tokenizer has no chat template" in capsys.readouterr().err


@pytest.mark.parametrize("change,needle", [
    ({"method": {"name": "labelled-only"}}, "method labelled-only cannot train a causal_lm task (data.task_type) yet; "
                                            "it trains classification, regression. For causal_lm, use adazeta, full"),
    ({"data": {"template": "Q: {query}\nA: "}}, "data.template names 'query', which data.train_file"),
    ({"data": {"template": "Q: {}"}}, "data.template: {} is not a column name"),
    ({"data": {"template": None, "columns": {"response": "answer"}}}, "data.columns.prompt: data.train_file"),
    ({"data": {"k_shot": 2}}, "k_shot draws k examples per class"),
    ({"data": {"task_type": "regression"}}, "template is for causal_lm and prompted_classification data"),
    ({"model": {"name": "tiny-gpt2"}, "data": {"eval_max_new_tokens": 8}, "training": {"max_seq_length": 512}},
     "data.eval_max_new_tokens: 8 tokens after a dev prompt of up to 512"),
    ({"model": {"name": "tiny-bert"}}, "a causal-LM task needs a decoder-only model; bert is an encoder"),
    ({"data": {"eval_max_new_tokens": 4, "eval_top_p": 0.9}}, "eval_top_p shapes sampling; set eval_temperature"),
    ({"data": {"eval_temperature": 0.7}}, "eval_temperature shapes dev generation; set eval_max_new_tokens too"),
])
def test_what_cannot_work_is_one_line_exit_2_before_ray(sums, refused_run, monkeypatch, change, needle):
    from rayeff.methods import METHODS, MethodDefinition
    from rayeff.methods.full import FullConfig

    class LabelledOnly(FullConfig):   # a method that, as every method does by default, trains labelled tasks only
        name: str = "labelled-only"

    monkeypatch.setitem(METHODS, "labelled-only", MethodDefinition("labelled-only", LabelledOnly, lambda m, c: m,
                                                                   loop="first_order"))
    job = {"model": {"name": "tiny-llama"}, "method": {"name": "full"}, "data": lm_data(sums),
           "training": {"max_steps": 2, "batch_size": 4}}
    for section, fields in change.items():
        job[section] = {**job[section], **fields} if section == "data" else fields
    job["data"] = {k: v for k, v in job["data"].items() if v is not None}
    err = refused_run(job)
    assert needle in err, err


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2", "tiny-mixtral"])
def test_packed_examples_attend_only_to_themselves_and_learn_what_they_learn_apart(tmp_path, sums, model):
    """Packing puts whole examples in rows of up to max_seq_length; each example's logits in a packed row equal its
    logits alone, and its learned tokens (never its first) are those it has alone, so the summed loss is the same."""
    from rayeff.models import build_causal_lm

    from rayeff.data.tokenized import load_train_and_dev

    spec = DataSpec(**lm_data(sums, dev_fraction=None, dev_file=str(sums)))
    tokenizer = load_tokenizer(resolve_model(model))
    alone = tokenized_split(spec, "train", tokenizer, 40)
    packed, _ = load_train_and_dev(spec.model_copy(update={"packing": True}), tokenizer, 40)
    assert len(packed) < len(alone) / 2 and max(len(r) for r in packed["input_ids"]) <= 40
    torch.manual_seed(0)
    lm = build_causal_lm(resolve_model(model)).eval()
    collate = Collator(tokenizer.pad_token_id, 40, False, False, False)
    batch = collate([dict(packed[i], index=i) for i in range(2)])
    assert batch["position_ids"][0, 0] == 0 and batch["position_ids"].shape == batch["input_ids"].shape
    with torch.no_grad():
        logits = lm(**batch)
        row = packed[0]
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
        assert len(starts) > 2   # several examples share the row
        for a, b in zip(starts, starts[1:]):
            ids = torch.tensor([row["input_ids"][a:b]])
            torch.testing.assert_close(logits[0, a:b], lm(ids, torch.ones_like(ids))[0], rtol=1e-4, atol=1e-4)
        packed_loss = token_losses(logits, batch["labels"])[0].sum()
        first = [dict(alone[i], index=i) for i in range(len(starts) - 1)]
        one_by_one = sum(token_losses(lm(**collate([e]))[:, :len(e["input_ids"])], collate([e])["labels"]).sum()
                         for e in first)
    torch.testing.assert_close(packed_loss, one_by_one, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", [{"name": "lora"}, {"name": "read", "hidden_size": 8}], ids=["lora", "read"])
def test_a_packed_run_trains_and_a_model_that_mixes_packed_examples_is_refused(tmp_path, sums, monkeypatch, method):
    job = {"model": {"name": "tiny-llama"}, "method": method, "output_dir": str(tmp_path / "out"),
           "data": {**lm_data(sums), "packing": True},
           "training": {"max_steps": 8, "batch_size": 2, "lr": 1e-2, "max_seq_length": 64, "log_every": 4}}
    result = run_in_process(validate_job(job))
    assert result["loss_history"][-1] < result["loss_history"][0] and result["time"]["steps"] == 8
    import rayeff.train.run_setup

    monkeypatch.setattr(rayeff.train.run_setup, "packing_isolates_examples", lambda model: False)
    from rayeff.errors import UserError

    with pytest.raises(UserError, match="data.packing: tiny-llama \\(llama\\) lets packed examples attend"):
        run_in_process(validate_job({**job, "output_dir": str(tmp_path / "refused")}))
