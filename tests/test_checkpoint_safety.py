"""Checkpoints are loaded as data, never run as code: RNG states are saved as tensors and ints that a weights-only
load reads back exactly, and a checkpoint file holding a pickled object (ours or DeepSpeed's) is refused with one
line naming it, before its code can run, in the worker and, on `rayeff run --resume`, before Ray starts."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from rayeff.cli import main
from rayeff.train.checkpoint_safety import (
    CheckpointRefused,
    check_checkpoint_files,
    rng_state,
    safe_load,
    set_rng_state,
    weights_only_loads,
)
from rayeff.train.checkpointer import STATE_FILE, Checkpointer
from rayeff.train.context import InProcessContext
from rayeff.train.state import TrainState


class Planted:
    """What an attacker pickles into a checkpoint: unpickling it calls open(marker, "w"), i.e. runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def write_like_deepspeed(folder: Path, saved_state: dict) -> None:
    """What the first-order loop writes into a checkpoint: a DeepSpeed model-states file holding the train state."""
    (folder / "deepspeed").mkdir()
    torch.save({"module": {"w": torch.ones(2)}, "train_state": saved_state},
               folder / "deepspeed" / "mp_rank_00_model_states.pt")


def read_like_deepspeed(folder: Path) -> dict:
    """... and reads back the way DeepSpeed does (torch.load with weights_only=False)."""
    return torch.load(folder / "deepspeed" / "mp_rank_00_model_states.pt", weights_only=False)["train_state"]


@pytest.fixture
def checkpoint(tmp_path):
    """The Checkpointer's folder as the in-process context keeps it, and a restore from a given folder."""

    def save() -> Path:
        ctx = InProcessContext(tmp_path / "train")
        Checkpointer(ctx).save(TrainState(step=3, losses=[0.5, 0.25]), {"joules": 1.0, "train_joules": 0.5}, {},
                               write_like_deepspeed)
        return ctx.latest

    def restore(folder: Path) -> TrainState:
        return Checkpointer(InProcessContext(folder.parent, resume=True)).restore(read_like_deepspeed)

    return save, restore


def draws() -> list:
    return [torch.rand(4).tolist(), torch.randn(2).tolist(), np.random.rand(3).tolist(),
            np.random.normal(size=3).tolist(), [random.random() for _ in range(3)], random.gauss(0, 1)]


def test_rng_states_are_saved_as_weights_only_data_and_restored_exactly(checkpoint):
    save, restore = checkpoint
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.normal()   # numpy then holds a cached Gaussian, Python's random a gauss_next: both must survive
    random.gauss(0, 1)
    folder = save()
    expected = draws()
    rng_file = folder / "rng_rank0.pt"
    torch.load(rng_file, weights_only=True)       # plain tensors and numbers: no pickled numpy or Python objects
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    state = restore(folder)
    assert draws() == expected
    assert state.step == 3 and state.losses == [0.5, 0.25]


def test_rng_state_round_trip_without_a_worker():
    state = rng_state(torch.device("cpu"))
    expected = draws()
    set_rng_state(state, torch.device("cpu"))
    assert draws() == expected


@pytest.mark.parametrize("planted_in", ["rng_rank0.pt", "deepspeed/mp_rank_00_model_states.pt"])
def test_a_checkpoint_holding_a_pickled_object_is_refused_and_never_run(checkpoint, tmp_path, planted_in):
    save, restore = checkpoint
    folder = save()
    marker = tmp_path / "code-ran"
    target = folder / planted_in
    torch.save({"torch": torch.get_rng_state(), "module": {}, "train_state": {}, "payload": Planted(marker)}, target)
    with pytest.raises(CheckpointRefused) as refused:
        restore(folder)
    message = str(refused.value)
    assert not marker.exists(), "the checkpoint's pickled code ran"
    assert len(message.splitlines()) == 1
    assert message.startswith(f"{target}: refused") and "pickled code (io.open)" in message


def test_weights_only_loads_holds_a_librarys_own_unsafe_load_to_weights_only(tmp_path):
    """What guards DeepSpeed's own torch.load(weights_only=False) if a file changes after the check."""
    original = torch.load
    marker = tmp_path / "code-ran"
    path = tmp_path / "optim_states.pt"
    torch.save({"state": torch.zeros(1), "payload": Planted(marker)}, path)
    with weights_only_loads(), pytest.raises(CheckpointRefused, match="pickled code"):
        torch.load(path, weights_only=False)
    assert not marker.exists()
    torch.save({"state": torch.zeros(1)}, path)
    with weights_only_loads():
        assert torch.equal(torch.load(path, weights_only=False)["state"], torch.zeros(1))
    assert torch.load is original   # put back after the block


