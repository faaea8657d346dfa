#!/usr/bin/env bash
# Runs Talon locally: one coordinator (a one-node Raft cluster, state in
# ./talon-data, OpenAI-compatible API on :7480) and one node agent, with a
# demo model whose replicas the agent serves. The agent uses the real GPUs when NVML
# works on this host, and otherwise a simulated mixed fleet (H100s with MIG,
# A100s, L4s). Ctrl-C stops both. `talon up` (one process) will replace this.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet -p talon-coordinator -p talon-node-agent -p talon-client --bins
bin=target/debug
token=${TALON_JOIN_TOKEN:-local-dev-join-token-0001}
data=${TALON_DATA_DIR:-./talon-data}

"$bin/talon-coordinator" --bootstrap --data-dir "$data" --join-token "$token" &
coordinator=$!
trap 'kill $coordinator ${agent:-} 2>/dev/null; wait' EXIT INT TERM

if "$bin/talon-agent" --join-token "$token" --probe nvml --calibrate false --check >/dev/null 2>&1; then
  fleet=(--probe nvml)
  echo "talon: using this host's NVIDIA GPUs"
else
  fleet=(--sim-gpus "h100-sxm:2:mig=3g.40gb+3g.40gb,a100-80gb:2,l4:2")
  echo "talon: no NVIDIA driver here; simulating 2x H100 (MIG 3g.40gb x2), 2x A100-80GB, 2x L4"
fi
"$bin/talon-agent" --node-id "$(hostname | tr -c 'A-Za-z0-9._\n-' '-')" --join-token "$token" \
  --http-listen 127.0.0.1:7481 --credential-file "$data/agent.credential" "${fleet[@]}" &
agent=$!

# The bootstrapped coordinator writes the first admin key here (mode 0600).
export TALON_KEY_FILE="$data/admin.key"
for _ in $(seq 100); do
  [ -f "$TALON_KEY_FILE" ] && "$bin/talon" node list >/dev/null 2>&1 && break
  sleep 0.1
done
# A demo model: the reconciler places two replicas, the agent runs them.
"$bin/talon" model get demo >/dev/null 2>&1 || "$bin/talon" model create demo --version v1 --engine simulated \
  --artifact file:///models/demo --memory-mib 8000 --latency-slo-ms 1000 --min-replicas 2 --max-replicas 2 >/dev/null
echo "talon: OpenAI-compatible API at http://127.0.0.1:7480/v1 (model \"demo\"); admin gRPC 127.0.0.1:7400"
echo "talon: admin key in $TALON_KEY_FILE; export TALON_KEY_FILE=$TALON_KEY_FILE for the CLI"
echo "talon: try: curl -s 127.0.0.1:7480/v1/chat/completions -H \"authorization: Bearer \$(cat $TALON_KEY_FILE)\" -H 'content-type: application/json' -d '{\"model\":\"demo\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}'"
echo "talon:      $bin/talon node list    $bin/talon replica list    $bin/talon cluster status"
wait "$coordinator"
