#!/usr/bin/env bash
# Time to a target test accuracy with each gradient compressor on the emulated cluster (4 hosts, one rank
# each, every link limited to 100 Mbit/s and then 1 Gbit/s each way with tc tbf), against the fp32 (`none`)
# and fp16 allreduce baselines trained in the same cluster session. Needs root and iproute2 (see
# `polytrain cluster`).
#
# One `polytrain cluster` start per bandwidth runs every (model, compressor) in turn on the same hosts
# (`bench_compression.py cluster-run`; starting 4 host processes costs ~10 s each time on 2 cores, which
# would be paid 60 times). Each run is what
#   polytrain cluster --hosts 4 --bandwidth 100mbit -- polytrain train --model M --dataset mnist5k \
#       [--set 'model_args.hidden=[1024, 1024]'] --compressor SPEC --epochs E --seed 0 --target-accuracy T
# trains, stopped after the first evaluation (once per epoch) at or above T; the schedule is that of E
# epochs. Not with --out: that checkpoints every epoch and gathers every rank's compressor state over the
# emulated links inside the timed wall time. Results: OUTDIR/BANDWIDTH/MODEL/SLUG/result.json (or
# diverged.txt), collected into OUTDIR/cluster.jsonl, one line per run.
#
# The 4 hosts share this machine's cores: compute is oversubscribed (2 cores here: 2x), so absolute times
# say little; compare a compressor with the baselines of the same bandwidth and session.
#
# Usage: bash benchmarks/bench_compression_cluster.sh OUTDIR
# Settings (environment): HOSTS (4), BANDWIDTHS ("100mbit 1gbit"), MODELS ("lenet5 mlp"),
#   EPOCHS ("lenet5=6 mlp=4"), TARGETS ("lenet5=0.9 mlp=0.88": fp32 reached them after 2 to 3 epochs here,
#   which leaves slower compressors room), SEED (0), FULL (1: train all epochs, not only to the target),
#   COMPRESSORS (specs separated by newlines; default: every spec of `bench_compression.py list`),
#   TIMEOUT (seconds for one cluster start, default 3600).
set -euo pipefail
out=${1:?usage: bash benchmarks/bench_compression_cluster.sh OUTDIR}
here=$(cd "$(dirname "$0")" && pwd)
hosts=${HOSTS:-4}
bandwidths=${BANDWIDTHS:-"100mbit 1gbit"}
read -r -a models <<< "${MODELS:-lenet5 mlp}"
read -r -a epochs <<< "${EPOCHS:-lenet5=6 mlp=4}"
read -r -a targets <<< "${TARGETS:-lenet5=0.9 mlp=0.88}"
mapfile -t specs < <(if [[ -n "${COMPRESSORS:-}" ]]; then printf '%s\n' "$COMPRESSORS"; else python "$here/bench_compression.py" list; fi)
full=()
[[ "${FULL:-0}" == 1 ]] && full=(--full)
if [[ -e "$out" ]]; then
  echo "$out exists; choose a new OUTDIR" >&2
  exit 2
fi
mkdir -p "$out"
echo "== $(date -u +%FT%TZ), load average $(cut -d' ' -f1-3 /proc/loadavg); ${#specs[@]} compressors x ${#models[@]} models per bandwidth"
for bandwidth in $bandwidths; do
  echo "== $hosts hosts, $bandwidth"
  polytrain cluster --hosts "$hosts" --bandwidth "$bandwidth" --timeout "${TIMEOUT:-3600}" -- \
    python "$here/bench_compression.py" cluster-run --out "$out/$bandwidth" --seed "${SEED:-0}" \
      --models "${models[@]}" --epochs "${epochs[@]}" --targets "${targets[@]}" --compressors "${specs[@]}" "${full[@]}" \
    || echo "== $bandwidth: the cluster run failed (status $?); the results written so far are kept"
done
python "$here/summarize_compression.py" collect "$out" > "$out/cluster.jsonl"
echo "== $(date -u +%FT%TZ), load average $(cut -d' ' -f1-3 /proc/loadavg); $(wc -l < "$out/cluster.jsonl") runs in $out/cluster.jsonl"
