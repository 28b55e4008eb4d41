"""The methods on every tiny backbone kind: what trains, what is frozen, READ's no-autograd backbone, its step-0
equivalence and parameter count."""

from __future__ import annotations

import pytest
import torch

from rayeff.methods import get_method, trainable_parameter_count
from rayeff.methods.lora import LoraMethodConfig
from rayeff.methods.read import ReadConfig, ReadModel, side_parameter_formula
from rayeff.models import build_classifier, hidden_size, load_tokenizer, resolve_model

TINY = ["tiny-bert", "tiny-gpt2", "tiny-llama", "tiny-t5"]
SENTENCES = (["a fine film", "the plot is thin but the acting carries it well"], ["yes", "no , not at all"])


def _batch(name):
    tokenizer = load_tokenizer(resolve_model(name))
    enc = tokenizer(*SENTENCES, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "token_type_ids": enc.get("token_type_ids")}


def _classifier(name, pooling="auto"):
    torch.manual_seed(0)
    return build_classifier(resolve_model(name), num_labels=3, pooling=pooling)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("pooling", ["auto", "mean"])
def test_read_step0_logits_equal_the_backbones(name, pooling):
    if name == "tiny-t5" and pooling == "mean":
        pytest.skip("encoder-decoders read the decoder's single state")
    clf = _classifier(name, pooling).eval()
    batch = _batch(name)
    with torch.no_grad():
        expected = clf(**batch)
    read = ReadModel(clf, ReadConfig(hidden_size=8)).eval()
    assert torch.equal(read(**batch), expected)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("rnn", ["gru", "rnn", "lstm"])
def test_read_backbone_gets_no_gradient_and_saves_no_activation(name, rnn):
    clf = _classifier(name)
    model = ReadModel(clf, ReadConfig(hidden_size=8, rnn=rnn)).train()
    grad_mode_in_backbone = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: grad_mode_in_backbone.append(torch.is_grad_enabled()))
             for m in clf.backbone.modules()]
    saved_in_backbone = []
    original = clf.run_backbone

    def counted_backbone(*args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_in_backbone.append(t) or t, lambda t: t):
            return original(*args, **kwargs)

    clf.run_backbone = counted_backbone
    logits = model(**_batch(name))
    logits.sum().backward()
    for h in hooks:
        h.remove()
    assert grad_mode_in_backbone and not any(grad_mode_in_backbone)
    assert saved_in_backbone == []
    assert all(p.grad is None for p in clf.backbone.parameters())
    assert all(p.grad is not None for p in model.side.cell.parameters())
    assert all(p.grad is not None for p in clf.head.parameters())


@pytest.mark.parametrize("rnn", ["gru", "rnn", "lstm"])
@pytest.mark.parametrize("name", ["tiny-bert", "minilm-l6"])
def test_read_parameter_count_is_the_formula_and_independent_of_depth(name, rnn):
    clf = _classifier(name)
    read = ReadModel(clf, ReadConfig(hidden_size=16, rnn=rnn))
    d = hidden_size(clf.backbone.config)
    assert sum(p.numel() for p in read.side.parameters()) == side_parameter_formula(d, 16, rnn)
    head = sum(p.numel() for p in clf.head.parameters())
    assert trainable_parameter_count(read) == side_parameter_formula(d, 16, rnn) + head


def test_read_encoder_decoder_has_a_side_network_per_stack_and_a_joiner_that_shapes_the_output_after_one_step():
    clf = _classifier("tiny-t5")
    read = ReadModel(clf, ReadConfig(hidden_size=8)).eval()   # eval: no dropout, so outputs compare exactly
    assert read.encoder_side is not None and read.encoder_side.out is None and read.joiner is not None
    batch, labels = _batch("tiny-t5"), torch.tensor([0, 2])
    optimizer = torch.optim.SGD([p for p in read.parameters() if p.requires_grad], lr=0.5)

    def step() -> None:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(read(**batch), labels).backward()
        optimizer.step()

    def grad_sum(p: torch.Tensor) -> float:
        return 0.0 if p.grad is None else p.grad.abs().sum().item()

    def joiner_effect() -> float:
        """How far the logits move when the joiner's output is zeroed: what the joiner contributes."""
        with torch.no_grad():
            logits = read(**batch)
            handle = read.joiner.register_forward_hook(lambda _m, _i, out: torch.zeros_like(out))
            without = read(**batch)
            handle.remove()
        return (logits - without).abs().max().item()

    # W_o starts at zero: at step 0 the joiner cannot reach the output and gets no gradient; W_o does
    assert joiner_effect() == 0
    step()
    assert grad_sum(read.side.out.weight) > 0 and grad_sum(read.joiner.weight) == 0
    # one step later the joiner shapes the output, gets a gradient, and its own update changes the logits
    assert joiner_effect() > 1e-4
    with torch.no_grad():
        before = read(**batch)
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(read(**batch), labels).backward()
    assert grad_sum(read.joiner.weight) > 0
    joiner = {id(p) for p in read.joiner.parameters()}
    for p in read.parameters():
        if id(p) not in joiner:
            p.grad = None   # the joiner's update alone
    optimizer.step()
    with torch.no_grad():
        assert (read(**batch) - before).abs().max().item() > 1e-6


@pytest.mark.parametrize("name", TINY)
def test_lora_trains_adapters_and_head_only(name):
    clf = _classifier(name)
    model = get_method("lora").build(clf, LoraMethodConfig(rank=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert any("lora_A" in n for n in trainable) and any(n.startswith("head.") for n in trainable)
    logits = model(**_batch(name))
    assert logits.shape == (2, 3)


@pytest.mark.parametrize("name", TINY)
def test_full_trains_everything(name):
    clf = _classifier(name)
    model = get_method("full").build(clf, get_method("full").config())
    assert trainable_parameter_count(model) == sum(p.numel() for p in model.parameters())


def test_decoder_pools_the_last_real_token():
    clf = _classifier("tiny-gpt2").eval()
    batch = _batch("tiny-gpt2")
    with torch.no_grad():
        full = clf(**batch)
        # the first sentence is padded; cutting the padding off must not change its logits
        n = int(batch["attention_mask"][0].sum())
        alone = clf(input_ids=batch["input_ids"][:1, :n], attention_mask=batch["attention_mask"][:1, :n])
    torch.testing.assert_close(full[:1], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_read_mean_pooling_ignores_padding_once_trained(name):
    clf = _classifier(name, pooling="mean").eval()
    read = ReadModel(clf, ReadConfig(hidden_size=8)).eval()
    torch.nn.init.normal_(read.side.out.weight)  # a trained-looking W_o, so the side network matters
    batch = _batch(name)
    n = int(batch["attention_mask"][0].sum())
    assert n < batch["attention_mask"].shape[1]  # the first sentence is padded
    with torch.no_grad():
        both = read(**batch)
        alone = read(input_ids=batch["input_ids"][:1, :n], attention_mask=batch["attention_mask"][:1, :n],
                     token_type_ids=None if batch["token_type_ids"] is None else batch["token_type_ids"][:1, :n])
        zero_side = ReadModel(clf, ReadConfig(hidden_size=8)).eval()(**batch)
    torch.testing.assert_close(both[:1], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(both, zero_side)
