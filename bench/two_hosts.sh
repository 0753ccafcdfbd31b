#!/usr/bin/env bash
# Two hosts on one machine: `ppl fit` under torchrun across two network namespaces, against one process.
#
#   sudo bash bench/two_hosts.sh [MODEL DATA [FIT ARGS...]]     (default: models/logistic.ppl models/logistic.csv)
#
# Makes two network namespaces (pplA 10.77.0.1, pplB 10.77.0.2) joined by a veth pair: two hosts
# whose only route to each other is that link (no loopback shared between them). Runs
#   torchrun --nnodes 2 --nproc-per-node 1 --node-rank R --master-addr 10.77.0.1 -m ppl fit ...
# in each, then the same fit in one process, and prints the worst difference of the posterior means
# (in posterior sds) and of the ELBO. Needs root (ip netns) and iproute2; removes the namespaces it
# made on exit. Rendezvous and gloo traffic cross the veth link (GLOO_SOCKET_IFNAME names it).
# Each node reads its own rows of DATA (its byte range; a DATA with {rank} names each node's file).
# Minibatch fits (--batch-size) compare strictly too: every node draws the one-process batch of row
# numbers and evaluates the rows of it that it holds.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
MODEL="${1:-$ROOT/models/logistic.ppl}"
DATA="${2:-$ROOT/models/logistic.csv}"
shift $(( $# >= 2 ? 2 : $# ))
ARGS=("$@")
OUT="$(mktemp -d /tmp/ppl-two-hosts.XXXXXX)"
A=pplA; B=pplB

cleanup() { ip netns del "$A" 2>/dev/null || true; ip netns del "$B" 2>/dev/null || true; }
trap cleanup EXIT
cleanup
ip netns add "$A"; ip netns add "$B"
ip link add pplvA type veth peer name pplvB
ip link set pplvA netns "$A"; ip link set pplvB netns "$B"
ip -n "$A" addr add 10.77.0.1/24 dev pplvA; ip -n "$B" addr add 10.77.0.2/24 dev pplvB
for ns in "$A" "$B"; do ip -n "$ns" link set lo up; done
ip -n "$A" link set pplvA up; ip -n "$B" link set pplvB up

node() {   # node RANK NAMESPACE IFACE
  ip netns exec "$2" env GLOO_SOCKET_IFNAME="$3" OMP_NUM_THREADS=1 \
    "$PY" -m torch.distributed.run --nnodes 2 --nproc-per-node 1 --node-rank "$1" \
      --master-addr 10.77.0.1 --master-port 29511 \
      -m ppl fit "$MODEL" "$DATA" --seed 1 --format json --progress off "${ARGS[@]}" \
      >"$OUT/node$1.json" 2>"$OUT/node$1.err"
}
node 0 "$A" pplvA & p0=$!
node 1 "$B" pplvB & p1=$!
rc=0; wait $p0 || rc=$?; wait $p1 || rc=$?
if [[ $rc != 0 ]]; then
  echo "torchrun failed (exit $rc):"; tail -n 20 "$OUT"/node*.err; exit 1
fi
OMP_NUM_THREADS=1 "$PY" -m ppl fit "$MODEL" "$DATA" --seed 1 --format json --progress off "${ARGS[@]}" \
  >"$OUT/one.json"

"$PY" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
two, one = (json.load(open(f"{out}/{f}")) for f in ("node0.json", "one.json"))
worst = max(abs(two["params"][k]["mean"] - v["mean"]) / v["sd"] for k, v in one["params"].items())
print(f"two hosts: {two['device']}; {two['seconds']:.2f} s of fit")
print(f"one process: {one['seconds']:.2f} s of fit")
print(f"worst mean difference {worst:.2e} sd over {len(one['params'])} parameters; "
      f"ELBO {two['objective_value']:.10g} against {one['objective_value']:.10g}")
sys.exit(0 if worst < 1e-6 else 1)
PY
