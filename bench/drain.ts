// Backlog drain: how fast a relay empties an outbox that already holds 100,000 messages of ~1 KiB.
// For each sink below, a fresh database gets the backlog (one INSERT ... SELECT, then VACUUM ANALYZE
// and CHECKPOINT, as a backlog that has been sitting would be), then `bun main.ts run` starts as a
// child process with its default flags. The clock runs from the relay's "pipeline started" log line
// until the consumer group has acknowledged every message (delivered_total, polled every 25 ms);
// tide.consumer_lag is then checked to show lag 0. Peak RSS is the child's VmHWM from /proc.
//
//   ./node_modules/.bin/bun bench/drain.ts [--messages 100000] [--runs 3] [--only file|webhook]
//
// The webhook endpoint is a Bun.serve in this process on 127.0.0.1 that reads the body and answers
// 204. Relay, PostgreSQL and the endpoint share the machine's cores.

import { mkdtempSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  connectTo, describeMachine, fixed, intFlag, markdownTable, medianRun, payloadOfSize, processMemory, type Receiver,
  scratchDatabase, spawnRelay, startCpuAccount, startReceiver, undisturbed, waitForQuiet, onlyFlag,
} from "./support.ts";

const MESSAGES = intFlag("messages", 100_000);
const RUNS = intFlag("runs", 3);
const TIME_LIMIT_MS = 600_000;
const ONLY = onlyFlag(["file", "webhook"]);

interface Case {
  name: string;
  sink: "file" | "webhook";
  batchSize: number;
  config: (target: string) => Record<string, unknown>;
}

const ALL_CASES: Case[] = [
  { name: "file, fsync true", sink: "file", batchSize: 100, config: (path) => ({ path, fsync: true }) },
  { name: "file, fsync false", sink: "file", batchSize: 100, config: (path) => ({ path, fsync: false }) },
  { name: "webhook single", sink: "webhook", batchSize: 100, config: (url) => ({ url, mode: "single" }) },
  ...[100, 500, 1000].map((batchSize): Case => ({
    name: "webhook batch", sink: "webhook", batchSize, config: (url) => ({ url, mode: "batch" }),
  })),
];
const CASES = ALL_CASES.filter((c) => !ONLY || c.sink === ONLY);

interface Run {
  name: string;
  batchSize: number;
  seconds: number;
  startupSeconds: number;
  msgsPerSecond: number;
  mbPerSecond: number;
  peakRssMiB: number;
  lagQueryMs: number;
  lagAfter: number;
  requests: number;
  relayCpu: number;
  postgresCpu: number;
  otherCores: number;
}

console.log(await describeMachine());
console.log(`${MESSAGES} messages of ~1 KiB per run, ${RUNS} runs per case\n`);
const runs: Run[] = [];
for (let round = 1; round <= RUNS; round++) {
  for (const c of CASES) {
    const run = await undisturbed(() => drain(c));
    runs.push(run);
    console.log(
      `run ${round} ${c.name} (batch ${c.batchSize}): ${fixed(run.seconds, 2)} s, ${fixed(run.msgsPerSecond, 0)} msg/s, ` +
        `${fixed(run.mbPerSecond, 1)} MB/s, peak RSS ${fixed(run.peakRssMiB, 0)} MiB, lag after ${run.lagAfter}, ` +
        `start-up ${fixed(run.startupSeconds, 2)} s, consumer_lag query with full backlog ${fixed(run.lagQueryMs, 0)} ms, ` +
        `CPU s: relay ${fixed(run.relayCpu, 2)}, postgres ${fixed(run.postgresCpu, 2)}, other processes ${fixed(run.otherCores, 2)} cores`,
    );
  }
}
const rows = CASES.map((c) => {
  const own = runs.filter((r) => r.name === c.name && r.batchSize === c.batchSize);
  const m = medianRun(own, (r) => r.msgsPerSecond);
  const range = `${fixed(Math.min(...own.map((r) => r.msgsPerSecond)), 0)}–${fixed(Math.max(...own.map((r) => r.msgsPerSecond)), 0)}`;
  return [c.name, c.batchSize, fixed(m.seconds, 2), fixed(m.msgsPerSecond, 0), range, fixed(m.mbPerSecond, 1),
    fixed(m.peakRssMiB, 0), fixed(m.relayCpu, 2), fixed(m.postgresCpu, 2), m.requests || "—", fixed(m.otherCores, 2)];
});
console.log(`\n${markdownTable(["sink", "batch_size", "drain s", "msg/s", "msg/s range of runs", "MB/s", "relay peak RSS MiB",
  "relay CPU s", "PostgreSQL CPU s", "HTTP requests", "other load (cores)"], rows)}`);
