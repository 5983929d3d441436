#!/usr/bin/env bash
# Resume: the quickstart pipeline run once in full, then once killed (SIGTERM, as a cancelled
# worker does) as soon as round K has started, and restarted. Prints the three wall times.
#   bash benchmarks/resume_time.sh [K]        (K = 3 by default; scratch folders under /tmp)
set -u
K=${1:-3}
PFP=$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/pfp
full=$(mktemp -d) kill=$(mktemp -d)
now() { date +%s.%N; }
cd "$full"; s=$(now); "$PFP" run > out.log 2>&1; e=$(now)
echo "full run: $(echo "$e - $s" | bc) s"
cd "$kill"; s=$(now); "$PFP" run > out1.log 2>&1 & pid=$!
while [ ! -f "runs/quickstart/round_$K/retrain.ckpt" ] && kill -0 $pid 2>/dev/null; do sleep 0.2; done
kill -TERM $pid; wait $pid; e=$(now)
echo "killed in round $K after $(echo "$e - $s" | bc) s"
s=$(now); "$PFP" run > out2.log 2>&1; e=$(now)
echo "restart: $(echo "$e - $s" | bc) s"
grep -h "done in an earlier run\|resuming" out2.log
echo "logs: $full, $kill"
