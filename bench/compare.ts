// The relay against the bare loop: how close does a drain come to the fastest loop one could write
// by hand with the same clients? For each sink, in one run and back to back on the same data:
//
// - bare loop (a child process): `SELECT id, payload::text ... WHERE id > $last ORDER BY id LIMIT 1000`,
//   publish those 1,000 with the sink's client, wait for the broker's acknowledgements, repeat. No
//   position is written, no headers but the dedup key, no filter, no retries: the floor of the work.
// - relay: `bun main.ts run` (a child process) with its default flags and one pipeline created with
//   default settings (no batch size, no tuning), delivering the same outbox to a fresh target.
//
//   ./node_modules/.bin/bun bench/compare.ts [--messages 100000] [--runs 3] [--only nats|kafka]
//
// The outbox holds `--messages` messages of ~1 KiB (one INSERT ... SELECT, VACUUM ANALYZE,
// CHECKPOINT), shared by both. NATS: a JetStream stream per target, each message waits for its
// PubAck (Nats-Msg-Id = the dedup key). Kafka: a topic of one partition per target, kafkajs's
// idempotent producer, acks "all", no compression; the bare loop sends its 1,000 records in requests
// of at most ~900 KB, one after the other (the broker refuses requests over 1 MiB).
//
// Timing. The bare loop times itself from its first SELECT to its last acknowledgement (connecting
// is not timed). The relay is timed from the first acknowledged batch to the last (the consumer
// group's delivered_total, polled every 10 ms), so its start-up and connecting are not timed either;
// its rate counts the messages delivered in that window. The order of the two alternates between
// runs, and the ratio relay / bare of each run is printed: the machine is shared, and a ratio measured
// within one run is what to compare. Both targets are checked to hold every message afterwards.

import { Kafka, logLevel, type Producer } from "kafkajs";
import { connect, headers as natsHeaders, type NatsConnection } from "@nats-io/transport-node";
import { jetstream, jetstreamManager, type JetStreamManager } from "@nats-io/jetstream";
import postgres from "postgres";
import {
  connectTo, describeMachine, fixed, intFlag, markdownTable, payloadOfSize, processCpuSeconds, processMemory,
  scratchDatabase, spawnRelay, startCpuAccount, waitForQuiet, onlyFlag,
} from "./support.ts";
import { createTarget, KAFKA_BROKER, NATS_URL, type Target } from "./targets.ts";

const BARE_BATCH = 1000;
/** The bare loop's Kafka requests stay under the broker's default message.max.bytes (1 MiB). */
const KAFKA_REQUEST_BYTES = 900_000;
const TIME_LIMIT_MS = 600_000;
/** How long to wait for the machine to calm down before each half of a run (it is shared). */
const QUIET_WAIT_MS = 20_000;

type Sink = "nats" | "kafka";

interface Measured {
  seconds: number;
  messages: number;
  msgsPerSecond: number;
  peakRssMiB: number;
  cpuSeconds: number;
}

if (process.argv[2] === "--bare-loop") {
  // Child mode: bun bench/compare.ts --bare-loop <sink> <postgres url> <target config JSON>
  const result = await bareLoop(process.argv[3] as Sink, process.argv[4]!, JSON.parse(process.argv[5]!));
  console.log(JSON.stringify(result));
  process.exit(0);
}

