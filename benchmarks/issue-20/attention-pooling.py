"""READ on SST-2 with and without attention pooling, two training seeds each, scored on all 872 dev sentences; run
in process (the loop `rayeff run` runs on one worker). From the repository root:
    .venv/bin/python benchmarks/issue-20/attention-pooling.py benchmarks/issue-20/attention-pooling.json
"""
import json
import sys
from rayeff.config import load_job, set_field, validate_job
from rayeff.train.runner import run_in_process

rows = []
for seed in (1, 2):
    for attention in (False, True):
        raw = load_job("jobs/sst2-read.yaml").model_dump(mode="json")
        sets = {"data.train_subset": 2000, "data.eval_subset": None, "training.epochs": 2,
                "training.max_seq_length": 64, "training.eval_every": None, "training.checkpoint_every": None,
                "training.log_every": 16, "scaling.num_workers": 1, "data.data_dir": "../shared/data/glue",
                "training.seed": seed, "method.attention_pooling": attention,
                "output_dir": f"runs/attention-pooling/{seed}-{attention}"}
        for k, v in sets.items():
            set_field(raw, k, v)
        r = run_in_process(validate_job(raw))
        rows.append({"seed": seed, "attention_pooling": attention, "dev_accuracy": r["metrics"]["accuracy"],
                     "train_seconds": r["time"]["train_seconds"]})
        print(rows[-1], flush=True)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
