#!/usr/bin/env bash
# Parameter server (1, 2, 4 servers) against ring allreduce on the emulated cluster: 4 workers, one rank per
# host, every link limited to 100 Mbit/s and then 1 Gbit/s each way (tc tbf). One `polytrain cluster` start
# per (bandwidth, host count) runs REPEATS seeds (benchmarks/bench_ps_cluster.py run); then the table.
# Needs root and iproute2 (see `polytrain cluster`). Usage: bash benchmarks/bench_ps_cluster.sh OUTDIR
set -euo pipefail
out=${1:?usage: bash benchmarks/bench_ps_cluster.sh OUTDIR}
here=$(cd "$(dirname "$0")" && pwd)
if [[ -e "$out" ]]; then
  echo "$out exists; choose a new OUTDIR" >&2
  exit 2
fi
mkdir -p "$out"
echo "== $(date -u +%FT%TZ), load average $(cut -d' ' -f1-3 /proc/loadavg)"
for bandwidth in ${BANDWIDTHS:-100mbit 1gbit}; do
  for servers in ${SERVERS:-0 1 2 4}; do
    polytrain cluster --hosts $((4 + servers)) --bandwidth "$bandwidth" --timeout "${TIMEOUT:-1800}" -- \
      python "$here/bench_ps_cluster.py" run --servers "$servers" --bandwidth "$bandwidth" \
        --repeats "${REPEATS:-3}" --out "$out/$bandwidth-$servers.jsonl"
  done
done
python "$here/bench_ps_cluster.py" summarize "$out"
