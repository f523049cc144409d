#!/usr/bin/env bash
# FireCaffe Fig. 3.5 on the emulated cluster: parameter server (central) against reduction tree (tree)
# allreduce time as the number of hosts grows, one rank per host, links of 1 Gbit/s each way.
# Needs root and iproute2 (see `polytrain cluster`). Prints one JSON report per host count.
set -euo pipefail
bandwidth=${BANDWIDTH:-1gbit}
for hosts in 2 3 4 6 8; do
  echo "== hosts $hosts, $bandwidth"
  polytrain cluster --hosts "$hosts" --bandwidth "$bandwidth" --timeout 900 -- \
    polytrain bench collectives --algorithms central,tree --sizes 4MB --repeats 7 --warmup 1 --json
done