def test_a_truncated_checkpoint_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "rng_rank0.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointRefused) as refused:
        check_checkpoint_files(tmp_path)
    assert len(str(refused.value).splitlines()) == 1 and "rng_rank0.pt: refused" in str(refused.value)


def test_expert_optimizer_state_loads_weights_only(tmp_path):
    """ExpertOptimizer.save's contents: weights, torch AdamW's and a transformers schedule's state dicts."""
    from transformers import get_scheduler

    layer = torch.nn.Linear(3, 3)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    scheduler = get_scheduler("cosine", optimizer, num_training_steps=10, num_warmup_steps=2)
    layer(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    torch.save({"weights": {"w": layer.weight.detach()}, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "workers": 2}, tmp_path / "experts_rank0.pt")
    saved = safe_load(tmp_path / "experts_rank0.pt")
    assert saved["workers"] == 2 and saved["scheduler"]["last_epoch"] == 1
    torch.optim.AdamW(layer.parameters(), lr=1e-3).load_state_dict(saved["optimizer"])


def test_resume_from_a_tampered_checkpoint_is_refused_before_ray_starts(tmp_path, capsys, monkeypatch):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", no_ray)
    data = tmp_path / "glue" / "SST-2"
    data.mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        (data / name).write_text("sentence\tlabel\n" + "".join(f"good {i}\t1\nbad {i}\t0\n" for i in range(4)))
    job = tmp_path / "job.yaml"
    job.write_text("model: {name: tiny-bert}\ndata: {task: sst2}\nmethod: {name: read}\n"
                   "training: {max_steps: 4, batch_size: 4}\n")
    step = tmp_path / "out" / "train" / "step_00000002"
    step.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    torch.save({"torch": torch.get_rng_state(), "payload": Planted(marker)}, step / "rng_rank0.pt")
    (step / STATE_FILE).write_text(json.dumps({"step": 2}))
    code = main(["run", str(job), "--data-dir", str(tmp_path / "glue"), "--output", str(tmp_path / "out"),
                 "--resume", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert str(step / "rng_rank0.pt") in err and "pickled code" in err
    assert not marker.exists()


DEEPSPEED_CHECKPOINTS = textwrap.dedent("""
    import os, sys
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    import torch, torch.distributed as dist
    dist.init_process_group("gloo", rank=0, world_size=1)
    import deepspeed
    from transformers import get_scheduler
    from rayeff.train.checkpoint_safety import check_checkpoint_files, weights_only_loads
    from rayeff.train.first_order import initialize_deepspeed

    def engine(stage, precision, seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sched = get_scheduler("linear", opt, num_training_steps=10, num_warmup_steps=1)
        config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                  "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
                  "bf16": {"enabled": precision == "bf16"}, "zero_allow_untested_optimizer": True,
                  "zero_force_ds_cpu_optimizer": False, "steps_per_print": 2**31 - 1}
        return initialize_deepspeed(model=model, optimizer=opt, lr_scheduler=sched, config=config)

    def params(e):
        with deepspeed.zero.GatheredParameters(list(e.module.parameters()), enabled=e.zero_optimization_stage() == 3):
            return [p.detach().float().clone() for p in e.module.parameters()]

    for stage in (0, 1, 2, 3):
        for precision in ("fp32", "bf16"):
            folder = os.path.join(sys.argv[1], f"zero{stage}-{precision}")
            trained = engine(stage, precision, 0)
            x = torch.randn(4, 8, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
            trained.backward(trained(x).float().pow(2).mean())
            trained.step()
            trained.save_checkpoint(folder, tag="deepspeed", client_state={"train_state": {"step": 1, "losses": [0.5]}})
            check_checkpoint_files(folder)
            fresh = engine(stage, precision, 1)
            with weights_only_loads():
                _, client = fresh.load_checkpoint(folder, tag="deepspeed")
            assert client["train_state"] == {"step": 1, "losses": [0.5]}
            assert all(torch.equal(a, b) for a, b in zip(params(trained), params(fresh))), (stage, precision)
            print("ok", stage, precision, flush=True)
""")


@pytest.mark.slow
def test_deepspeed_checkpoints_of_every_zero_stage_load_weights_only(tmp_path):
    """Real DeepSpeed checkpoints (ZeRO 0-3, fp32 and bf16) pass the check and load back through DeepSpeed's own
    engine.load_checkpoint held to weights-only loads, with the weights restored: the allow-list is complete."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([sys.executable, "-c", DEEPSPEED_CHECKPOINTS, str(tmp_path), str(port)],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("ok ") == 8, done.stdout
