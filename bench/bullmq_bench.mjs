// BullMQ delayed jobs, for bench/alternatives.py and bench/memory.py (not run by hand).
//
//   node bench/bullmq_bench.mjs worker  --port P [--concurrency C]
//   node bench/bullmq_bench.mjs produce --port P --rate R --duration S --timeout S --pending N [--tick MS]
//   node bench/bullmq_bench.mjs fill    --port P --count N [--id-length L]
//
// bullmq and ioredis are loaded from bench/.node/node_modules (alternatives.py
// installs them there with npm). Every mode talks on stdout, one JSON object a line:
//
// worker:  {"ready": true} once connected; then per job {"id", "t", "lag_ms"}: t is the
//          Unix time in ms (fractional) when the processor ran, lag_ms is t minus the
//          job's deadline (its timestamp + delay). Ends when its stdin closes.
// produce: adds N pending delayed jobs (due in 1 h), prints {"loaded", "seconds"}, waits
//          for a line on stdin (the caller measures the idle cost meanwhile), then adds R
//          jobs a second for S seconds (a batch every MS ms, default 2) due `timeout` s after their
//          creation, printing {"deadlines": {id: deadline ms}} per batch, then {"done": true}.
// fill:    adds N delayed jobs (due in 1 h) with ids of L characters (default 20) and
//          empty data, prints {"added", "seconds"}.

import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const require = createRequire(join(here, ".node", "package.json"));
const { Queue, Worker } = require("bullmq");

const QUEUE = "bench";
const HOUR_MS = 3600 * 1000;
const CHUNK = 1000;

function options(argv) {
  const out = {};
  for (let i = 0; i < argv.length; i += 2) {
    out[argv[i].replace(/^--/, "")] = argv[i + 1];
  }
  return out;
}

function nowMs() {
  return performance.timeOrigin + performance.now();
}

function say(object) {
  process.stdout.write(JSON.stringify(object) + "\n");
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function connection(opts) {
  return { host: "127.0.0.1", port: Number(opts.port), maxRetriesPerRequest: null };
}

async function worker(opts) {
  let lines = [];
  const flush = () => {
    if (lines.length) {
      process.stdout.write(lines.join(""));
      lines = [];
    }
  };
  const timer = setInterval(flush, 50);
  const w = new Worker(
    QUEUE,
    async (job) => {
      const t = nowMs();
      const deadline = job.timestamp + (job.opts.delay || 0);
      lines.push(JSON.stringify({ id: job.id, t, lag_ms: t - deadline }) + "\n");
    },
    {
      connection: connection(opts),
      concurrency: Number(opts.concurrency || 50),
      removeOnComplete: true,
      removeOnFail: true,
    },
  );
  await w.waitUntilReady();
  say({ ready: true });
  process.stdin.resume();
  await new Promise((resolve) => process.stdin.on("end", resolve));
  await w.close();
  clearInterval(timer);
  flush();
}

async function addDelayed(queue, jobs) {
  for (let i = 0; i < jobs.length; i += CHUNK) {
    await queue.addBulk(jobs.slice(i, i + CHUNK));
  }
}

async function produce(opts) {
  const queue = new Queue(QUEUE, { connection: connection(opts) });
  await queue.waitUntilReady();
  const pending = Number(opts.pending || 0);
  const began = nowMs();
  const stamp = Date.now();
  const far = [];
  for (let i = 0; i < pending; i++) {
    far.push({ name: "j", data: {}, opts: { jobId: `p-${i}`, delay: HOUR_MS, timestamp: stamp } });
  }
  await addDelayed(queue, far);
  say({ loaded: pending, seconds: (nowMs() - began) / 1000 });
  const input = createInterface({ input: process.stdin });
  await new Promise((resolve) => input.once("line", resolve));

  const rate = Number(opts.rate);
  const tickMs = Number(opts.tick ?? 2);
  const total = Math.round(rate * Number(opts.duration));
  const timeoutMs = Math.round(Number(opts.timeout) * 1000);
  const deadlines = {};
  const start = nowMs();
  let done = 0;
  let tick = 0;
  while (done < total) {
    const want = Math.min(total, Math.floor((rate * (nowMs() - start)) / 1000) + 1);
    if (want > done) {
      const at = Date.now();
      const batch = [];
      for (let i = done; i < want; i++) {
        const id = `m-${i}`;
        deadlines[id] = at + timeoutMs;
        batch.push({ name: "j", data: {}, opts: { jobId: id, delay: timeoutMs, timestamp: at } });
      }
      await queue.addBulk(batch);
      say({ deadlines: Object.fromEntries(batch.map((job) => [job.opts.jobId, deadlines[job.opts.jobId]])) });
      done = want;
    }
    tick += 1;
    const pause = start + tick * tickMs - nowMs();
    if (pause > 0) {
      await sleep(pause);
    } else {
      tick = Math.ceil((nowMs() - start) / tickMs);
    }
  }
  say({ done: true });
  await queue.close();
  input.close();
}

async function fill(opts) {
  const queue = new Queue(QUEUE, { connection: connection(opts) });
  await queue.waitUntilReady();
  const count = Number(opts.count);
  const length = Number(opts["id-length"] || 20);
  const stamp = Date.now();
  const jobs = [];
  for (let i = 0; i < count; i++) {
    const id = `b${String(i).padStart(length - 1, "0")}`;
    jobs.push({ name: "j", data: {}, opts: { jobId: id, delay: HOUR_MS, timestamp: stamp } });
  }
  const began = nowMs();
  await addDelayed(queue, jobs);
  say({ added: count, seconds: (nowMs() - began) / 1000 });
  await queue.close();
}

const [mode, ...rest] = process.argv.slice(2);
const modes = { worker, produce, fill };
if (!modes[mode]) {
  process.stderr.write(`usage: node bullmq_bench.mjs worker|produce|fill --port P ...\n`);
  process.exit(2);
}
// exit only once stdout is flushed (a pipe may take the last lines asynchronously)
const exit = (code) => process.stdout.write("", () => process.exit(code));
modes[mode](options(rest)).then(
  () => exit(0),
  (error) => {
    process.stderr.write(`bullmq_bench ${mode}: ${error && error.stack ? error.stack : error}\n`);
    exit(1);
  },
);
