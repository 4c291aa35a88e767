// End-to-end latency at a steady rate: a publisher commits one ~1 KiB message per transaction at
// 1,000 msg/s for 30 s; `bun main.ts run` (a child process) delivers them to a local webhook in
// single mode, which records each arrival. Latency = arrival − publish time, per message.
//
//   ./node_modules/.bin/bun bench/latency.ts [--rate 1000] [--seconds 30] [--warmup-seconds 2] [--runs 3]
//
// The publisher starts as soon as the relay logs "pipeline started" and runs for warm-up + measured
// seconds; messages of the warm-up are delivered but left out of the figures (its worst latency is
// printed per run): a relay that just started has polled once, found nothing and sleeps.
//
// Publish time: clock_timestamp() taken inside the publishing statement, the last statement before
// COMMIT, written into the payload (t_ms). So the figure includes the COMMIT itself (one round trip
// and a WAL flush). The publisher also notes when its COMMIT returned, keyed by message id: the
// "from commit ack" columns measure from there, the delay a caller that just committed would see.
// PostgreSQL and this process read the same system clock; the measured offset is printed.
//
// Cases: outbox p_notify := false with the relay's default --poll-interval-ms (250) and with 50;
// p_notify := true (NOTIFY wake-up) with the default and with 50. Each run uses a fresh database.
// Last, the cost of waiting: CPU of an idle relay (one pipeline, no traffic) for 10 s at each poll interval.

import {
  connectTo, describeMachine, fixed, intFlag, markdownTable, medianRun, processMemory, scratchDatabase,
  spawnRelay, startCpuAccount, startReceiver, summarize, undisturbed, waitForQuiet, wallClockMs,
} from "./support.ts";

const RATE = intFlag("rate", 1000);
const SECONDS = intFlag("seconds", 30);
const WARMUP_SECONDS = intFlag("warmup-seconds", 2);
const RUNS = intFlag("runs", 3);
const PUBLISHER_CONNECTIONS = 8;
// {"seq": …, "pad": "xx…", "t_ms": …}: about 1 KiB, like the other benchmarks' payloads.
const PAD = "x".repeat(980);

interface Case {
  notify: boolean;
  pollMs?: number;
}

const CASES: Case[] = [{ notify: false }, { notify: false, pollMs: 50 }, { notify: true }, { notify: true, pollMs: 50 }];
const label = (c: Case) => `p_notify ${c.notify}, poll ${c.pollMs ?? "250 (default)"} ms`;

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
  /** Relay round trips: consumer_next_batch calls, and consumer_commit calls (one per delivered batch). */
  reads: number;
  commits: number;
  /** Mean server time per call (pg_stat_user_functions.total_time / calls), ms. */
  readMs: number;
  commitMs: number;
}

console.log(await describeMachine());
console.log(`${RATE} msg/s for ${WARMUP_SECONDS} s of warm-up + ${SECONDS} s measured per run, ${RUNS} runs per case, webhook in single mode\n`);
const runs: Run[] = [];
for (let round = 1; round <= RUNS; round++) {
  for (const c of CASES) {
    const run = await undisturbed(() => measure(c));
    runs.push(run);
    const f = run.fromPublish;
    console.log(
      `run ${round} ${run.label}: sent ${run.sent} at ${fixed(run.achievedRate, 0)}/s, received ${run.received} ` +
        `(${run.duplicates} duplicates); ms p50 ${fixed(f.p50, 1)} p90 ${fixed(f.p90, 1)} p99 ${fixed(f.p99, 1)} ` +
        `max ${fixed(f.max, 1)}; RSS ${fixed(run.rssMiB, 0)} MiB (peak ${fixed(run.peakRssMiB, 0)}), relay ` +
        `${fixed(run.relayCores, 2)} cores, PostgreSQL ${fixed(run.postgresCores, 2)} cores, other processes ` +
        `${fixed(run.otherCores, 2)} cores; ${run.reads} batch reads, ${run.commits} batch commits ` +
        `(${fixed(run.delivered / Math.max(1, run.commits), 1)} msgs per batch; server time per call ${fixed(run.readMs, 2)} / ` +
        `${fixed(run.commitMs, 2)} ms); clock offset ${fixed(run.clockOffsetMs, 3)} ms; warm-up max ${fixed(run.warmupMaxMs, 0)} ms`,
    );
  }
}
const rows = CASES.map((c) => {
  const m = medianRun(runs.filter((r) => r.label === label(c)), (r) => r.fromPublish.p50);
  const f = m.fromPublish;
  return [label(c), fixed(f.p50, 1), fixed(f.p90, 1), fixed(f.p99, 1), fixed(f.max, 1), fixed(m.fromAck.p50, 1),
    fixed(m.fromAck.p99, 1), `${m.received}/${m.sent}`, fixed(m.achievedRate, 0), fixed(m.peakRssMiB, 0),
    fixed(m.relayCores, 2), fixed(m.postgresCores, 2), fixed(m.delivered / Math.max(1, m.commits), 1), fixed(m.otherCores, 2)];
});
console.log(`\n${markdownTable(["case", "p50 ms", "p90 ms", "p99 ms", "max ms", "p50 from commit ack", "p99 from commit ack",
  "received/sent", "publish rate/s", "relay peak RSS MiB", "relay CPU (cores)", "PostgreSQL CPU (cores)", "msgs per batch",
  "other load (cores)"], rows)}`);

