#!/usr/bin/env bash
# The demo on embedded defaults, through the real deployment machinery: a local Prefect server, the
# `cpu` and `gpu` process pools with a worker each, the deployments of prefect.yaml, then one run of
# the `nightly` deployment over data/docs (sample documents of a fictional company): the cpu worker
# builds the dataset (starting the local model server for synthesis and stopping it after), the gpu
# worker trains SmolLM2-135M (configs/demo.yaml) and evaluates base vs fine-tuned; the better model
# is promoted. Running it again stops early: the documents did not change.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
t0=$(date +%s)
# Measured on a 2-core CPU machine without a GPU (bench/README.md): about 17 minutes after the install,
# 12 of them training SmolLM2-135M (6 epochs over the ~380 rows: ~290 steps).
echo "== doctune demo: about 17 minutes on 2 CPU cores (12 of them training), more on a busy machine;"
echo "   the run's log lines follow as they come (training prints its step, loss and the time left)"
scripts/services.sh up prefect workers deploy

echo "== nightly deployment run on data/docs (build on the cpu pool, train and evaluate on the gpu pool)"
doctune nightly data/docs --train-config configs/demo.yaml | tee .run/nightly.log

echo
echo "Prefect UI: http://127.0.0.1:$PREFECT_SERVER_API_PORT  (deployments, the nightly run, its child runs and artifacts)"
echo "Registry:   outputs/registry/docs/current.json and decisions.jsonl (the model is named after its folder)"
echo "Took $(( $(date +%s) - t0 )) s. The server and workers keep running (the nightly schedule is on); stop them with: make down"
