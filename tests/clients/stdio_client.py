"""Drives one server of an MCP client config with the official Python SDK.

usage: stdio_client.py CONFIG SERVER [TOOL JSON_ARGUMENTS]

CONFIG is a Claude Desktop style file ({"mcpServers": {name: {"command",
"args", "env"}}}); the server is started exactly as a client would start it
(the SDK's default environment plus the entry's `env`). Prints one JSON
object: {"tools": [names…], "call": <CallToolResult>?}.
"""

import asyncio
import json
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client


async def main():
    config, name = sys.argv[1], sys.argv[2]
    with open(config) as f:
        entry = json.load(f)["mcpServers"][name]
    params = StdioServerParameters(
        command=entry["command"], args=entry.get("args", []), env=entry.get("env")
    )
    out = {}
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = await session.list_tools()
            out["tools"] = sorted(t.name for t in tools.tools)
            if len(sys.argv) > 3:
                result = await session.call_tool(sys.argv[3], json.loads(sys.argv[4]))
                out["call"] = result.model_dump(mode="json", exclude_none=True)
    print(json.dumps(out))


# A first run installs the server: generous, but never forever.
asyncio.run(asyncio.wait_for(main(), timeout=600))
