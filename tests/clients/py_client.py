"""Drives one MCP endpoint with the official Python SDK 2.x client, as
meshbox's `needs clients` tests do:
    python py_client.py URL MODE PLAN_JSON      (MODE: auto | legacy; token from MESHBOX_TOKEN)
PLAN as in ts_client.mjs. Prints one JSON line of what it saw; exits 1 on failure."""
import json
import os
import sys
import time

import anyio
import httpx2
import mcp_types as types
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client

url, mode, plan = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
seen = {}


def fail(msg):
    print(f"py_client: {msg}", file=sys.stderr)
    print(json.dumps(seen))
    sys.exit(1)


def text_of(r):
    return "".join(c.text for c in r.content if getattr(c, "type", "") == "text")


async def on_elicit(_ctx, _params):
    seen["elicited"] = seen.get("elicited", 0) + 1
    return types.ElicitResult(action="accept", content={"name": "Meshbox", "confirm": True})


async def on_sample(_ctx, _params):
    seen["sampled"] = seen.get("sampled", 0) + 1
    return types.CreateMessageResult(
        role="assistant",
        content=types.TextContent(type="text", text="sampled by meshbox test"),
        model="test",
        stop_reason="endTurn",
    )


async def on_roots(_ctx):
    return types.ListRootsResult(roots=[types.Root(uri="file:///meshbox-test", name="t")])


async def main():
    headers = {}
    if os.environ.get("MESHBOX_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MESHBOX_TOKEN']}"
    http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=300))
    transport = streamable_http_client(url, http_client=http)
    async with Client(
        transport,
        mode=mode,
        elicitation_callback=on_elicit,
        sampling_callback=on_sample,
        list_roots_callback=on_roots,
        client_info=types.Implementation(name="meshbox-py-test", version="1.0.0"),
    ) as client:
        tools = await client.list_tools()
        seen["tools"] = [t.name for t in tools.tools]
        if "call" in plan:
            r = await client.call_tool(plan["call"]["name"], plan["call"]["arguments"])
            seen["call"] = text_of(r)
            if plan["call"]["expect"] not in seen["call"]:
                fail(f"call gave {seen['call']}")
        if "progress" in plan:
            n = 0

            async def on_progress(progress, total, message):
                nonlocal n
                n += 1

            await client.call_tool(plan["progress"]["name"], plan["progress"]["arguments"], progress_callback=on_progress)
            seen["progress"] = n
            if n < 1:
                fail("no progress")
        for k in ("elicit", "sample"):
            if k in plan:
                r = await client.call_tool(plan[k]["name"], plan[k]["arguments"])
                seen[k] = text_of(r)
                if plan[k]["expect"] not in seen[k]:
                    fail(f"{k} gave {seen[k]}")
        if "resource" in plan:
            r = await client.read_resource(plan["resource"])
            seen["resource"] = len(r.contents)
        if "prompt" in plan:
            r = await client.get_prompt(plan["prompt"]["name"], plan["prompt"]["arguments"])
            seen["prompt"] = len(r.messages)
        if "slow" in plan:
            t0 = time.monotonic()
            with anyio.move_on_after(0.3) as scope:
                await client.call_tool(plan["slow"]["name"], plan["slow"]["arguments"])
            if not scope.cancelled_caught:
                fail("the slow call was not cancelled")
            seen["cancelled_after_ms"] = int((time.monotonic() - t0) * 1000)
    print(json.dumps(seen))


try:
    anyio.run(main)
except SystemExit:
    raise
except BaseException as e:  # noqa: BLE001 - report anything as a failure
    import traceback

    traceback.print_exc()
    fail(repr(e))