const MESSAGES = intFlag("messages", 100_000);
const RUNS = intFlag("runs", 3);
/** Exploration only: the relay's batch_size (the figures to report use the default). */
const RELAY_BATCH = process.argv.includes("--relay-batch") ? intFlag("relay-batch", 100) : undefined;
const ONLY = onlyFlag(["nats", "kafka"]);
const SINKS = (["nats", "kafka"] as Sink[]).filter((s) => !ONLY || s === ONLY);
const token = () => `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;

const kafka = new Kafka({ clientId: "tide-bench", brokers: [KAFKA_BROKER], logLevel: logLevel.NOTHING });
const nc: NatsConnection = await connect({ servers: NATS_URL });
const jsm: JetStreamManager = await jetstreamManager(nc);

console.log(await describeMachine());
console.log(`NATS ${nc.info?.version ?? "?"} at ${NATS_URL}; Kafka at ${KAFKA_BROKER}`);
console.log(`${MESSAGES} messages of ~1 KiB per run, ${RUNS} runs; bare loop batches of ${BARE_BATCH}, relay with default settings\n`);

interface Pair {
  sink: Sink;
  bare: Measured;
  relay: Measured & { postgresCpu: number };
  ratio: number;
  otherCores: number;
}

const pairs: Pair[] = [];
for (let round = 1; round <= RUNS; round++) {
  for (const sink of SINKS) {
    const pair = await compare(sink, round % 2 === 1 ? "bare first" : "relay first");
    pairs.push(pair);
    console.log(
      `run ${round} ${sink}: bare ${fixed(pair.bare.msgsPerSecond, 0)} msg/s (peak RSS ${fixed(pair.bare.peakRssMiB, 0)} MiB, ` +
        `CPU ${fixed(pair.bare.cpuSeconds, 2)} s), relay ${fixed(pair.relay.msgsPerSecond, 0)} msg/s (peak RSS ` +
        `${fixed(pair.relay.peakRssMiB, 0)} MiB, CPU ${fixed(pair.relay.cpuSeconds, 2)} s, PostgreSQL CPU ` +
        `${fixed(pair.relay.postgresCpu, 2)} s): ratio ${fixed(pair.ratio, 2)}; other processes ${fixed(pair.otherCores, 2)} cores`,
    );
  }
}

const median = (values: number[]) => [...values].sort((a, b) => a - b)[Math.floor((values.length - 1) / 2)]!;
const range = (values: number[], digits = 0) => `${fixed(Math.min(...values), digits)}–${fixed(Math.max(...values), digits)}`;
console.log(`\n${markdownTable(
  ["outbox →", "bare loop msg/s", "relay msg/s", "ratio relay / bare (median)", "ratio range", "relay peak RSS MiB",
    "relay CPU s per 100k", "bare CPU s per 100k"],
  SINKS.map((sink) => {
    const own = pairs.filter((p) => p.sink === sink);
    const per100k = (m: Measured) => (m.cpuSeconds / m.messages) * 100_000;
    return [
      sink === "nats" ? "NATS JetStream (PubAck)" : "Kafka (acks all)",
      `${fixed(median(own.map((p) => p.bare.msgsPerSecond)), 0)} (${range(own.map((p) => p.bare.msgsPerSecond))})`,
      `${fixed(median(own.map((p) => p.relay.msgsPerSecond)), 0)} (${range(own.map((p) => p.relay.msgsPerSecond))})`,
      fixed(median(own.map((p) => p.ratio)), 2),
      range(own.map((p) => p.ratio), 2),
      `${fixed(median(own.map((p) => p.relay.peakRssMiB)), 0)} (${range(own.map((p) => p.relay.peakRssMiB))})`,
      fixed(median(own.map((p) => per100k(p.relay))), 2),
      fixed(median(own.map((p) => per100k(p.bare))), 2),
    ];
  }),
)}`);
await nc.drain();

async function compare(sink: Sink, order: "bare first" | "relay first"): Promise<Pair> {
  const db = await scratchDatabase("compare");
  const sql = connectTo(db.url, 2);
  const targets: Target[] = [];
  try {
    await sql`SELECT tide.outbox_create('bench')`;
    await sql`
      INSERT INTO tide.outbox_messages (outbox, payload, headers)
      SELECT 'bench', ${sql.json(payloadOfSize(1024) as never)}::jsonb || jsonb_build_object('order_id', g),
             '{"event_type": "order.created"}'
        FROM generate_series(1, ${MESSAGES}) g`;
    await sql`VACUUM ANALYZE tide.outbox_messages`;
    await sql`CHECKPOINT`;
    const bareTarget = await target(sink, `bare-${token()}`);
    const relayTarget = await target(sink, `relay-${token()}`);
    targets.push(bareTarget, relayTarget);

    let bare: Measured | undefined;
    let relay: (Measured & { postgresCpu: number; otherCores: number }) | undefined;
    for (const which of order === "bare first" ? ["bare", "relay"] : ["relay", "bare"]) {
      await waitForQuiet(0.25, QUIET_WAIT_MS);
      if (which === "bare") bare = await runBare(sink, db.url, bareTarget.config);
      else relay = await runRelay(sink, sql, db, relayTarget.config);
    }
    for (const [name, t] of [["bare loop", bareTarget], ["relay", relayTarget]] as const) {
      const stored = await t.count();
      if (stored < MESSAGES) throw new Error(`the ${name}'s ${sink} target holds ${stored} messages, not ${MESSAGES}`);
    }
    return { sink, bare: bare!, relay: relay!, ratio: relay!.msgsPerSecond / bare!.msgsPerSecond, otherCores: relay!.otherCores };
  } finally {
    await sql.end({ timeout: 1 });
    await db.drop();
    for (const t of targets) await t.drop();
  }
}

async function runBare(sink: Sink, url: string, config: Record<string, unknown>): Promise<Measured> {
  const child = Bun.spawn([process.execPath, ...(process.env.TIDE_BENCH_BUN_FLAGS?.split(" ").filter(Boolean) ?? []), import.meta.path, "--bare-loop", sink, url, JSON.stringify(config)], {
    stdout: "pipe",
    stderr: "inherit",
  });
  const output = await new Response(child.stdout).text();
  if ((await child.exited) !== 0) throw new Error(`the bare loop failed: ${output}`);
  return JSON.parse(output.trim().split("\n").pop()!);
}

