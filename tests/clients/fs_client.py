"""Drives `meshbox run npm:@modelcontextprotocol/server-filesystem` with the
official MCP Python SDK, as an MCP client configured with meshbox instead of
npx would. Prints one JSON object with what each step answered.

usage: fs_client.py MESHBOX ALLOWED_DIR SECRET_FILE
"""
import asyncio
import json
import os
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client


def text(result):
    return "".join(getattr(c, "text", "") for c in result.content)


async def main():
    meshbox, allowed, secret = sys.argv[1:4]
    params = StdioServerParameters(
        command=meshbox,
        args=["run", "npm:@modelcontextprotocol/server-filesystem", "--mount", allowed, "--", allowed],
        env=dict(os.environ),
    )
    out = {}
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = await session.list_tools()
            out["tools"] = sorted(t.name for t in tools.tools)
            r = await session.call_tool("write_file", {"path": os.path.join(allowed, "written.txt"), "content": "hello from the sandbox"})
            out["write"] = {"error": bool(getattr(r, "is_error", None) or getattr(r, "isError", False)), "text": text(r)}
            r = await session.call_tool("list_directory", {"path": allowed})
            out["list"] = {"error": bool(getattr(r, "is_error", None) or getattr(r, "isError", False)), "text": text(r)}
            r = await session.call_tool("read_text_file", {"path": secret})
            out["secret"] = {"error": bool(getattr(r, "is_error", None) or getattr(r, "isError", False)), "text": text(r)}
    print(json.dumps(out))


asyncio.run(main())
