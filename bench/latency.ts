// End-to-end latency at a steady rate, with the relay's default settings and no NOTIFY on the publish
// path: a publisher commits one ~1 KiB message per transaction at each rate for `--seconds`; `bun
// main.ts run` (a child process, default flags) delivers them to a local webhook, which records each
// arrival. Latency = arrival − publish time, per message.
//
//   ./node_modules/.bin/bun bench/latency.ts [--rates 100,1000,5000] [--seconds 20] [--warmup-seconds 2]
//                                            [--runs 3] [--mode batch|single]
//
// The webhook runs in batch mode by default (one request per batch: what is measured is the relay's
// reaction, not one HTTP request per message); `--mode single` sends one request per message. The
// endpoint is a process of its own (this file with --receiver), as a real one would be: in this
// process its answers would wait behind the publisher's work, and the relay with them.
// The publisher starts as soon as the relay logs "pipeline started" and runs for warm-up + measured
// seconds; messages of the warm-up are delivered but left out of the figures.
//
// Publish time: clock_timestamp() taken inside the publishing statement, the last statement before
// COMMIT, written into the payload (t_ms). So the figure includes the COMMIT itself (one round trip
// and a WAL flush). The publisher also notes when its COMMIT returned, keyed by message id: the
// "from commit ack" columns measure from there, the delay a caller that just committed would see.
// PostgreSQL and this process read the same system clock; the measured offset is printed.
//
// Cases: each rate with p_notify := false (the relay finds messages through its shared probe), and
// at 1,000 msg/s also p_notify := true, for comparison. Each run uses a fresh database. Last, what
// waiting costs: an idle relay with 1 and with 10 pipelines for 10 s (CPU, RSS, probe calls). That
// an idle relay writes nothing is a test (tests/relay/idle.test.ts), on a server of its own.

import {
  connectTo, describeMachine, fixed, intFlag, markdownTable, medianRun, processMemory, scratchDatabase,
  spawnRelay, startCpuAccount, startReceiver, summarize, undisturbed, waitForQuiet, wallClockMs,
} from "./support.ts";

if (process.argv[2] === "--receiver") {
  // Child mode: a webhook endpoint that notes each message's arrival; prints its URL, and on SIGTERM
  // one JSON line per arrival: [id, payload, arrived (wall-clock ms)].
  const mode = process.argv[3];
  const seen: [string, unknown, number][] = [];
  const receiver = startReceiver((request, body, arrived) => {
    if (mode === "single") return void seen.push([request.headers.get("X-Tide-Message-Id") ?? "", JSON.parse(body), arrived]);
    for (const message of JSON.parse(body) as { id: string; payload: unknown }[]) seen.push([message.id, message.payload, arrived]);
  });
  console.log(receiver.url);
  process.on("SIGTERM", () => {
    receiver.stop();
    process.stdout.write(seen.map((entry) => JSON.stringify(entry)).join("\n") + "\n", () => process.exit(0));
  });
  await new Promise(() => {});
}

const RATES = listFlag("rates", [100, 1000, 5000]);
const SECONDS = intFlag("seconds", 20);
const WARMUP_SECONDS = intFlag("warmup-seconds", 2);
const RUNS = intFlag("runs", 3);
const MODE = process.argv.includes("--mode") ? process.argv[process.argv.indexOf("--mode") + 1] as "batch" | "single" : "batch";
const PUBLISHER_CONNECTIONS = 16;
const IDLE_SECONDS = 10;
// {"seq": …, "pad": "xx…", "t_ms": …}: about 1 KiB, like the other benchmarks' payloads.
const PAD = "x".repeat(980);

interface Case {
  rate: number;
  notify: boolean;
}

const CASES: Case[] = RATES.flatMap((rate) => [{ rate, notify: false }, ...(rate === 1000 ? [{ rate, notify: true }] : [])]);
const label = (c: Case) => `${c.rate} msg/s, p_notify ${c.notify}`;

interface Run {
  label: string;
  sent: number;
  received: number;
  duplicates: number;
  achievedRate: number;
  fromPublish: ReturnType<typeof summarize>;
  fromAck: ReturnType<typeof summarize>;
  rssMiB: number;
  peakRssMiB: number;
  relayCores: number;
  postgresCores: number;
  otherCores: number;
  clockOffsetMs: number;
  warmupMaxMs: number;
  /** Messages delivered including the warm-up, for messages per batch. */
  delivered: number;
  /** The relay's calls, from pg_stat_user_functions. */
  calls: Record<string, number>;
}

