"""The scale-out table: `rayeff plan` of Llama-3-8B-, Llama-3-70B- and Mixtral-8x7B-shaped decoders (configs alone,
no weights), every method, at 8, 64 and 256 GPUs of 80 GB, one 2048-token sequence per GPU per step, bf16, ZeRO-3
for the first-order methods (LoRA on q/k/v/o). The methods are full, LoRA, READ, AdaZeta and MeZO; `moe` (upcycling a
dense model, ZeRO 0-2 only) is left out, Mixtral being the mixture of experts here.

    .venv/bin/python benchmarks/issue-19/scale-out.py     # writes scale-out.json and scale-out.md beside it
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig

from rayeff.config import load_job
from rayeff.plan.planner import plan_job

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
GPUS = (8, 64, 256)
GPU_MEMORY = 80e9
METHODS = ["full", "lora", "read", "adazeta", "mezo"]
SHAPES = {   # the published configs' shapes
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=8192, tie_word_embeddings=False),
    "llama-3-70b": dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        max_position_embeddings=8192, tie_word_embeddings=False),
    "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=32768, num_local_experts=8, num_experts_per_tok=2,
                         tie_word_embeddings=False),
}


def plan(name: str, gpus: int) -> dict:
    config = AutoConfig.for_model(**SHAPES[name])
    job = load_job(ROOT / "jobs" / "sums-causal-lm.yaml", [
        f"scaling.num_workers={gpus}", "scaling.gpus_per_worker=1", f"training.batch_size={gpus}",
        "training.max_seq_length=2048", "deepspeed.zero_stage=3", "deepspeed.precision=bf16",
        "method.target_modules=[q_proj, k_proj, v_proj, o_proj]"])
    job.model.name = name
    return plan_job(job, config, METHODS, round(GPU_MEMORY)).model_dump(mode="json")


def table(plans: dict) -> str:
    head = "| model | method | trainable | " + " | ".join(f"{n} GPUs: GB/GPU, sent/step" for n in GPUS) + " |"
    lines = [head, "|" + "---|" * (3 + len(GPUS))]
    for name, by_gpus in plans.items():
        for method in METHODS:
            cells, trainable = [], "-"
            for n in GPUS:
                p = by_gpus[str(n)]
                if method in p["methods"]:
                    m = p["methods"][method]
                    trainable = f"{m['trainable_params'] / 1e9:.3g} B" if m["trainable_params"] > 1e8 else \
                        f"{m['trainable_params'] / 1e6:.3g} M"
                    total, sent = m["memory_per_worker_bytes"]["total"] / 1e9, m["comm_bytes_per_step"] / 1e9
                    cells.append(f"{total:.1f}{'' if m['fits'] else ' (over)'}, {sent:.3g} GB")
                else:
                    cells.append("not planned")
            lines.append(f"| {name} | {method} | {trainable} | " + " | ".join(cells) + " |")
    refusals = sorted({(name, method, why) for name, by_gpus in plans.items() for p in by_gpus.values()
                       for method, why in p["refused"].items()})
    notes = [f"- {name}, {method}: {why}" for name, method, why in refusals]
    return "\n".join(lines) + ("\n\nNot planned:\n" + "\n".join(notes) if notes else "") + "\n"


def read_on_one_gpu(name: str) -> dict:
    """READ without ZeRO on one GPU (the backbone replicated): whether it needs a cluster at all."""
    config = AutoConfig.for_model(**SHAPES[name])
    job = load_job(ROOT / "jobs" / "sums-causal-lm.yaml", [
        "scaling.num_workers=1", "scaling.gpus_per_worker=1", "training.batch_size=1", "training.max_seq_length=2048",
        "deepspeed.zero_stage=0", "deepspeed.precision=bf16"])
    job.model.name = name
    return plan_job(job, config, ["read"], round(GPU_MEMORY)).model_dump(mode="json")


def main() -> None:
    plans = {name: {str(n): plan(name, n) for n in GPUS} for name in SHAPES}
    single = read_on_one_gpu("llama-3-8b")
    (HERE / "scale-out.json").write_text(json.dumps({**plans, "read_8b_one_gpu_zero_0": single}, indent=1) + "\n")
    (HERE / "scale-out.md").write_text(table(plans))
    print(table(plans))


if __name__ == "__main__":
    main()
