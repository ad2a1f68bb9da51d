#!/usr/bin/env bash
# TPC-H SF1 on `quiver local --workers 2`: the 22 queries over local Parquet files, then over
# the same files in moto's S3 server (pip install "moto[server]" boto3), alternating twice.
# Prints each query's ms and, for S3, how many requests the store served.
#   QUIVER=target/release/quiver DATA=quiver-data/tpch-sf1-f1-rg131072 scripts/bench-s3-vs-local.sh
set -u
Q=${QUIVER:-target/release/quiver}
DATA=${DATA:?set DATA to a TPC-H SF1 directory, e.g. quiver-data/tpch-sf1-f1-rg131072}
MOTO_PORT=45123
python3 -m moto.server -H 127.0.0.1 -p $MOTO_PORT >/tmp/moto.log 2>&1 &
MOTO=$!
trap "kill $MOTO 2>/dev/null" EXIT
sleep 3
python3 - <<PY
import boto3, os
s3 = boto3.client("s3", endpoint_url="http://127.0.0.1:$MOTO_PORT", aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1")
s3.create_bucket(Bucket="tpch")
for root, _, files in os.walk("$DATA"):
    for f in files:
        if f.endswith(".parquet"):
            p = os.path.join(root, f)
            s3.upload_file(p, "tpch", "sf1/" + os.path.relpath(p, "$DATA"))
print("uploaded")
PY
OPTS="OPTIONS ('aws.endpoint' 'http://127.0.0.1:$MOTO_PORT', 'aws.allow_http' 'true', 'aws.region' 'us-east-1', 'aws.access_key_id' 'k', 'aws.secret_access_key' 's')"
run() { # mode
  local mode=$1 port=$((7100 + RANDOM % 500)) dir=$(mktemp -d)
  $Q local --workers 2 --serve --listen 127.0.0.1:$port --data-dir $dir >/dev/null 2>&1 &
  local pid=$!
  sleep 2
  for t in nation region part supplier partsupp customer orders lineitem; do
    if [ $mode = local ]; then loc="'$DATA/$t/'"; extra=""; else loc="'s3://tpch/sf1/$t/'"; extra="$OPTS"; fi
    $Q sql --coordinator http://127.0.0.1:$port -c "CREATE EXTERNAL TABLE $t STORED AS PARQUET LOCATION $loc $extra" >/dev/null || echo "create $t failed"
  done
  local before=$(wc -l < /tmp/moto.log)
  local total=0 line="$mode"
  for q in $(seq 1 22); do
    local s=$(date +%s%N)
    $Q sql --coordinator http://127.0.0.1:$port --tpch-query $q --format csv >/dev/null || echo "q$q failed"
    local e=$(( ($(date +%s%N) - s) / 1000000 ))
    total=$((total + e)); line="$line q$q=$e"
  done
  local after=$(wc -l < /tmp/moto.log)
  local gets=$(tail -n +$((before + 1)) /tmp/moto.log | grep -c '"GET /tpch/sf1/[a-z]*/part')
  local lists=$(tail -n +$((before + 1)) /tmp/moto.log | grep -c 'list-type')
  echo "$line total_ms=$total store_requests=$((after - before)) file_gets=$gets lists=$lists"
  kill $pid; wait $pid 2>/dev/null; rm -rf $dir
}
for round in 1 2; do run local; run s3; done