/** The relay's calls counted per run (consumer_commit_read calls consumer_commit and consumer_read_batch). */
const RELAY_FUNCTIONS = ["consumer_read_batch", "consumer_read_ahead", "consumer_commit", "consumer_commit_read", "consumer_probe"];

console.log(await describeMachine());
console.log(`${WARMUP_SECONDS} s of warm-up + ${SECONDS} s measured per run, ${RUNS} runs per case, webhook in ${MODE} mode, ` +
  "relay with default flags\n");
const runs: Run[] = [];
for (let round = 1; round <= RUNS; round++) {
  for (const c of CASES) {
    const run = await undisturbed(() => measure(c));
    runs.push(run);
    const f = run.fromPublish;
    const calls = RELAY_FUNCTIONS.map((name) => `${name.replace("consumer_", "")} ${run.calls[name] ?? 0}`).join(", ");
    console.log(
      `run ${round} ${run.label}: sent ${run.sent} at ${fixed(run.achievedRate, 0)}/s, received ${run.received} ` +
        `(${run.duplicates} duplicates); ms p50 ${fixed(f.p50, 1)} p90 ${fixed(f.p90, 1)} p99 ${fixed(f.p99, 1)} ` +
        `max ${fixed(f.max, 1)}; from commit ack p50 ${fixed(run.fromAck.p50, 1)} p99 ${fixed(run.fromAck.p99, 1)}; ` +
        `RSS ${fixed(run.rssMiB, 0)} MiB (peak ${fixed(run.peakRssMiB, 0)}), relay ${fixed(run.relayCores, 2)} cores, ` +
        `PostgreSQL ${fixed(run.postgresCores, 2)} cores, other processes ${fixed(run.otherCores, 2)} cores; calls: ${calls} ` +
        `(${fixed(run.delivered / Math.max(1, run.calls.consumer_commit ?? 0), 1)} msgs per batch); clock offset ` +
        `${fixed(run.clockOffsetMs, 3)} ms; warm-up max ${fixed(run.warmupMaxMs, 0)} ms`,
    );
  }
}
const rows = CASES.map((c) => {
  const own = runs.filter((r) => r.label === label(c));
  const m = medianRun(own, (r) => r.fromPublish.p99);
  const f = m.fromPublish;
  const p99s = own.map((r) => r.fromPublish.p99);
  return [c.rate, c.notify ? "true" : "false (probe)", fixed(f.p50, 1), fixed(f.p90, 1), fixed(f.p99, 1), fixed(f.max, 1),
    `${fixed(Math.min(...p99s), 1)}–${fixed(Math.max(...p99s), 1)}`, fixed(m.fromAck.p50, 1), fixed(m.fromAck.p99, 1),
    `${m.received}/${m.sent}`, fixed(m.achievedRate, 0), fixed(m.peakRssMiB, 0), fixed(m.relayCores, 2), fixed(m.postgresCores, 2),
    fixed(m.delivered / Math.max(1, m.calls.consumer_commit ?? 0), 1), fixed(m.otherCores, 2)];
});
console.log(`\n${markdownTable(["msg/s", "p_notify", "p50 ms", "p90 ms", "p99 ms", "max ms", "p99 range of runs",
  "p50 from commit ack", "p99 from commit ack", "received/sent", "publish rate/s", "relay peak RSS MiB", "relay CPU (cores)",
  "PostgreSQL CPU (cores)", "msgs per batch", "other load (cores)"], rows)}`);

const idleRows = [];
for (const pipelines of [1, 10]) {
  const idle = await undisturbed(() => idleCost(pipelines));
  idleRows.push([pipelines, fixed(idle.relayCores * 100, 1), fixed(idle.postgresCores * 100, 1), fixed(idle.rssMiB, 0),
    fixed(idle.probesPerSecond, 1), fixed(idle.otherCores, 2)]);
}
console.log(`\nIdle relay, ${IDLE_SECONDS} s:\n${markdownTable(["pipelines", "relay CPU % of a core", "PostgreSQL CPU % of a core",
  "relay RSS MiB", "probe calls per second", "other load (cores)"], idleRows)}`);

