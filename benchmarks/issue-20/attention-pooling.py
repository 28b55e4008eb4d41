"""READ with and without attention pooling, two training seeds each, scored on the whole dev set; run in process
(the loop `rayeff run` runs on one worker). From the repository root:
    .venv/bin/python benchmarks/issue-20/attention-pooling.py benchmarks/issue-20/attention-pooling.json
    .venv/bin/python benchmarks/issue-20/attention-pooling.py benchmarks/issue-20/attention-pooling-rte.json \
        --job jobs/rte-read.yaml --train-subset 0 --max-seq-length 128
"""
import argparse
import json

from rayeff.config import load_job, set_field, validate_job
from rayeff.train.runner import run_in_process

parser = argparse.ArgumentParser()
parser.add_argument("output")
parser.add_argument("--job", default="jobs/sst2-read.yaml")
parser.add_argument("--train-subset", type=int, default=2000, help="0: the whole training set")
parser.add_argument("--epochs", type=float, default=2)
parser.add_argument("--max-seq-length", type=int, default=64)
args = parser.parse_args()

rows = []
for seed in (1, 2):
    for attention in (False, True):
        raw = load_job(args.job).model_dump(mode="json")
        sets = {"data.train_subset": args.train_subset or None, "data.eval_subset": None,
                "training.epochs": args.epochs, "training.max_seq_length": args.max_seq_length,
                "training.eval_every": None, "training.checkpoint_every": None, "training.log_every": 16,
                "scaling.num_workers": 1, "data.data_dir": "../shared/data/glue", "training.seed": seed,
                "method.attention_pooling": attention, "output_dir": f"runs/attention-pooling/{seed}-{attention}"}
        for k, v in sets.items():
            set_field(raw, k, v)
        r = run_in_process(validate_job(raw))
        metric = next(iter(r["metrics"]))
        rows.append({"task": r["task"], "seed": seed, "attention_pooling": attention,
                     f"dev_{metric}": r["metrics"][metric], "train_seconds": r["time"]["train_seconds"]})
        print(rows[-1], flush=True)
json.dump(rows, open(args.output, "w"), indent=1)
