# Sourced by the benchmark scripts: time_tpch_queries PORT prints " q1=MS … q22=MS total_ms=MS"
# for the 22 built-in TPC-H queries run one by one through `$Q sql` against the coordinator.
time_tpch_queries() {
  local port=$1 total=0 line=""
  for q in $(seq 1 22); do
    local s=$(date +%s%N)
    $Q sql --coordinator http://127.0.0.1:$port --tpch-query $q --format csv >/dev/null || echo "q$q failed" >&2
    local e=$(( ($(date +%s%N) - s) / 1000000 ))
    total=$((total + e)); line="$line q$q=$e"
  done
  echo "$line total_ms=$total"
}