/** An idle relay (default flags) owning `pipelines` webhook pipelines whose outboxes receive nothing. */
async function idleCost(pipelines: number) {
  const db = await scratchDatabase("idle");
  const sql = connectTo(db.url, 1);
  let relay: ReturnType<typeof spawnRelay> | undefined;
  try {
    await sql.unsafe(`ALTER DATABASE ${db.name} SET track_functions = 'pl'`);
    for (let i = 0; i < pipelines; i++) {
      await sql`SELECT tide.outbox_create(${`idle_${i}`})`;
      await sql`SELECT tide.relay_set_outbox(${`idle-${i}`}, ${`idle_${i}`}, 'webhook', ${sql.json({ url: "http://127.0.0.1:9/unused" })})`;
    }
    relay = spawnRelay(db.url);
    await relay.logged("pipeline started");
    await Bun.sleep(15_000); // past the probe's back-off after start-up
    await waitForQuiet();
    const probes = async () => Number((await sql`SELECT coalesce(sum(calls), 0)::int AS n FROM pg_stat_user_functions WHERE funcname = 'consumer_probe'`)[0]!.n);
    await sql`SELECT pg_stat_clear_snapshot()`;
    const probesBefore = await probes();
    const cpu = await startCpuAccount(() => [relay!.pid], { database: db.name });
    await Bun.sleep(IDLE_SECONDS * 1000);
    const used = cpu.read();
    const rssMiB = processMemory(relay.pid).rssMiB;
    await relay.stop(); // its sessions end, which flushes their function statistics
    relay = undefined;
    await Bun.sleep(600); // the statistics collector takes up to 500 ms
    await sql`SELECT pg_stat_clear_snapshot()`;
    const probesPerSecond = ((await probes()) - probesBefore) / IDLE_SECONDS;
    return {
      relayCores: used.children / used.wallSeconds, postgresCores: used.postgres / used.wallSeconds,
      otherCores: used.others / used.wallSeconds, rssMiB, probesPerSecond,
    };
  } finally {
    await relay?.stop();
    await sql.end({ timeout: 1 });
    await db.drop();
  }
}

async function measure(c: Case): Promise<Run> {
  const db = await scratchDatabase("latency");
  const sql = connectTo(db.url, PUBLISHER_CONNECTIONS);
  const arrivals = new Map<string, number>();
  const publishedAt = new Map<string, { seq: number; t_ms: number }>();
  const ackedAt = new Map<string, number>();
  let duplicates = 0;
  const arrive = (id: string, payload: { seq: number; t_ms: number }, arrived: number) => {
    if (arrivals.has(id)) return void duplicates++;
    arrivals.set(id, arrived);
    publishedAt.set(id, payload);
  };
  const receiver = await spawnReceiver();
  let relay: ReturnType<typeof spawnRelay> | undefined;
  try {
    // Counts the relay's calls (pg_stat_user_functions).
    await sql.unsafe(`ALTER DATABASE ${db.name} SET track_functions = 'pl'`);
    await sql`SELECT tide.outbox_create('lat', p_notify := ${c.notify})`;
    await sql`SELECT tide.relay_set_outbox('lat-hook', 'lat', 'webhook', ${sql.json({ url: receiver.url, mode: MODE })})`;
    const clockOffsetMs = await clockOffset(sql);
    await waitForQuiet();
    relay = spawnRelay(db.url);
    await relay.logged("pipeline started");

    // Open loop: message i is due at start + i / rate, whether or not earlier commits have returned.
    const warmup = c.rate * WARMUP_SECONDS;
    const total = warmup + c.rate * SECONDS;
    const inFlight = new Set<Promise<void>>();
    let cpu: Awaited<ReturnType<typeof startCpuAccount>> | undefined;
    let start = performance.now();
    for (let i = 0; i < total; i++) {
      if (i === warmup) {
        cpu = await startCpuAccount(() => [relay!.pid], { database: db.name });
        start = performance.now() - (i * 1000) / c.rate; // keep the schedule
      }
      const due = start + (i * 1000) / c.rate;
      const wait = due - performance.now();
      if (wait >= 1) await Bun.sleep(wait);
      const p = publish(sql, i).then((id) => void ackedAt.set(id, wallClockMs()));
      inFlight.add(p);
      void p.finally(() => inFlight.delete(p));
    }
    await Promise.all(inFlight);
    const achievedRate = (total - warmup) / ((performance.now() - start) / 1000 - WARMUP_SECONDS);
    const deadline = performance.now() + 30_000;
    const delivered = async () => Number((await sql`SELECT delivered_total::int AS n FROM tide.consumer_groups`)[0]?.n ?? 0);
    while ((await delivered()) < total && performance.now() < deadline) await Bun.sleep(20);
    const used = cpu!.read();
    for (const [id, payload, arrived] of await receiver.arrivals()) arrive(id, payload, arrived);
    const memory = processMemory(relay.pid);
    await relay.stop(); // its sessions end, which flushes their function statistics
    await Bun.sleep(600); // the statistics collector takes up to 500 ms
    const calls = Object.fromEntries(
      (await sql`SELECT funcname, calls::int FROM pg_stat_user_functions WHERE funcname = ANY(${RELAY_FUNCTIONS})`)
        .map((r) => [r.funcname as string, r.calls as number]),
    );

    const fromPublish: number[] = [];
    const fromAck: number[] = [];
    let warmupMaxMs = 0;
    for (const [id, arrived] of arrivals) {
      const { seq, t_ms } = publishedAt.get(id)!;
      const latency = arrived - clockOffsetMs - t_ms;
      if (seq < warmup) {
        warmupMaxMs = Math.max(warmupMaxMs, latency);
        continue;
      }
      fromPublish.push(latency);
      const acked = ackedAt.get(id);
      if (acked !== undefined) fromAck.push(arrived - acked);
    }
    if (relay.problems.length > 0) console.log(`  relay warnings:\n  ${relay.problems.slice(0, 5).join("\n  ")}`);
    return {
      label: label(c), sent: total - warmup, received: fromPublish.length, duplicates, achievedRate, warmupMaxMs, delivered: arrivals.size,
      fromPublish: summarize(fromPublish), fromAck: summarize(fromAck),
      rssMiB: memory.rssMiB, peakRssMiB: memory.peakMiB, relayCores: used.children / used.wallSeconds,
      postgresCores: used.postgres / used.wallSeconds, otherCores: used.others / used.wallSeconds, clockOffsetMs, calls,
    };
  } finally {
    await relay?.stop();
    receiver.stop();
    await sql.end({ timeout: 1 });
    await db.drop();
  }
}

