"""Memory and energy measurement against hand-computed values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rayeff.measure.energy import CpuTimeEstimateMeter, combine, make_meter
from rayeff.measure.memory import SavedActivationCounter, optimizer_state_bytes, tensor_account


def test_saved_activation_counter_counts_what_autograd_keeps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    x = torch.randn(8, 10)
    counter = SavedActivationCounter(model)
    with counter:
        model(x).sum().backward()
    # Linear 1 saves its input x (8x10); ReLU saves its output (8x20); Linear 2 saves its input, the same storage
    # as ReLU's output. Weights are parameters and not counted.
    assert counter.peak_bytes == (8 * 10 + 8 * 20) * 4


def test_saved_activation_counter_keeps_the_peak_over_steps():
    model = nn.Linear(4, 4)
    counter = SavedActivationCounter(model)
    for rows in (16, 2):
        with counter:
            model(torch.randn(rows, 4)).sum().backward()
    assert counter.last_bytes == 2 * 4 * 4
    assert counter.peak_bytes == 16 * 4 * 4


def test_no_grad_forward_saves_nothing():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU())
    counter = SavedActivationCounter(model)
    with counter, torch.no_grad():
        model(torch.randn(8, 10))
    assert counter.peak_bytes == 0


def test_tensor_account_of_adamw_after_a_step():
    model = nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 5))
    model[0].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    counter = SavedActivationCounter(model)
    with counter:
        model(torch.randn(3, 10)).sum().backward()
    optimizer.step()
    trainable = 20 * 5 + 5
    account = tensor_account(model, optimizer, counter, zero_stage=0, world_size=1)
    assert account.trainable_params == trainable
    assert account.total_params == trainable + 10 * 20 + 20
    assert account.param_bytes == account.total_params * 4
    assert account.grad_bytes == trainable * 4
    # exp_avg and exp_avg_sq per trainable tensor, plus one float32 `step` scalar per tensor (two tensors)
    assert optimizer_state_bytes(optimizer) == 2 * trainable * 4 + 2 * 4
    assert account.optimizer_state_bytes == optimizer_state_bytes(optimizer)
    assert account.peak_activation_bytes == 3 * 20 * 4  # only the trainable layer's input is saved
    partitioned = tensor_account(model, optimizer, counter, zero_stage=2, world_size=2)
    assert partitioned.grad_bytes == trainable * 4 // 2


def test_estimate_meter_grows_with_cpu_work_and_says_how():
    meter = CpuTimeEstimateMeter(watts_per_cpu=10.0)
    meter.start()
    x = torch.randn(400, 400)
    for _ in range(200):
        x = torch.tanh(x @ x)
    joules = meter.read_joules()
    assert joules > 0
    assert meter.source == "estimate" and "10 W" in meter.formula


def test_auto_meter_on_this_cpu_never_claims_a_measurement_it_cannot_make():
    meter = make_meter("auto", torch.device("cpu"), 10.0)
    assert meter.source in ("rapl", "estimate")
    with pytest.raises(RuntimeError, match="no GPU"):
        make_meter("nvml", torch.device("cpu"), 10.0)


def test_combine_counts_each_physical_counter_once():
    readings = [
        {"key": "rapl:host-a", "joules": 100.0, "source": "rapl", "formula": None},
        {"key": "rapl:host-a", "joules": 101.0, "source": "rapl", "formula": None},   # same package, 2nd worker
        {"key": "rapl:host-b", "joules": 50.0, "source": "rapl", "formula": None},
    ]
    assert combine(readings) == {"joules": 151.0, "source": "rapl"}
    est = combine([{"key": "estimate:h:1", "joules": 2.0, "source": "estimate", "formula": "E = t x P"},
                   {"key": "estimate:h:2", "joules": 3.0, "source": "estimate", "formula": "E = t x P"}])
    assert est == {"joules": 5.0, "source": "estimate", "formula": "E = t x P"}
