#!/usr/bin/env bash
# Tracing off against on, interleaved: two services on one repository (one sending spans to
# bench.otlp_sink), `bench http` at concurrency 8 against each in turn, and the service process's
# CPU time per request from /proc around each run (README "Tracing").
#   bench/tracing_cost.sh REPO IMAGES [ROUNDS] [OUT]
set -euo pipefail
repo=$1 images=$2 rounds=${3:-3} out=${4:-bench-results/tracing}
python=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
"$python" -m bench.otlp_sink --port 14317 >"$out/sink.log" 2>&1 &
sink=$!
"$python" -m service --model-repository "$repo" --port 18030 --grpc-port 0 --no-access-log \
  >"$out/off.log" 2>&1 &
off=$!
"$python" -m service --model-repository "$repo" --port 18040 --grpc-port 0 --no-access-log \
  --otlp-endpoint http://127.0.0.1:14317 >"$out/on.log" 2>&1 &
on=$!
trap 'kill -TERM "$off" "$on" "$sink" 2>/dev/null || true' EXIT
until curl -sf localhost:18030/readyz >/dev/null && curl -sf localhost:18040/readyz >/dev/null; do
  sleep 0.2
done
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
for round in $(seq "$rounds"); do
  for mode in off on; do
    if [ "$mode" = off ]; then pid=$off port=18030; else pid=$on port=18040; fi
    before=$(ticks "$pid")
    "$python" -m bench http --url "http://127.0.0.1:$port" --images "$images" --concurrency 8 \
      --requests 1500 --warmup-requests 0 --out "$out/$mode-$round" >"$out/$mode-$round.txt" 2>&1
    after=$(ticks "$pid")
    rate=$(grep '^| 8 ' "$out/$mode-$round.txt" | cut -d'|' -f5)
    echo "tracing $mode, round $round: images/s$rate, service CPU" \
      "$(awk "BEGIN {printf \"%.2f\", ($after - $before) * 1000 / $hz / 1500}") ms/request"
  done
done