/** The webhook endpoint as a child process (this file with --receiver). */
async function spawnReceiver() {
  const child = Bun.spawn([process.execPath, import.meta.path, "--receiver", MODE], { stdout: "pipe", stderr: "inherit" });
  const reader = child.stdout.getReader();
  const decoder = new TextDecoder();
  let text = "";
  while (!text.includes("\n")) {
    const { value, done } = await reader.read();
    if (done) throw new Error("the receiver exited before printing its URL");
    text += decoder.decode(value, { stream: true });
  }
  const url = text.slice(0, text.indexOf("\n"));
  let rest = text.slice(text.indexOf("\n") + 1);
  return {
    url,
    /** Stops the receiver and returns what arrived: [id, payload, arrived]. */
    async arrivals(): Promise<[string, { seq: number; t_ms: number }, number][]> {
      child.kill("SIGTERM");
      for (let read = await reader.read(); !read.done; read = await reader.read()) rest += decoder.decode(read.value, { stream: true });
      return rest.split("\n").filter(Boolean).map((line) => JSON.parse(line));
    },
    stop: () => child.kill(),
  };
}

/** One transaction, one message; the payload carries clock_timestamp() of the publishing statement. */
async function publish(sql: ReturnType<typeof connectTo>, seq: number): Promise<string> {
  return await sql.begin(async (tx) => {
    const [{ id }] = await tx`
      SELECT tide.outbox_publish('lat',
        jsonb_build_object('seq', ${seq}::int, 't_ms', extract(epoch FROM clock_timestamp())::float8 * 1000, 'pad', ${PAD}::text),
        '{"event_type": "x"}')::text AS id`;
    return id as string;
  });
}

/** This process's wall clock minus PostgreSQL's, from the fastest of 20 round trips. */
async function clockOffset(sql: ReturnType<typeof connectTo>): Promise<number> {
  let best = { rtt: Infinity, offset: 0 };
  for (let i = 0; i < 20; i++) {
    const before = wallClockMs();
    const [{ t }] = await sql`SELECT extract(epoch FROM clock_timestamp())::float8 * 1000 AS t`;
    const after = wallClockMs();
    if (after - before < best.rtt) best = { rtt: after - before, offset: (before + after) / 2 - t };
  }
  return best.offset;
}

/** Comma-separated positive integers `--name 1,2,3` from argv, else the fallback. */
function listFlag(name: string, fallback: number[]): number[] {
  const at = process.argv.indexOf(`--${name}`);
  if (at < 0) return fallback;
  const values = (process.argv[at + 1] ?? "").split(",").map(Number);
  if (values.length === 0 || values.some((v) => !Number.isInteger(v) || v <= 0)) throw new Error(`--${name} must be a list of positive integers, like 100,1000`);
  return values;
}
