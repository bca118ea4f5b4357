// A producer in Node.js that uses nothing of the Python package: it creates,
// pays and cancels orders through the Redis key layout and the Lua scripts
// the README documents, subscribes to the status events of its own orders and
// checks every event against the shipped JSON Schema with Ajv in strict mode.
// Prints one JSON summary on stdout; exits 1 when anything is off.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import Ajv from "ajv/dist/2020.js";
import addFormats from "ajv-formats";
import Redis from "ioredis";
import mqtt from "mqtt";

const { values: opt } = parseArgs({
  options: {
    redis: { type: "string", default: "redis://127.0.0.1:6379/0" },
    mqtt: { type: "string", default: "mqtt://127.0.0.1:1883" },
    // create.lua, pay.lua, cancel.lua: `order-listener scripts NAME > DIR/NAME.lua`
    scripts: { type: "string", default: "scripts" },
    schema: {
      type: "string",
      default: new URL("../../listener/schemas/status-event.schema.json", import.meta.url).pathname,
    },
    orders: { type: "string", default: "9" }, // a third paid, a third cancelled, a third left to time out
    timeout: { type: "string", default: "1000" }, // payment window of each order, ms
    retention: { type: "string", default: String(7 * 24 * 3600 * 1000) }, // the daemon's, in ms
    prefix: { type: "string", default: "order" }, // ORDER_LISTENER_KEY_PREFIX
    "topic-prefix": { type: "string", default: "orders" }, // ORDER_LISTENER_TOPIC_PREFIX
    wait: { type: "string", default: "20000" }, // how long to wait for the events after the deadline, ms
  },
});

// --- The key layout: part P = crc32(id) % 16, zlib's CRC-32 of the id's UTF-8 bytes.
// (Written out: zlib.crc32 is only in Node >= 20.15.)
const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});
function crc32(text) {
  let crc = 0xffffffff;
  for (const byte of Buffer.from(text, "utf8")) crc = CRC_TABLE[(crc ^ byte) & 0xff] ^ (crc >>> 8);
  return (crc ^ 0xffffffff) >>> 0;
}
const partOf = (id) => crc32(id) % 16;
const base = (part) => `${opt.prefix}:{${part}}:`;
const orderKey = (id) => `${base(partOf(id))}o:${id}`;
const timerKey = (id) => `${base(partOf(id))}t:${id}`;

// --- The scripts: loaded once with SCRIPT LOAD, called by SHA (loaded again
// if Redis answers NOSCRIPT, e.g. after a restart flushed its script cache).
const redis = new Redis(opt.redis, { maxRetriesPerRequest: 3 });
const scripts = {};
for (const name of ["create", "pay", "cancel"]) {
  const text = readFileSync(join(opt.scripts, `${name}.lua`), "utf8");
  scripts[name] = { text, sha: await redis.script("LOAD", text) };
}

async function call(name, keys, args) {
  const script = scripts[name];
  try {
    return await redis.evalsha(script.sha, keys.length, ...keys, ...args);
  } catch (error) {
    if (!String(error.message).startsWith("NOSCRIPT")) throw error;
    script.sha = await redis.script("LOAD", script.text);
    return await redis.evalsha(script.sha, keys.length, ...keys, ...args);
  }
}

// create: one call per part (all orders of a call must share a part).
// Reply, flat: per order 1, deadline (created) or 0, status (the id exists).
async function create(ids, timeoutMs) {
  const byPart = new Map();
  for (const id of ids) byPart.set(partOf(id), [...(byPart.get(partOf(id)) ?? []), id]);
  const created = [];
  for (const [part, group] of byPart) {
    const keys = [`${base(part)}deadlines`, `${base(part)}outbox:created`];
    const args = [`${opt.prefix}:wake`, part];
    for (const id of group) {
      keys.push(orderKey(id), timerKey(id));
      args.push(id, timeoutMs);
    }
    const reply = await call("create", keys, args);
    group.forEach((id, i) => {
      if (reply[2 * i] !== 1) throw new Error(`create ${id}: the id exists (status ${reply[2 * i + 1]})`);
      created.push(id);
    });
  }
  return created;
}

// pay, cancel: KEYS order hash, timer, deadlines and outbox of P; ARGV id, retention ms.
// Reply {outcome, status, version, reason}; outcome done|already|refused|unknown|notdue.
async function transition(name, id) {
  const p = partOf(id);
  const keys = [orderKey(id), timerKey(id), `${base(p)}deadlines`, `${base(p)}outbox`];
  const [outcome, status, version, reason] = await call(name, keys, [id, opt.retention]);
  if (outcome !== "done") throw new Error(`${name} ${id}: ${outcome} (${status} v${version} ${reason})`);
}

