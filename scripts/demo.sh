#!/usr/bin/env bash
# The demo on embedded defaults: local Prefect server, local model server, sample docs in data/:
# build the dataset, fine-tune SmolLM2-135M on it, evaluate base vs fine-tuned on the gold set.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
t0=$(date +%s)
scripts/services.sh up prefect llm

echo "== 1/3 build_dataset on data/docs (first run synthesizes; later runs are cached)"
doctune build-dataset data/docs | tee .run/build_dataset.log
dataset=$(tail -n 1 .run/build_dataset.log)
# The local model server is not needed for training: give its memory and cores back.
scripts/services.sh down-llm

echo "== 2/3 train on $dataset"
doctune train "$dataset" --config configs/demo.yaml | tee .run/train.log
run=$(tail -n 1 .run/train.log)

echo "== 3/3 evaluate base vs fine-tuned"
doctune evaluate "$run" --dataset-dir "$dataset" | tee .run/evaluate.log

echo
echo "Dataset:    $dataset   (card: $dataset/card.md)"
echo "Model run:  $run   (loss curve: $run/loss.png)"
echo "Prefect UI: http://127.0.0.1:$PREFECT_SERVER_API_PORT  (flow runs and their artifacts)"
echo "Took $(( $(date +%s) - t0 )) s. The Prefect server keeps running for the UI; stop it with: make down"