async function runRelay(sink: Sink, sql: ReturnType<typeof connectTo>, db: { url: string; name: string }, config: Record<string, unknown>) {
  await sql`SELECT tide.relay_set_outbox('compare', 'bench', ${sink}, ${sql.json(config as never)}, p_batch_size := ${RELAY_BATCH ?? null})`;
  let relay: ReturnType<typeof spawnRelay> | undefined;
  try {
    const cpu = await startCpuAccount(() => (relay ? [relay.pid] : []), { database: db.name });
    relay = spawnRelay(db.url);
    const startedAt = await relay.logged("pipeline started");
    let first: { at: number; delivered: number; cpu: number } | undefined;
    let last: { at: number; delivered: number; cpu: number };
    for (;;) {
      const [{ delivered }] = await sql`SELECT coalesce(sum(delivered_total), 0)::int AS delivered FROM tide.consumer_groups`;
      const now = { at: performance.now(), delivered, cpu: processCpuSeconds(relay.pid) };
      if (delivered > 0 && !first) first = now;
      if (delivered >= MESSAGES) {
        last = now;
        break;
      }
      if (now.at - startedAt > TIME_LIMIT_MS) throw new Error(`${sink}: not drained within ${TIME_LIMIT_MS} ms`);
      await Bun.sleep(10);
    }
    const used = cpu.read();
    if (relay.problems.length > 0) console.log(`  relay warnings:\n  ${relay.problems.slice(0, 5).join("\n  ")}`);
    const seconds = (last.at - first!.at) / 1000;
    const messages = last.delivered - first!.delivered;
    return {
      seconds, messages, msgsPerSecond: messages / seconds, peakRssMiB: processMemory(relay.pid).peakMiB,
      cpuSeconds: last.cpu - first!.cpu, postgresCpu: used.postgres, otherCores: used.others / used.wallSeconds,
    };
  } finally {
    await relay?.stop();
  }
}

/** A Kafka topic (one partition) or a JetStream stream for one run (bench/targets.ts). */
function target(sink: Sink, name: string): Promise<Target> {
  return createTarget({ kafka, jsm }, sink, name);
}

// ---------------------------------------------------------------------------------------------
// The bare loop (runs in a child process of its own, like the relay).

async function bareLoop(sink: Sink, url: string, config: Record<string, unknown>): Promise<Measured> {
  const sql = postgres(url, { max: 1, onnotice: () => {} });
  const encoder = new TextEncoder();
  let publish: (rows: { id: string; payload: string }[]) => Promise<void>;
  let close: () => Promise<void>;
  if (sink === "nats") {
    const connection = await connect({ servers: config.url as string });
    const js = jetstream(connection);
    const subject = config.subject as string;
    publish = async (rows) => {
      await Promise.all(rows.map((row) => {
        const h = natsHeaders();
        h.set("Nats-Msg-Id", `bench:${row.id}`);
        return js.publish(subject, encoder.encode(row.payload), { msgID: `bench:${row.id}`, headers: h });
      }));
    };
    close = () => connection.drain();
  } else {
    const client = new Kafka({ clientId: "tide-bench-bare", brokers: [KAFKA_BROKER], logLevel: logLevel.NOTHING });
    const producer: Producer = client.producer({ idempotent: true, maxInFlightRequests: 1 });
    await producer.connect();
    const topic = config.topic as string;
    publish = async (rows) => {
      // One produce request per ~900 KB: the broker refuses requests over message.max.bytes (1 MiB).
      for (let start = 0; start < rows.length;) {
        let bytes = 0;
        let end = start;
        while (end < rows.length && (end === start || bytes + rows[end]!.payload.length + 64 <= KAFKA_REQUEST_BYTES)) {
          bytes += rows[end]!.payload.length + 64;
          end++;
        }
        const messages = rows.slice(start, end).map((row) => ({ key: null, value: row.payload, headers: { "tide-dedup-key": `bench:${row.id}` } }));
        await producer.sendBatch({ acks: -1, topicMessages: [{ topic, messages }] });
        start = end;
      }
    };
    close = () => producer.disconnect();
  }
  await sql`SELECT 1`;
  const start = performance.now();
  const cpuStart = process.cpuUsage();
  let last = "0";
  let messages = 0;
  for (;;) {
    const rows = await sql<{ id: string; payload: string }[]>`
      SELECT m.id::text AS id, m.payload::text AS payload FROM tide.outbox_messages m
       WHERE m.outbox = 'bench' AND m.id > ${last}::bigint ORDER BY m.id LIMIT ${BARE_BATCH}`;
    if (rows.length === 0) break;
    await publish(rows);
    messages += rows.length;
    last = rows[rows.length - 1]!.id;
  }
  const seconds = (performance.now() - start) / 1000;
  const cpu = process.cpuUsage(cpuStart);
  await close();
  await sql.end();
  return {
    seconds, messages, msgsPerSecond: messages / seconds, peakRssMiB: processMemory(process.pid).peakMiB,
    cpuSeconds: (cpu.user + cpu.system) / 1e6,
  };
}
