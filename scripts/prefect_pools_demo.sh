#!/usr/bin/env bash
# A real Prefect server on 127.0.0.1 with two process work pools (cpu, gpu), one worker
# each, the deployments of prefect.yaml, and one dispatched pipeline run: the compress flow
# runs on the cpu pool's worker and sends every prune-retrain round to the gpu pool's worker.
#   bash scripts/prefect_pools_demo.sh        (state under .prefect-demo/; Ctrl-C or the end stops all)
set -euo pipefail
set -m  # background jobs in their own process groups: otherwise they ignore SIGINT
cd "$(dirname "$0")/.."
export PFP_REPO=$PWD
export PREFECT_HOME=$PWD/.prefect-demo
export PREFECT_API_URL=http://127.0.0.1:${PORT:-4200}/api
export PREFECT_SERVER_ANALYTICS_ENABLED=false
BIN=$PWD/.venv/bin
mkdir -p "$PREFECT_HOME"
pids=()
# Workers and server stop on SIGINT; whatever is still up 10 s later is killed.
cleanup() {
  kill -INT "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 20); do
    alive=0; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && return; sleep 0.5
  done
  kill -KILL "${pids[@]}" 2>/dev/null || true
}
trap cleanup EXIT

"$BIN/prefect" server start --host 127.0.0.1 --port "${PORT:-4200}" >"$PREFECT_HOME/server.log" 2>&1 &
pids+=($!)
for _ in $(seq 120); do
  curl -fsS "$PREFECT_API_URL/health" >/dev/null 2>&1 && break
  sleep 1
done
curl -fsS "$PREFECT_API_URL/health" >/dev/null || { echo "server did not come up; see $PREFECT_HOME/server.log" >&2; exit 1; }
echo "server up at $PREFECT_API_URL (UI: http://127.0.0.1:${PORT:-4200})"

for pool in cpu gpu; do
  "$BIN/prefect" work-pool inspect "$pool" >/dev/null 2>&1 || "$BIN/prefect" work-pool create "$pool" --type process >/dev/null
  "$BIN/prefect" worker start --pool "$pool" --work-queue default --type process >"$PREFECT_HOME/worker-$pool.log" 2>&1 &
  pids+=($!)
done
# prefect.yaml also declares the edge device flows on the example's jetson-orin pool (no worker here).
"$BIN/prefect" work-pool inspect jetson-orin >/dev/null 2>&1 || "$BIN/prefect" work-pool create jetson-orin --type process >/dev/null
"$BIN/prefect" --no-prompt deploy --all >"$PREFECT_HOME/deploy.log" 2>&1 || { cat "$PREFECT_HOME/deploy.log" >&2; exit 1; }
echo "deployments: $("$BIN/prefect" deployment ls 2>/dev/null | grep -c pfp-) registered"

"$BIN/prefect" deployment run pfp-compress/quickstart-dispatched --watch
echo "worker logs: $PREFECT_HOME/worker-cpu.log, $PREFECT_HOME/worker-gpu.log"
grep -h "pfp-iteration" "$PREFECT_HOME/worker-gpu.log" | head -3 || true
