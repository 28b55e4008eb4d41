"""Run as a script (tests/test_memory_account.py starts it): DeepSpeed engines of tiny-bert for full, LoRA and MoE
at ZeRO 0-3 in float32 and bf16, each with rayeff's tensor account and, as the reference, the bytes of every distinct
tensor storage reachable from the engine and its optimizer, both taken after a backward and before the optimizer
step (the second step, so that Adam's state exists). Prints one JSON object per case. Its own process: DeepSpeed
needs torch.distributed initialised, which the test process must not be."""

from __future__ import annotations

import collections
import json
import os
import sys

TRAVERSED = ("deepspeed", "torch.optim", "torch.nn", "transformers", "rayeff", "peft")


def reachable_storage_bytes(*roots) -> int:
    """Every tensor reachable through attributes, containers, `.grad` and ZeRO-3's `.ds_tensor` from `roots`
    (objects of the libraries that build an engine), each storage counted once; meta tensors hold no memory."""
    import torch

    seen, storages = set(), {}
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if torch.is_tensor(obj):
            storage = obj.untyped_storage()
            if storage.nbytes() and obj.device.type != "meta":   # a meta tensor holds no memory
                storages[storage.data_ptr()] = storage.nbytes()
            stack += [t for t in (obj.grad, getattr(obj, "ds_tensor", None)) if t is not None]
        elif isinstance(obj, dict):
            stack += list(obj.keys()) + list(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset, collections.deque)):
            stack += list(obj)
        elif type(obj).__module__.startswith(TRAVERSED) and hasattr(obj, "__dict__"):
            stack += list(vars(obj).values())
    return sum(storages.values())


def case(method: str, stage: int, precision: str) -> dict:
    import torch

    from rayeff.config import validate_job
    from rayeff.measure.memory import SavedActivationCounter, tensor_account
    from rayeff.methods import get_method
    from rayeff.models import build_classifier, resolve_model
    from rayeff.train.first_order import deepspeed_config, initialize_deepspeed, optimizer_groups

    spec = {"moe": {"name": "moe", "upcycle": {"experts": 2, "top_k": 1}}}.get(method, {"name": method})
    job = validate_job({"model": {"name": "tiny-bert"}, "data": {"task": "sst2"}, "method": spec,
                        "deepspeed": {"zero_stage": stage, "precision": precision}, "training": {"batch_size": 4}})
    torch.manual_seed(0)
    model = get_method(method).build(build_classifier(resolve_model("tiny-bert"), 2), job.method)
    optimizer = torch.optim.AdamW(optimizer_groups(model.parameters(), 0.01), lr=1e-3)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    engine = initialize_deepspeed(model=model, optimizer=optimizer, config=deepspeed_config(job, trainable))
    counter = SavedActivationCounter(engine.module)
    batch = {"input_ids": torch.randint(5, 1000, (4, 8)), "attention_mask": torch.ones(4, 8, dtype=torch.long)}
    for step in range(2):
        with counter:
            loss = engine(**batch).float().logsumexp(-1).mean()
        engine.backward(loss)
        if step == 0:
            engine.step()
    account = tensor_account(engine.module, engine.optimizer, counter)
    from deepspeed.comm import comm

    return {"inference_comm_op": comm.cdb.shm_comm_op is not None, "method": method, "stage": stage,
            "precision": precision,
            "account": account.param_bytes + account.buffer_bytes + account.grad_bytes +
            account.optimizer_state_bytes, "reachable": reachable_storage_bytes(engine, engine.optimizer),
            "param_bytes": account.param_bytes, "buffer_bytes": account.buffer_bytes,
            "grad_bytes": account.grad_bytes, "optimizer_state_bytes": account.optimizer_state_bytes,
            "activations": account.peak_activation_bytes}


def main(port: str) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    import torch.distributed as dist

    from rayeff.quiet import quiet_libraries

    quiet_libraries()
    dist.init_process_group("gloo", rank=0, world_size=1)
    for method in ("full", "lora", "moe"):
        for stage in (0, 1, 2, 3):
            for precision in ("fp32", "bf16"):
                if not (method == "moe" and stage == 3):   # refused for MoE
                    print(json.dumps(case(method, stage, precision)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
