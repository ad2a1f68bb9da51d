#!/usr/bin/env bash
# TPC-H SF1 on `quiver local --workers 2`: the 22 queries over local Parquet files, then over
# the same files in an S3-compatible server, alternating twice. Prints each query's ms and,
# for moto, how many requests the store served.
#   STORE=moto   (default) moto's server: pip install "moto[server]" boto3; slow per request
#                (about 150 ms each here), so it measures moto more than Quiver.
#   STORE=s3s    s3s-fs, a Rust S3 server over a directory: cargo install s3s-fs@0.14.1
#                --features binary (S3S_FS=path/to/s3s-fs). It hashes each whole file on every
#                GET (100% of a core), so it too measures the server.
#   STORE=http   nginx (apt-get install nginx-light) serving DATA over plain HTTP range
#                requests, read through object_store's HTTP store: Quiver's own cost of
#                reading a store, with a server that costs next to nothing. Needs one file
#                per table (HTTP stores list with WebDAV, which nginx lacks).
#   QUIVER=target/release/quiver DATA=quiver-data/tpch-sf1-f1-rg131072 scripts/bench-s3-vs-local.sh
set -u
source "$(dirname "$0")/tpch-queries.sh"
Q=${QUIVER:-target/release/quiver}
DATA=${DATA:?set DATA to a TPC-H SF1 directory, e.g. quiver-data/tpch-sf1-f1-rg131072}
STORE=${STORE:-moto}
PORT=45123
LOG=$(mktemp)
ROOT=$(mktemp -d)
if [ "$STORE" = http ]; then
  cat > "$ROOT/nginx.conf" <<NGX
worker_processes 1;
daemon off;
pid $ROOT/nginx.pid;
error_log $ROOT/error.log;
events { worker_connections 1024; }
http {
  access_log $LOG;
  keepalive_requests 100000;
  server { listen 127.0.0.1:$PORT; root $(realpath "$DATA"); }
}
NGX
  nginx -c "$ROOT/nginx.conf" &
  SERVER=$!
  sleep 1
elif [ "$STORE" = s3s ]; then
  mkdir -p "$ROOT/tpch" && cp -r "$DATA" "$ROOT/tpch/sf1"
  ${S3S_FS:-s3s-fs} --host 127.0.0.1 --port $PORT --access-key k --secret-key s "$ROOT" >"$LOG" 2>&1 &
  SERVER=$!
  sleep 1
else
  python3 -m moto.server -H 127.0.0.1 -p $PORT >"$LOG" 2>&1 &
  SERVER=$!
  sleep 3
  python3 - <<PY
import boto3, os
s3 = boto3.client("s3", endpoint_url="http://127.0.0.1:$PORT", aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1")
s3.create_bucket(Bucket="tpch")
for root, _, files in os.walk("$DATA"):
    for f in files:
        if f.endswith(".parquet"):
            p = os.path.join(root, f)
            s3.upload_file(p, "tpch", "sf1/" + os.path.relpath(p, "$DATA"))
PY
fi
trap "kill $SERVER 2>/dev/null; rm -rf $ROOT $LOG" EXIT
OPTS="OPTIONS ('aws.endpoint' 'http://127.0.0.1:$PORT', 'aws.allow_http' 'true', 'aws.region' 'us-east-1', 'aws.access_key_id' 'k', 'aws.secret_access_key' 's')"
run() { # mode
  local mode=$1 port=$((7100 + RANDOM % 500)) dir=$(mktemp -d)
  $Q local --workers 2 --serve --listen 127.0.0.1:$port --data-dir $dir >/dev/null 2>&1 &
  local pid=$!
  sleep 2
  for t in nation region part supplier partsupp customer orders lineitem; do
    if [ $mode = local ]; then loc="'$DATA/$t/'"; extra=""
    elif [ "$STORE" = http ]; then
      loc="'http://127.0.0.1:$PORT/$t/$(cd "$DATA/$t" && ls *.parquet)'"; extra="OPTIONS ('http.allow_http' 'true')"
    else loc="'s3://tpch/sf1/$t/'"; extra="$OPTS"; fi
    $Q sql --coordinator http://127.0.0.1:$port -c "CREATE EXTERNAL TABLE $t STORED AS PARQUET LOCATION $loc $extra" >/dev/null || echo "create $t failed"
  done
  local before=$(wc -l < "$LOG")
  local line="$mode$(time_tpch_queries $port)"
  if [ "$STORE" = http ] && [ $mode = store ]; then
    line="$line store_requests=$(( $(wc -l < "$LOG") - before ))"
  fi
  if [ "$STORE" = moto ] && [ $mode = store ]; then
    local after=$(wc -l < "$LOG")
    local gets=$(tail -n +$((before + 1)) "$LOG" | grep -c '"GET /tpch/sf1/[a-z]*/part')
    local lists=$(tail -n +$((before + 1)) "$LOG" | grep -c 'list-type')
    line="$line store_requests=$((after - before)) file_gets=$gets lists=$lists"
  fi
  echo "$line"
  kill $pid; wait $pid 2>/dev/null; rm -rf $dir
}
for round in 1 2; do run local; run store; done
