#!/usr/bin/env bash
# Start/stop the local services: the Prefect server (SQLite, PREFECT_HOME in this folder), the two
# process work pools with a worker each (`cpu`: the nightly parent and dataset builds; `gpu`:
# training and evaluation, concurrency 1), the deployments of prefect.yaml and, when asked, the
# local LLM server (the nightly flow starts its own for synthesis and stops it before training).
# Each runs in the foreground of its own session, detached with setsid and logging to a file:
# `prefect server start --background` dies offline when its first log line hits a closed pipe
# (measured), so we never use it.
#   scripts/services.sh up [prefect|workers|deploy|llm]...   scripts/services.sh down
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
RUN="${DOCTUNE_RUN_DIR:-$ROOT/.run}"; mkdir -p "$RUN" "$PREFECT_HOME"  # pid files and logs

wait_http() {  # url seconds name
  for _ in $(seq "$2"); do
    if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
    sleep 1
  done
  echo "$3 did not come up within $2 s; see $RUN/$3.log" >&2; tail -20 "$RUN/$3.log" >&2; return 1
}

running() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

start() {  # name command...
  local name=$1; shift
  if running "$name"; then echo "$name already running (pid $(cat "$RUN/$name.pid"))"; return 0; fi
  setsid "$@" >"$RUN/$name.log" 2>&1 < /dev/null &
  echo $! >"$RUN/$name.pid"
}

up_prefect() {
  start prefect prefect server start --host 127.0.0.1 --port "$PREFECT_SERVER_API_PORT"
  wait_http "$PREFECT_API_URL/health" 120 prefect
  echo "Prefect UI: http://127.0.0.1:$PREFECT_SERVER_API_PORT"
}

up_llm() {
  # --no-promoted: this server writes training data, which must come from the base model alone.
  start llm doctune serve --port "$DOCTUNE_LLM_PORT" --no-promoted
  wait_http "http://127.0.0.1:$DOCTUNE_LLM_PORT/health" 180 llm
  echo "LLM endpoint: http://127.0.0.1:$DOCTUNE_LLM_PORT/v1"
}

up_workers() {
  for pool in cpu gpu; do
    prefect work-pool inspect "$pool" >/dev/null 2>&1 || prefect work-pool create "$pool" --type process >/dev/null
  done
  prefect work-pool set-concurrency-limit gpu 1 >/dev/null  # one job owns the GPU (or the 2 cores) at a time
  # A worker killed with its machine leaves its run "Running"; runs send heartbeats and this
  # automation marks a run Crashed when they stop, so the pool's slot frees and a re-run resumes.
  prefect automation inspect "crash-silent-runs" >/dev/null 2>&1 ||
    python "$ROOT/scripts/zombie_automation.py" >/dev/null
  for pool in cpu gpu; do
    start "worker-$pool" prefect worker start --pool "$pool" --type process --name "doctune-$pool"
    echo "worker on pool $pool: log $RUN/worker-$pool.log"
  done
}

up_deploy() {
  (cd "$ROOT" && prefect --no-prompt deploy --all >"$RUN/deploy.log" 2>&1) ||
    { echo "deploy failed; see $RUN/deploy.log" >&2; tail -20 "$RUN/deploy.log" >&2; return 1; }
  echo "deployments: $(prefect deployment ls 2>/dev/null | grep -c '/') registered from prefect.yaml"
}

down() {
  for name in ${@:-worker-cpu worker-gpu llm prefect}; do
    if running "$name"; then
      pid=$(cat "$RUN/$name.pid")
      kill -INT -- "-$pid" 2>/dev/null || kill -INT "$pid" 2>/dev/null || true
      for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -KILL -- "-$pid" 2>/dev/null || true
      echo "stopped $name"
    fi
    rm -f "$RUN/$name.pid"
  done
}

cmd=${1:-}; shift || true
case "$cmd" in
  up) for s in "${@:-prefect workers deploy}"; do for t in $s; do "up_$t"; done; done ;;
  down) down ;;
  down-llm) down llm ;;
  *) echo "usage: $0 up [prefect|workers|deploy|llm]... | down" >&2; exit 2 ;;
esac
