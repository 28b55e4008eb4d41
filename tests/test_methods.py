"""The methods on every tiny backbone kind: what trains, what is frozen, READ's no-autograd backbone, its step-0
equivalence and parameter count."""

from __future__ import annotations

import pytest
import torch

from rayeff.methods import get_method, trainable_parameter_count
from rayeff.methods.lora import LoraMethodConfig
from rayeff.methods.read import ReadConfig, ReadModel, SideNetwork, fed_layers, side_parameter_formula
from rayeff.models import build_classifier, hidden_size, load_tokenizer, resolve_model

TINY = ["tiny-bert", "tiny-gpt2", "tiny-llama", "tiny-t5"]
READ_OPTIONS = {   # the side network's options, alone and all together
    "paper": {},
    "rnn": {"rnn": "rnn"},
    "lstm": {"rnn": "lstm", "aggregation": "last"},
    "h0 from embeddings": {"initial_state": "embeddings"},
    "linear projection": {"input_projection": "linear"},
    "layer gates": {"layer_gates": True},
    "top half, every 2nd": {"layers": "top_half", "layer_stride": 2},
    "two-layer bidirectional": {"recurrent_layers": 2, "bidirectional": True, "dropout": 0.1},
    "all": {"rnn": "lstm", "initial_state": "embeddings", "input_projection": "linear", "layer_gates": True,
            "layer_stride": 2, "recurrent_layers": 2, "bidirectional": True, "dropout": 0.1, "aggregation": "last"},
}
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
@pytest.mark.parametrize("options", ["paper", "all"])
def test_read_step0_logits_equal_the_backbones(name, pooling, options):
    if name == "tiny-t5" and pooling == "mean":
        pytest.skip("encoder-decoders read the decoder's single state")
    clf = _classifier(name, pooling).eval()
    batch = _batch(name)
    with torch.no_grad():
        expected = clf(**batch)
    read = ReadModel(clf, ReadConfig(hidden_size=8, **READ_OPTIONS[options])).eval()
    assert torch.equal(read(**batch), expected)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("options", list(READ_OPTIONS))
def test_read_backbone_gets_no_gradient_and_saves_no_activation(name, options):
    clf = _classifier(name)
    model = ReadModel(clf, ReadConfig(hidden_size=8, **READ_OPTIONS[options])).train()
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
    torch.nn.init.normal_(model.side.out.weight)   # a trained-looking W_o: every part of the side network counts
    model.zero_grad()
    model(**_batch(name)).sum().backward()
    assert all(p.grad is not None for p in model.side.parameters())
    for part in model.side.children():   # (one fed layer from h_0 = 0 leaves the hidden-to-hidden weights at 0)
        assert sum(p.grad.abs().sum() for p in part.parameters()) > 0 or not list(part.parameters()), part
    assert all(p.grad is not None for p in clf.head.parameters())


@pytest.mark.parametrize("options", list(READ_OPTIONS))
@pytest.mark.parametrize("name", ["tiny-bert", "minilm-l6", "tiny-t5"])
def test_read_parameter_count_is_the_formula(name, options):
    clf = _classifier(name)
    config = ReadConfig(hidden_size=16, **READ_OPTIONS[options])
    read = ReadModel(clf, config)
    d, depth = hidden_size(clf.backbone.config), clf.backbone.config.num_hidden_layers
    assert sum(p.numel() for p in read.side.parameters()) == side_parameter_formula(d, config, depth)
    expected = side_parameter_formula(d, config, depth) + sum(p.numel() for p in clf.head.parameters())
    if read.encoder_side is not None:   # T5: the encoder stack's network (no W_o) and the joiner
        expected += side_parameter_formula(d, config, clf.backbone.config.num_layers, with_output=False)
        expected += (config.directions * 16 + 1) * 16
    assert trainable_parameter_count(read) == expected


def test_read_on_an_encoder_decoder_of_unequal_depths_gives_each_stack_its_own():
    """T5 with 3 encoder and 2 decoder layers: the decoder-side network feeds the decoder's layers, the encoder-side
    one the encoder's; every option on, step 0 is the backbone's and the count is each stack's formula."""
    import transformers

    from rayeff.models import SequenceClassifier

    config = _classifier("tiny-t5").backbone.config
    config.num_layers, config.num_decoder_layers = 3, 2
    torch.manual_seed(0)
    clf = SequenceClassifier(transformers.T5Model(config), num_labels=3).eval()
    batch = _batch("tiny-t5")
    with torch.no_grad():
        expected = clf(**batch)
    options = ReadConfig(hidden_size=8, **{**READ_OPTIONS["all"], "layer_stride": 1})
    read = ReadModel(clf, options).eval()
    assert read.side.layers == [1, 2] and read.encoder_side.layers == [1, 2, 3]
    assert read.side.gates.scale.shape == (2,) and read.encoder_side.gates.scale.shape == (3,)
    assert torch.equal(read(**batch), expected)
    head = sum(p.numel() for p in clf.head.parameters())
    joiner = (options.directions * 8 + 1) * 8
    assert trainable_parameter_count(read) == (side_parameter_formula(32, options, 2) + head + joiner
                                               + side_parameter_formula(32, options, 3, with_output=False))


