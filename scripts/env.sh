# Project-local environment for every doctune script: nothing leaves the machine, Prefect state
# stays in this folder. Source it: `. scripts/env.sh`.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export DOCTUNE_ROOT="$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PREFECT_HOME="${PREFECT_HOME:-$ROOT/.prefect}"
export PREFECT_SERVER_API_PORT="${PREFECT_SERVER_API_PORT:-4200}"
export PREFECT_API_URL="${PREFECT_API_URL:-http://127.0.0.1:$PREFECT_SERVER_API_PORT/api}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS=false
export PREFECT_RESULTS_PERSIST_BY_DEFAULT=true
# Our modules log with the standard logger; this sends those lines to the Prefect UI as well.
export PREFECT_LOGGING_EXTRA_LOGGERS="doctune,tasks,flows" PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW=ignore
export PREFECT_LOCAL_STORAGE_PATH="${PREFECT_LOCAL_STORAGE_PATH:-$PREFECT_HOME/storage}"
export DOCTUNE_LLM_PORT="${DOCTUNE_LLM_PORT:-8765}"
export PATH="$ROOT/.venv/bin:$PATH"
# Deployment runs send a heartbeat every 30 s (Prefect's minimum); scripts/zombie_automation.py
# marks a run Crashed when they stop. Workers look for new runs every 5 s instead of 10.
export PREFECT_FLOWS_HEARTBEAT_FREQUENCY="${PREFECT_FLOWS_HEARTBEAT_FREQUENCY:-30}"
export PREFECT_WORKER_QUERY_SECONDS="${PREFECT_WORKER_QUERY_SECONDS:-5}"
