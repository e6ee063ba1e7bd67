#!/usr/bin/env bash
# Installs the MCP clients the `needs clients` lane drives, under target/clients:
#   - the official Python SDK (`mcp` from PyPI) and uv/uvx, in a venv;
#   - the MCP Inspector CLI (`@modelcontextprotocol/inspector` from npm).
# Idempotent: a second run with everything present does nothing. Prints the
# paths it prepared as KEY=VALUE lines for the tests.
set -euo pipefail
cd "$(dirname "$0")/../.."
root="${CARGO_TARGET_DIR:-target}/clients"
mkdir -p "$root"
root="$(cd "$root" && pwd)"

venv="$root/venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import mcp' 2>/dev/null || [ ! -x "$venv/bin/uvx" ]; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'mcp>=1.9' uv >&2
fi

inspector="$root/inspector"
if [ ! -x "$inspector/node_modules/.bin/mcp-inspector" ]; then
  mkdir -p "$inspector"
  [ -f "$inspector/package.json" ] || echo '{"name":"meshbox-test-clients","private":true}' >"$inspector/package.json"
  (cd "$inspector" && npm install --no-audit --no-fund --loglevel=error @modelcontextprotocol/inspector >&2)
fi

echo "PYTHON=$venv/bin/python"
echo "UVX=$venv/bin/uvx"
echo "INSPECTOR=$inspector/node_modules/.bin/mcp-inspector"
echo "NPX=$(command -v npx)"