def test_read_parameters_with_the_papers_options_are_its_formula_whatever_the_depth():
    """METHODS.md: g(d r + r^2 + 2r) + (r d + d) + d per stack, g = 1 RNN, 3 GRU, 4 LSTM; no term in L."""
    for rnn, g in (("rnn", 1), ("gru", 3), ("lstm", 4)):
        for depth in (2, 6, 24):
            side = SideNetwork(384, depth, ReadConfig(hidden_size=16, rnn=rnn))
            assert sum(p.numel() for p in side.parameters()) == g * (384 * 16 + 16 * 16 + 32) + (16 * 384 + 384) + 384


def test_read_feeds_the_layers_it_is_told_to():
    assert fed_layers(ReadConfig(), 6) == [1, 2, 3, 4, 5, 6]
    assert fed_layers(ReadConfig(layers="top_half"), 6) == [4, 5, 6]
    assert fed_layers(ReadConfig(layer_stride=2), 6) == [2, 4, 6]
    assert fed_layers(ReadConfig(layers="top_half", layer_stride=2), 7) == [5, 7]
    assert fed_layers(ReadConfig(layer_stride=10), 6) == [6]
    side = SideNetwork(8, 6, ReadConfig(hidden_size=4, layers="top_half", initial_state="embeddings"))
    assert side.inputs([None] * 7) == [0, 4, 5, 6]
    with pytest.raises(ValueError, match="returned 5 layer states; its config says 6"):
        side.inputs([None] * 6)


def _states(n_layers: int, width: int = 8, n: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(n, width) for _ in range(n_layers)]


def test_read_initial_state_from_the_embeddings_is_a_projection_of_x0():
    side = SideNetwork(8, 2, ReadConfig(hidden_size=4, initial_state="embeddings", s_in=0.5)).eval()
    x0, x1, x2 = _states(3)
    with torch.no_grad():
        h0 = side.initial(0.5 * side.norm(x0))
        expected = side.rnn(0.5 * side.norm(torch.stack([x1, x2])), h0.unsqueeze(0))[0].mean(0)
        torch.testing.assert_close(side.summary([x0, x1, x2]), expected, rtol=0, atol=0)
        assert not torch.allclose(side.summary([2 * x0 + 1, x1, x2]), expected)   # x_0 matters
        # an LSTM of two layers: h_0 starts both layers' hidden states, their cell states start at zero
        lstm = SideNetwork(8, 2, ReadConfig(hidden_size=4, initial_state="embeddings", rnn="lstm",
                                            recurrent_layers=2)).eval()
        h0 = lstm.initial(lstm.norm(x0)).unsqueeze(0).expand(2, -1, -1)
        torch.testing.assert_close(lstm.summary([x0, x1, x2]), lstm.rnn(lstm.norm(torch.stack([x1, x2])),
                                                                         (h0, torch.zeros_like(h0)))[0].mean(0))
        zero = SideNetwork(8, 2, ReadConfig(hidden_size=4)).eval()
        zero.load_state_dict({k: v for k, v in side.state_dict().items() if not k.startswith("initial")})
        torch.testing.assert_close(zero.summary([x1, x2]), zero.rnn(zero.norm(torch.stack([x1, x2])))[0].mean(0))


def test_read_linear_projection_and_layer_gates_shape_the_recurrences_input():
    side = SideNetwork(8, 3, ReadConfig(hidden_size=4, input_projection="linear", layer_gates=True, s_in=0.5)).eval()
    states = _states(3)
    with torch.no_grad():
        side.gates.scale.copy_(torch.tensor([0.0, 2.0, 1.0]))
        u = torch.stack([g * 0.5 * side.project(side.norm(x)) for g, x in zip([0.0, 2.0, 1.0], states)])
        assert side.rnn.input_size == 4
        torch.testing.assert_close(side.summary(states), side.rnn(u)[0].mean(0))
        # a gate at zero silences its layer: what that layer holds no longer matters
        torch.testing.assert_close(side.summary([states[0] * 7 + 3, *states[1:]]), side.summary(states))


def test_read_bidirectional_last_is_each_directions_final_state_of_the_top_layer():
    config = ReadConfig(hidden_size=4, bidirectional=True, recurrent_layers=2, aggregation="last")
    side = SideNetwork(8, 3, config).eval()
    states = _states(3)
    torch.manual_seed(2)
    with torch.no_grad():
        output = side.rnn(side.norm(torch.stack(states)))[0]   # (steps, N, 2r): each step's top-layer states
        expected = torch.cat([output[-1, :, :4], output[0, :, 4:]], dim=1)   # forward ends last, backward first
        assert side.out.in_features == 8
        torch.testing.assert_close(side.summary(states), expected)
        # and the first layer's is not what it reads
        one_layer = SideNetwork(8, 3, config.model_copy(update={"recurrent_layers": 1})).eval()
        one_layer.load_state_dict(side.state_dict(), strict=False)
        assert not torch.allclose(one_layer.summary(states), expected)


