#!/usr/bin/env bash
# The READ table: jobs/sweep-table-read.yaml's 48-point grid on five tasks and settings, each a `rayeff tune` grid
# sweep (one that was cut short is resumed), then `rayeff bench table` gathers their sweep.json files into
# benchmarks/issue-16/table-read.json. Run from the repository root: bash benchmarks/issue-16/make-table-read.sh
#   sst2        SST-2, 512 training examples drawn with seed 0, the first 500 dev sentences
#   sst2-128    the same task at a quarter of the data (a related setting, as a user would sweep it)
#   rte         RTE, 512 of its 2,490 training pairs, its 277 dev pairs
#   stsb        STS-B (regression, Pearson), 512 training pairs, the first 500 dev pairs
#   qnli-split  QNLI's dev.tsv (the only QNLI file here) split 70/30 with seed 0: 512 of the 3,824 for training, the
#               first 500 of the other 1,639 for dev
set -euo pipefail
glue=../shared/data/glue
out=${TABLE_RUNS:-runs/table-read}
tune() { name=$1; shift; [ -f "$out/$name/sweep.json" ] && return 0
         if [ -d "$out/$name" ]; then rayeff tune jobs/sweep-table-read.yaml --set output_dir="$out/$name" "$@" --resume
         else rayeff tune jobs/sweep-table-read.yaml --set output_dir="$out/$name" "$@"; fi; }
tune sst2 --data-dir $glue --set overrides.data.task=sst2
tune sst2-128 --data-dir $glue --set overrides.data.task=sst2 --set overrides.data.train_subset=128
tune rte --data-dir $glue --set overrides.data.task=rte
tune stsb --data-dir $glue --set overrides.data.task=stsb
tune qnli-split --set overrides.data.task=null --set overrides.data.train_file=$glue/QNLI/dev.tsv \
    --set overrides.data.dev_fraction=0.3 --set overrides.data.name=qnli-split \
    --set 'overrides.data.columns={text: question, text_pair: sentence, label: label}'
rayeff bench table "$out"/{sst2,sst2-128,rte,stsb,qnli-split} --output benchmarks/issue-16/table-read.json \
    --overwrite --made-by "bash benchmarks/issue-16/make-table-read.sh"
