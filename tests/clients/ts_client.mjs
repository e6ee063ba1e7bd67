// Drives one MCP endpoint with the official TypeScript client SDK 2.x over
// Streamable HTTP, as meshbox's `needs clients` tests do:
//   node ts_client.mjs URL MODE PLAN_JSON     (MODE: auto | legacy; TOKEN from MESHBOX_TOKEN)
// PLAN: {"call":{name,arguments,expect}, "progress":{name,arguments},
//        "elicit":{name,arguments,expect}, "sample":{…}, "resource":uri, "prompt":{name,arguments},
//        "slow":{name,arguments}}; every key optional. Prints one JSON line of what it saw;
// exits 1 on the first failure.
import { Client, StreamableHTTPClientTransport } from '@modelcontextprotocol/client';

const [url, mode, planText] = process.argv.slice(2);
const plan = JSON.parse(planText);
const headers = process.env.MESHBOX_TOKEN ? { Authorization: `Bearer ${process.env.MESHBOX_TOKEN}` } : {};
const seen = {};
const fail = (m) => { console.error(`ts_client: ${m}`); console.log(JSON.stringify(seen)); process.exit(1); };
const textOf = (r) => (r.content || []).filter((c) => c.type === 'text').map((c) => c.text).join('');

const client = new Client(
  { name: 'meshbox-ts-test', version: '1.0.0' },
  { capabilities: { elicitation: {}, sampling: {}, roots: {} }, versionNegotiation: { mode } }
);
client.setRequestHandler('elicitation/create', async () => {
  seen.elicited = (seen.elicited || 0) + 1;
  return { action: 'accept', content: { name: 'Meshbox', confirm: true } };
});
client.setRequestHandler('sampling/createMessage', async () => {
  seen.sampled = (seen.sampled || 0) + 1;
  return { role: 'assistant', content: { type: 'text', text: 'sampled by meshbox test' }, model: 'test', stopReason: 'endTurn' };
});
client.setRequestHandler('roots/list', async () => ({ roots: [{ uri: 'file:///meshbox-test', name: 't' }] }));

try {
  await client.connect(new StreamableHTTPClientTransport(new URL(url), { requestInit: { headers } }));
  seen.protocol = client.getNegotiatedProtocolVersion?.() ?? null;
  const tools = await client.listTools();
  seen.tools = tools.tools.map((t) => t.name);
  if (plan.call) {
    const r = await client.callTool(plan.call);
    seen.call = textOf(r);
    if (!seen.call.includes(plan.call.expect)) fail(`call gave ${seen.call}`);
  }
  if (plan.progress) {
    let n = 0;
    await client.callTool(plan.progress, { onprogress: () => { n++; }, resetTimeoutOnProgress: true });
    seen.progress = n;
    if (n < 1) fail('no progress');
  }
  for (const k of ['elicit', 'sample']) {
    if (plan[k]) {
      const r = await client.callTool({ name: plan[k].name, arguments: plan[k].arguments });
      seen[k] = textOf(r);
      if (!seen[k].includes(plan[k].expect)) fail(`${k} gave ${seen[k]}`);
    }
  }
  if (plan.resource) {
    const r = await client.readResource({ uri: plan.resource });
    seen.resource = r.contents.length;
    if (!r.contents.length) fail('empty resource');
  }
  if (plan.prompt) {
    const r = await client.getPrompt(plan.prompt);
    seen.prompt = r.messages.length;
    if (!r.messages.length) fail('empty prompt');
  }
  if (plan.slow) {
    const ac = new AbortController();
    setTimeout(() => ac.abort(), 300);
    const t0 = Date.now();
    try {
      await client.callTool(plan.slow, { signal: ac.signal });
      fail('the slow call was not cancelled');
    } catch (e) {
      seen.cancelled_after_ms = Date.now() - t0;
    }
  }
  await client.close();
  console.log(JSON.stringify(seen));
} catch (e) {
  fail(e?.stack || String(e));
}