def test_read_reads_a_checkpoint_of_its_earlier_hand_written_gru_cell():
    """Side networks saved before the recurrence was torch's nn.GRU held one nn.GRUCell as `cell.*`: they load,
    and compute what the cell loop computed: h_i = cell(s_in Norm(x_i), h_{i-1}), the mean of h_1..h_L."""
    torch.manual_seed(3)
    cell, side = torch.nn.GRUCell(8, 4), SideNetwork(8, 3, ReadConfig(hidden_size=4, s_in=0.5))
    saved = {"norm.weight": torch.rand(8) + 0.5, "out.weight": torch.randn(8, 4), "out.bias": torch.randn(8),
             **{f"cell.{k}": v for k, v in cell.state_dict().items()}}
    side.load_state_dict(saved)
    states = _states(3)
    with torch.no_grad():
        h, total = torch.zeros(3, 4), torch.zeros(3, 4)
        for x in states:
            h = cell(0.5 * side.norm(x), h)
            total = total + h
        torch.testing.assert_close(side.summary(states), total / 3)


def test_read_dropout_acts_in_training_only():
    side = SideNetwork(8, 3, ReadConfig(hidden_size=4, dropout=0.5, recurrent_layers=2))
    states = _states(3)
    with torch.no_grad():
        assert not torch.equal(side.train().summary(states), side.summary(states))
        assert torch.equal(side.eval().summary(states), side.summary(states))


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


@pytest.mark.parametrize("name, pooling", [("tiny-bert", "mean"), ("tiny-t5", "auto")])
def test_read_with_every_option_on_learns_a_batch_through_the_side_network_alone(name, pooling):
    clf = _classifier(name, pooling)
    read = ReadModel(clf, ReadConfig(hidden_size=8, **READ_OPTIONS["all"])).train()
    clf.head.requires_grad_(False)   # what is learned goes through the side network's correction
    batch, labels = _batch(name), torch.tensor([0, 2])
    optimizer = torch.optim.Adam([p for p in read.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(read(**batch), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_read_attention_pooling_starts_as_the_mean_and_learns_token_weights_without_touching_the_backbone(name):
    clf = _classifier(name, pooling="mean").eval()
    batch = _batch(name)
    with torch.no_grad():
        expected = clf(**batch)
    config = ReadConfig(hidden_size=8, attention_pooling=True, bidirectional=True)
    read = ReadModel(clf, config).eval()
    assert torch.equal(read(**batch), expected)   # v = 0: every real token weighs 1, the mean to the bit
    d, depth = hidden_size(clf.backbone.config), clf.backbone.config.num_hidden_layers
    assert trainable_parameter_count(read) == (side_parameter_formula(d, config, depth)
                                               + sum(p.numel() for p in clf.head.parameters()))
    torch.nn.init.normal_(read.token_scores.weight)
    torch.nn.init.normal_(read.side.out.weight)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        out = clf.run_backbone(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                               output_hidden_states=True)
        per_token = read.side.summary([x[real] for x in out.hidden_states[1:]])
        _, weights = read._mean_over_real_tokens(out.hidden_states, batch["attention_mask"])
        for row in range(real.shape[0]):   # each sequence: a softmax over its real tokens, scaled so its top is 1
            scores = read.token_scores(per_token[real.nonzero()[:, 0] == row]).squeeze(1)
            expected_weights = torch.softmax(scores, 0) / torch.softmax(scores, 0).max()
            torch.testing.assert_close(weights[row][real[row]], expected_weights)
            assert torch.all(weights[row][~real[row]] == 0)
        # a padded sequence pools as it does alone
        n = int(batch["attention_mask"][0].sum())
        alone = read(input_ids=batch["input_ids"][:1, :n], attention_mask=batch["attention_mask"][:1, :n],
                     token_type_ids=None if batch["token_type_ids"] is None else batch["token_type_ids"][:1, :n])
        torch.testing.assert_close(read(**batch)[:1], alone, rtol=1e-5, atol=1e-5)
    read.train()
    read(**batch).sum().backward()
    assert read.token_scores.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in clf.backbone.parameters())


def test_read_attention_pooling_needs_mean_pooling(refused_run):
    job = {"model": {"name": "tiny-bert"}, "data": {"task": "sst2", "train_subset": 16},
           "method": {"name": "read", "attention_pooling": True}, "training": {"max_steps": 1, "batch_size": 4}}
    assert "method.attention_pooling" in refused_run(job) and "model.pooling: mean" in refused_run(job)
    with pytest.raises(ValueError, match="needs a classifier with model.pooling: mean"):
        ReadModel(_classifier("tiny-bert"), ReadConfig(attention_pooling=True))
