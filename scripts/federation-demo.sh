#!/usr/bin/env bash
# A three-institution federation on this machine, as a hospital network would run it across three:
# certificates, a SuperLink with TLS and SuperNode authentication, one SuperNode per institution with
# its own data file and state folder, FedPIT submitted with SecAgg+, the report printed. Every process
# it starts is stopped by its PID when it ends, fails or is interrupted (Ctrl-C).
#   scripts/federation-demo.sh [WORK_DIR] [--set KEY=VALUE ...]      (make federation-demo)
# FEDPIT_DEMO_CONFIG picks another experiment (default configs/federation-demo.toml);
# FEDPIT_DEMO_PORT the SuperLink's port (default 9091); FEDPIT_NODE_THREADS the CPU threads of each
# SuperNode (default 1: three institutions share this machine's cores, and oversubscribed threads
# spin against each other; on a machine of its own an institution takes all its cores).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${FEDPIT_BIN:-$root/.venv/bin}"
work="runs/federation-demo-$(date +%Y%m%d-%H%M%S)"
if (($#)) && [[ "$1" != --* ]]; then work="$1"; shift; fi
config="${FEDPIT_DEMO_CONFIG:-$root/configs/federation-demo.toml}"
port="${FEDPIT_DEMO_PORT:-9091}"
link="127.0.0.1:$port"
mkdir -p "$work/logs"
work="$(cd "$work" && pwd)"
started=()

stop_all() {
  local pid waited=0
  for pid in "${started[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done  # each helper stops its Flower processes
  for pid in "${started[@]}"; do
    while kill -0 "$pid" 2>/dev/null && ((waited < 60)); do sleep 0.5; waited=$((waited + 1)); done
    kill -KILL "$pid" 2>/dev/null || true
  done
  ((${#started[@]})) && echo "stopped ${#started[@]} processes (${started[*]})"
  return 0
}
trap stop_all EXIT
trap 'echo "interrupted"; exit 130' INT TERM
fedpit="$bin/fedpit"  # called directly, never through a function: `$!` must be the helper's own PID
step() { printf '\n== %s\n' "$*"; }

step "1. each institution's own examples: the config's few-shot clients, one JSONL file each"
"$fedpit" data "$config" --export "$work/data"
names=()
for file in "$work"/data/*.jsonl; do names+=("$(basename "$file" .jsonl)"); done

step "2. certificates: a CA, the SuperLink's certificate, one authentication key per institution"
bash "$root/scripts/make-certs.sh" "$work/certs" localhost 127.0.0.1 --nodes "${names[@]}"

step "3. the SuperLink, with TLS and SuperNode authentication (log: $work/logs/superlink.log)"
"$fedpit" flower --flwr-home "$work/flwr-home" superlink --host 127.0.0.1 --port "$port" --state-dir "$work/link" \
  --certs "$work/certs" --auth > "$work/logs/superlink.log" 2>&1 &
started+=($!)
for _ in $(seq 120); do (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.5; done
(echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "the SuperLink did not start; see $work/logs/superlink.log"; exit 1; }

step "4. register each institution's public key; start its SuperNode with its own data and state folder"
node_port=$((port + 10))
for name in "${names[@]}"; do
  "$fedpit" flower --flwr-home "$work/flwr-home" register "$work/certs/$name.pub" --superlink "$link" \
    --root-certificates "$work/certs/ca.crt"
  OMP_NUM_THREADS="${FEDPIT_NODE_THREADS:-1}" "$fedpit" flower --flwr-home "$work/home-$name" supernode --superlink "$link" --port "$node_port" \
    --state-dir "$work/nodes" --client-id "$name" --data-file "$work/data/$name.jsonl" \
    --root-certificates "$work/certs/ca.crt" --auth-key "$work/certs/$name" > "$work/logs/supernode-$name.log" 2>&1 &
  started+=($!)
  node_port=$((node_port + 1))
done

step "5. submit FedPIT with TLS and SecAgg+; the ServerApp writes the run directory"
"$fedpit" flower --flwr-home "$work/flwr-home" submit "$config" --superlink "$link" \
  --root-certificates "$work/certs/ca.crt" --run-dir "$work/run" --clients "${#names[@]}" "$@"

step "6. the report ($work/run/report.md)"
cat "$work/run/report.md"
echo
echo "run directory: $work/run"
