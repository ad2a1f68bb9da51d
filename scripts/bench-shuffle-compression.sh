#!/usr/bin/env bash
# TPC-H SF1 on `quiver local --workers 2 --over-network` (Task outputs over Flight on loopback,
# as between hosts) with each --shuffle-compression (none, lz4, zstd),
# alternating twice: total ms of the 22 queries, and the bytes that crossed loopback meanwhile
# (/proc/net/dev; Task outputs between workers and to the coordinator, plus the results).
#   QUIVER=target/release/quiver DATA=quiver-data/tpch-sf1-f1-rg131072 scripts/bench-shuffle-compression.sh
set -u
source "$(dirname "$0")/tpch-queries.sh"
Q=${QUIVER:-target/release/quiver}
DATA=${DATA:?set DATA to a TPC-H SF1 directory, e.g. quiver-data/tpch-sf1-f1-rg131072}
lo_bytes() { awk '$1 == "lo:" { print $2 }' /proc/net/dev; }
run() { # compression
  local mode=$1 port=$((7100 + RANDOM % 500)) dir=$(mktemp -d)
  $Q local --workers 2 --over-network --shuffle-compression "$mode" --serve --listen 127.0.0.1:$port --data-dir "$dir" >/dev/null 2>&1 &
  local pid=$!
  sleep 2
  for t in nation region part supplier partsupp customer orders lineitem; do
    $Q sql --coordinator http://127.0.0.1:$port -c "CREATE EXTERNAL TABLE $t STORED AS PARQUET LOCATION '$DATA/$t/'" >/dev/null || echo "create $t failed"
  done
  local before=$(lo_bytes)
  local line="$mode$(time_tpch_queries $port)"
  echo "$line loopback_mb=$(( ($(lo_bytes) - before) / 1000000 ))"
  kill $pid; wait $pid 2>/dev/null; rm -rf "$dir"
}
for round in 1 2; do run none; run lz4; run zstd; done