const idleRows = [];
for (const pollMs of [250, 50]) {
  const idle = await undisturbed(() => idleCost(pollMs));
  idleRows.push([pollMs, fixed(idle.relayCores * 100, 1), fixed(idle.postgresCores * 100, 1), fixed(idle.rssMiB, 0),
    fixed(idle.otherCores, 2)]);
}
console.log(`\nIdle relay, one pipeline, 10 s:\n${markdownTable(["poll ms", "relay CPU % of a core",
  "PostgreSQL CPU % of a core", "relay RSS MiB", "other load (cores)"], idleRows)}`);

async function idleCost(pollMs: number) {
  const db = await scratchDatabase("idle");
  const sql = connectTo(db.url, 1);
  let relay: ReturnType<typeof spawnRelay> | undefined;
  try {
    await sql`SELECT tide.outbox_create('lat')`;
    await sql`SELECT tide.relay_set_outbox('lat-hook', 'lat', 'webhook', ${sql.json({ url: "http://127.0.0.1:9/unused" })})`;
    relay = spawnRelay(db.url, ["--poll-interval-ms", String(pollMs)]);
    await relay.logged("pipeline started");
    await Bun.sleep(2000);
    await waitForQuiet();
    const cpu = await startCpuAccount(() => [relay!.pid], { database: db.name });
    await Bun.sleep(10_000);
    const used = cpu!.read();
    return {
      relayCores: used.children / used.wallSeconds, postgresCores: used.postgres / used.wallSeconds,
      otherCores: used.others / used.wallSeconds, rssMiB: processMemory(relay.pid).rssMiB,
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
  const receiver = startReceiver((request, body, arrived) => {
    const id = request.headers.get("X-Tide-Message-Id") ?? "";
    if (arrivals.has(id)) return void duplicates++;
    arrivals.set(id, arrived);
    publishedAt.set(id, JSON.parse(body));
  });
  let relay: ReturnType<typeof spawnRelay> | undefined;
  try {
    // Counts the relay's calls of consumer_next_batch / consumer_commit (pg_stat_user_functions).
    await sql.unsafe(`ALTER DATABASE ${db.name} SET track_functions = 'pl'`);
    await sql`SELECT tide.outbox_create('lat', p_notify := ${c.notify})`;
    await sql`SELECT tide.relay_set_outbox('lat-hook', 'lat', 'webhook', ${sql.json({ url: receiver.url, mode: "single" })})`;
    const clockOffsetMs = await clockOffset(sql);
    await waitForQuiet();
    relay = spawnRelay(db.url, c.pollMs ? ["--poll-interval-ms", String(c.pollMs)] : []);
    await relay.logged("pipeline started");

    // Open loop: message i is due at start + i / RATE, whether or not earlier commits have returned.
    const warmup = RATE * WARMUP_SECONDS;
    const total = warmup + RATE * SECONDS;
    const inFlight = new Set<Promise<void>>();
    let cpu: Awaited<ReturnType<typeof startCpuAccount>> | undefined;
    let start = performance.now();
    for (let i = 0; i < total; i++) {
      if (i === warmup) {
        cpu = await startCpuAccount(() => [relay!.pid], { database: db.name });
        start = performance.now() - (i * 1000) / RATE; // keep the schedule
      }
      const due = start + (i * 1000) / RATE;
      const wait = due - performance.now();
      if (wait >= 1) await Bun.sleep(wait);
      const p = publish(sql, i).then((id) => void ackedAt.set(id, wallClockMs()));
      inFlight.add(p);
      void p.finally(() => inFlight.delete(p));
    }
    await Promise.all(inFlight);
    const achievedRate = (total - warmup) / ((performance.now() - start) / 1000 - WARMUP_SECONDS);
    const deadline = performance.now() + 30_000;
    while (arrivals.size < total && performance.now() < deadline) await Bun.sleep(20);
    const used = cpu!.read();
    const memory = processMemory(relay.pid);
    await relay.stop(); // its sessions end, which flushes their function statistics
    const calls = Object.fromEntries(
      (await sql`SELECT funcname, calls::int, total_time::float8 AS ms FROM pg_stat_user_functions
                  WHERE funcname IN ('consumer_next_batch', 'consumer_commit')`).map((r) => [r.funcname, r]),
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
      postgresCores: used.postgres / used.wallSeconds, otherCores: used.others / used.wallSeconds, clockOffsetMs,
      reads: calls.consumer_next_batch?.calls ?? 0, commits: calls.consumer_commit?.calls ?? 0,
      readMs: calls.consumer_next_batch ? calls.consumer_next_batch.ms / calls.consumer_next_batch.calls : NaN,
      commitMs: calls.consumer_commit ? calls.consumer_commit.ms / calls.consumer_commit.calls : NaN,
    };
  } finally {
    await relay?.stop();
    receiver.stop();
    await sql.end({ timeout: 1 });
    await db.drop();
  }
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