// --- The subscriber: every event of our orders, validated as it arrives.
const ajv = new Ajv({ strict: true, allErrors: true });
addFormats(ajv);
const valid = ajv.compile(JSON.parse(readFileSync(opt.schema, "utf8")));

const run = `node-${process.pid}-${Date.now().toString(36)}`;
const count = Number(opt.orders);
const plans = ["pay", "cancel", "timeout"];
const plan = new Map(Array.from({ length: count }, (_, i) => [`${run}-${i}`, plans[i % 3]]));
const seen = new Map([...plan.keys()].map((id) => [id, []])); // events per order, as received
const failures = [];
let received = 0;
let invalid = 0;
let allArrived;
const arrived = new Promise((resolve) => (allArrived = resolve));

const broker = await mqtt.connectAsync(opt.mqtt, { clean: true, clientId: run });
broker.on("message", (topic, payload) => {
  const id = topic.slice(opt["topic-prefix"].length + 1, -"/status".length);
  if (!seen.has(id)) return; // someone else's order
  received += 1;
  let event = null;
  try {
    event = JSON.parse(payload.toString("utf8"));
  } catch {} // (null: the schema refuses it below)
  if (!valid(event)) {
    invalid += 1;
    failures.push(`${topic}: invalid event ${JSON.stringify(event)}: ${ajv.errorsText(valid.errors)}`);
  }
  if (event?.order_id !== id) failures.push(`${topic}: an event of order ${event?.order_id}`);
  if (Number.isInteger(event?.version)) seen.get(id).push(event);
  if ([...seen.values()].every((events) => events.some((e) => e.version >= 2))) allArrived();
});
await broker.subscribeAsync(`${opt["topic-prefix"]}/+/status`, { qos: 1 });

// --- The orders: create all, pay a third, cancel a third, leave a third to the daemon.
const created = await create([...plan.keys()], Number(opt.timeout));
for (const [id, what] of plan) if (what !== "timeout") await transition(what, id);

const waited = Number(opt.timeout) + Number(opt.wait);
const timer = setTimeout(allArrived, waited);
await arrived;
clearTimeout(timer);

// --- What arrived, against what was done.
const expected = { pay: ["paid", "paid"], cancel: ["cancelled", "customer"], timeout: ["cancelled", "timeout"] };
const outcome = { paid: 0, cancelled_by_customer: 0, cancelled_by_timeout: 0 };
const perOrder = {};
let versionsInOrder = true;
for (const [id, events] of seen) {
  const first = [...new Map(events.map((e) => [e.event_id, e])).values()]; // dedup a redelivery
  const versions = first.map((e) => e.version);
  if (!versions.every((v, i) => v === i + 1)) versionsInOrder = false;
  const last = first.at(-1);
  const [status, reason] = expected[plan.get(id)];
  if (!last || last.status !== status || last.reason !== reason || first[0].status !== "created") {
    failures.push(`${id} (${plan.get(id)}): events ${JSON.stringify(first.map((e) => [e.status, e.reason]))}`);
  } else {
    outcome[status === "paid" ? "paid" : `cancelled_by_${reason}`] += 1;
  }
  perOrder[id] = { plan: plan.get(id), statuses: first.map((e) => e.status), versions: events.map((e) => e.version) };
}
if (!versionsInOrder) failures.push("versions out of order");

// --- Error handling: an id the product cannot announce (a '+' is an MQTT
// wildcard) must be refused by the script itself with an error reply.
const badId = "bad+id";
const invalidId = { id: badId, refused: false, error: null };
try {
  const reply = await create([badId], 60000);
  failures.push(`create accepted the invalid id ${badId} (${JSON.stringify(reply)})`);
} catch (error) {
  Object.assign(invalidId, { refused: error instanceof Redis.ReplyError, error: error.message });
  if (!invalidId.refused) throw error;
}

const summary = {
  ok: failures.length === 0,
  orders: { created: created.length, ...outcome },
  events: { received, invalid, all_valid: invalid === 0 },
  versions_in_order: versionsInOrder,
  invalid_id: invalidId,
  per_order: perOrder,
  failures,
};
// (indented, with short lists like [1, 2] kept on one line)
const item = String.raw`(?:"[^"\s]*"|\d+)`;
const list = new RegExp(String.raw`\[\n\s+(${item}(?:,\n\s+${item})*)\n\s+\]`, "g");
console.log(JSON.stringify(summary, null, 2).replace(list, (_, inner) => `[${inner.split(/,\n\s+/).join(", ")}]`));
await broker.endAsync();
await redis.quit();
process.exitCode = summary.ok ? 0 : 1;
