#!/usr/bin/env bash
# Data, tensor, pipeline and hybrid parallelism of AlexNet and VGG-16 on the emulated cluster: 4 hosts, one
# rank each, every link limited to 1 Gbit/s and then 100 Mbit/s each way (tc tbf). One `polytrain cluster`
# start per bandwidth runs every model x layout REPEATS times (benchmarks/bench_hybrid_cluster.py run);
# then the table. Needs root and iproute2. Usage: bash benchmarks/bench_hybrid_cluster.sh OUTDIR
set -euo pipefail
out=${1:?usage: bash benchmarks/bench_hybrid_cluster.sh OUTDIR}
here=$(cd "$(dirname "$0")" && pwd)
if [[ -e "$out" ]]; then
  echo "$out exists; choose a new OUTDIR" >&2
  exit 2
fi
mkdir -p "$out"
echo "== $(date -u +%FT%TZ), load average $(cut -d' ' -f1-3 /proc/loadavg)"
for bandwidth in ${BANDWIDTHS:-1gbit 100mbit}; do
  polytrain cluster --hosts 4 --bandwidth "$bandwidth" --timeout "${TIMEOUT:-3000}" -- \
    python "$here/bench_hybrid_cluster.py" run --bandwidth "$bandwidth" --repeats "${REPEATS:-2}" \
      --out "$out/$bandwidth.jsonl"
done
python "$here/bench_hybrid_cluster.py" summarize "$out"