const lagMs = runs.map((r) => r.lagQueryMs).sort((a, b) => a - b);
console.log(`\nSELECT * FROM tide.consumer_lag with ${MESSAGES} undelivered: median ${fixed(lagMs[Math.floor(lagMs.length / 2)]!, 0)} ms`);

async function drain(c: Case): Promise<Run> {
  const db = await scratchDatabase("drain");
  const sql = connectTo(db.url, 2);
  const dir = mkdtempSync(join(tmpdir(), "tide-drain-"));
  let requests = 0;
  let receiver: Receiver | undefined;
  let relay: ReturnType<typeof spawnRelay> | undefined;
  try {
    let target = join(dir, "out.jsonl");
    if (c.sink === "webhook") {
      receiver = startReceiver(() => void requests++);
      target = receiver.url;
    }
    await sql`SELECT tide.outbox_create('bench')`;
    await sql`SELECT tide.relay_set_outbox('drain', 'bench', ${c.sink}, ${sql.json(c.config(target) as never)},
                                           p_batch_size := ${c.batchSize})`;
    // Each payload is the same ~1 KiB object with its own order_id.
    await sql`
      INSERT INTO tide.outbox_messages (outbox, payload, headers)
      SELECT 'bench', ${sql.json(payloadOfSize(1024) as never)}::jsonb || jsonb_build_object('order_id', g),
             '{"event_type": "x"}'
        FROM generate_series(1, ${MESSAGES}) g`;
    await sql`VACUUM ANALYZE tide.outbox_messages`;
    await sql`CHECKPOINT`;
    const [{ bytes }] = await sql`SELECT sum(octet_length(payload::text))::float8 AS bytes FROM tide.outbox_messages`;
    const lagStart = performance.now();
    await sql`SELECT * FROM tide.consumer_lag`;
    const lagQueryMs = performance.now() - lagStart;

    await waitForQuiet();
    const cpu = await startCpuAccount(() => (relay ? [relay.pid] : []), { database: db.name });
    const spawnedAt = performance.now();
    relay = spawnRelay(db.url);
    const startedAt = await relay.logged("pipeline started");
    let doneAt = 0;
    for (;;) {
      const [{ delivered }] = await sql`SELECT coalesce(sum(delivered_total), 0)::int AS delivered FROM tide.consumer_groups`;
      if (delivered >= MESSAGES) {
        doneAt = performance.now();
        break;
      }
      if (performance.now() - startedAt > TIME_LIMIT_MS) throw new Error(`${c.name}: not drained within ${TIME_LIMIT_MS} ms`);
      await Bun.sleep(25);
    }
    const peakRssMiB = processMemory(relay.pid).peakMiB;
    const used = cpu.read();
    const [{ lag }] = await sql`SELECT coalesce(sum(lag), 0)::int AS lag FROM tide.consumer_lag`;
    if (c.sink === "file") {
      const written = statSync(target).size;
      if (written < bytes) console.log(`  warning: the file holds ${written} bytes, less than the payloads`);
    }
    if (relay.problems.length > 0) console.log(`  relay warnings:\n  ${relay.problems.slice(0, 5).join("\n  ")}`);
    const seconds = (doneAt - startedAt) / 1000;
    return {
      name: c.name, batchSize: c.batchSize, seconds, startupSeconds: (startedAt - spawnedAt) / 1000,
      msgsPerSecond: MESSAGES / seconds, mbPerSecond: bytes / 1e6 / seconds, peakRssMiB, lagQueryMs, lagAfter: lag, requests,
      relayCpu: used.children, postgresCpu: used.postgres, otherCores: used.others / used.wallSeconds,
    };
  } finally {
    await relay?.stop();
    receiver?.stop();
    await sql.end({ timeout: 1 });
    await db.drop();
    rmSync(dir, { recursive: true, force: true });
  }
}
