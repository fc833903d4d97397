#!/usr/bin/env bash
# The demo on embedded defaults: local Prefect server, local model server, sample docs in data/.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
t0=$(date +%s)
scripts/services.sh up prefect llm
echo "== build_dataset on data/docs (first run synthesizes; later runs are cached)"
doctune build-dataset data/docs | tee .run/build_dataset.log
dataset=$(tail -n 1 .run/build_dataset.log)
echo
echo "Dataset:    $dataset"
echo "            (card: $dataset/card.md)"
echo "Prefect UI: http://127.0.0.1:$PREFECT_SERVER_API_PORT  (flow runs and their artifacts)"
echo "Took $(( $(date +%s) - t0 )) s. The servers keep running for the UI; stop them with: make down"
