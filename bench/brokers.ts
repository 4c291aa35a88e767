// Kafka and NATS JetStream: how fast the relay drains an outbox backlog into each, the end-to-end
// latency at a steady rate, and how fast it fills an inbox from a JetStream backlog.
//
//   scripts/kafka.sh start    # Kafka on 127.0.0.1:9092; NATS with JetStream must run on 127.0.0.1:4222
//   ./node_modules/.bin/bun bench/brokers.ts [--messages 50000] [--batch 500] [--rate 500] [--seconds 20]
//                                            [--runs 3] [--only drain|latency|reverse] [--sinks kafka,nats]
//
// Drain: a fresh database gets `--messages` messages of ~1 KiB (one INSERT ... SELECT, VACUUM
// ANALYZE, CHECKPOINT), then `bun main.ts run` starts as a child process with its default flags and
// one pipeline (batch_size `--batch`): kafka (acks all, idempotent producer, no compression, a topic
// of one partition created beforehand) or nats (a subject stored by a JetStream stream: every message
// waits for its PubAck). The clock runs from the relay's "pipeline started" log line until the
// consumer group has acknowledged everything; the broker is then checked to hold every message.
//
// Latency: the relay runs first; a publisher commits one ~1 KiB message per transaction at `--rate`
// msg/s for `--seconds` s; a kafkajs consumer (or a NATS core subscriber on the stream's subject) in
// this process notes each arrival. Latency = arrival − clock_timestamp() of the publishing statement
// (so it includes the COMMIT). Twice per sink: the relay's default 250 ms poll, and p_notify := true.
//
// Reverse: `--messages` ~1 KiB messages are published into a JetStream stream first; then the relay
// starts with one nats → inbox pipeline (batch_size `--batch`), timed from "pipeline started" until
// the inbox holds every message.
//
// Relay, PostgreSQL, Kafka, NATS and this process share the machine's cores.

import { Kafka, logLevel } from "kafkajs";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { jetstream, jetstreamManager, type JetStreamManager } from "@nats-io/jetstream";
import {
  connectTo, describeMachine, fixed, intFlag, markdownTable, medianRun, payloadOfSize, processMemory, scratchDatabase,
  spawnRelay, startCpuAccount, summarize, waitForQuiet, wallClockMs, onlyFlag,
} from "./support.ts";
import { createTarget, KAFKA_BROKER, NATS_URL, type Target } from "./targets.ts";

const MESSAGES = intFlag("messages", 50_000);
const BATCH = intFlag("batch", 500);
const RATE = intFlag("rate", 500);
const SECONDS = intFlag("seconds", 20);
const RUNS = intFlag("runs", 3);
const ONLY = onlyFlag(["drain", "latency", "reverse"]);
const TIME_LIMIT_MS = 600_000;
const PUBLISHER_CONNECTIONS = 8;

type Sink = "kafka" | "nats";
const token = () => `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;

const kafka = new Kafka({ clientId: "tide-bench", brokers: [KAFKA_BROKER], logLevel: logLevel.NOTHING });
const nc: NatsConnection = await connect({ servers: NATS_URL });
const jsm: JetStreamManager = await jetstreamManager(nc);

/** A Kafka topic (one partition) or a JetStream stream for one run (bench/targets.ts). */
function target(sink: Sink, name: string): Promise<Target> {
  return createTarget({ kafka, jsm }, sink, name);
}

// ---------------------------------------------------------------------------------------------
// Drain

interface DrainRun { sink: Sink; seconds: number; msgsPerSecond: number; mbPerSecond: number; peakRssMiB: number; relayCpu: number; postgresCpu: number; otherCores: number }

async function drain(sink: Sink): Promise<DrainRun> {
  const db = await scratchDatabase("brokers_drain");
  const sql = connectTo(db.url, 2);
  const to = await target(sink, `drain-${token()}`);
  let relay: ReturnType<typeof spawnRelay> | undefined;
  try {
    await sql`SELECT tide.outbox_create('bench')`;
    await sql`SELECT tide.relay_set_outbox('drain', 'bench', ${sink}, ${sql.json(to.config as never)}, p_batch_size := ${BATCH})`;
    await sql`
      INSERT INTO tide.outbox_messages (outbox, payload, headers)
      SELECT 'bench', ${sql.json(payloadOfSize(1024) as never)}::jsonb || jsonb_build_object('order_id', g), '{"event_type": "x"}'
        FROM generate_series(1, ${MESSAGES}) g`;
    await sql`VACUUM ANALYZE tide.outbox_messages`;
    await sql`CHECKPOINT`;
    const [{ bytes }] = await sql`SELECT sum(octet_length(payload::text))::float8 AS bytes FROM tide.outbox_messages`;

    await waitForQuiet();
    const cpu = await startCpuAccount(() => (relay ? [relay.pid] : []));
    relay = spawnRelay(db.url);
    const startedAt = await relay.logged("pipeline started");
    let doneAt = 0;
    for (;;) {
      const [{ delivered }] = await sql`SELECT coalesce(sum(delivered_total), 0)::int AS delivered FROM tide.consumer_groups`;
      if (delivered >= MESSAGES) {
        doneAt = performance.now();
        break;
      }
      if (performance.now() - startedAt > TIME_LIMIT_MS) throw new Error(`${sink}: not drained within ${TIME_LIMIT_MS} ms`);
      await Bun.sleep(25);
    }
    const used = cpu.read();
    const peakRssMiB = processMemory(relay.pid).peakMiB;
    const stored = await to.count();
    if (stored !== MESSAGES) console.log(`  warning: the ${sink} target holds ${stored} messages, not ${MESSAGES}`);
    if (relay.problems.length > 0) console.log(`  relay warnings:\n  ${relay.problems.slice(0, 5).join("\n  ")}`);
    const seconds = (doneAt - startedAt) / 1000;
    return {
      sink, seconds, msgsPerSecond: MESSAGES / seconds, mbPerSecond: bytes / 1e6 / seconds, peakRssMiB,
      relayCpu: used.children, postgresCpu: used.postgres, otherCores: used.others / used.wallSeconds,
    };
  } finally {
    await relay?.stop();
    await sql.end({ timeout: 1 });
    await db.drop();
    await to.drop();
  }
}

// ---------------------------------------------------------------------------------------------
// Latency

interface LatencyRun { sink: Sink; notify: boolean; sent: number; received: number; latency: ReturnType<typeof summarize>; otherCores: number }

async function latency(sink: Sink, notify: boolean): Promise<LatencyRun> {
  const db = await scratchDatabase("brokers_latency");
  const sql = connectTo(db.url, PUBLISHER_CONNECTIONS);
  const name = `latency-${token()}`;
  const to = await target(sink, name);
  const arrivals = new Map<number, number>();
  const note = (body: string | undefined, at: number) => {
    if (!body) return;
    const { seq, t_ms } = JSON.parse(body) as { seq: number; t_ms: number };
    if (!arrivals.has(seq)) arrivals.set(seq, at - t_ms);
  };
  // The reader starts before the relay, so that it is ready when the first message comes.
  let stopReader: () => Promise<void>;
  if (sink === "kafka") {
    const consumer = kafka.consumer({ groupId: `bench-${name}`, maxWaitTimeInMs: 100 });
    await consumer.connect();
    await consumer.subscribe({ topics: [to.config.topic as string], fromBeginning: true });
    await consumer.run({ eachMessage: async ({ message }) => note(message.value?.toString(), wallClockMs()) });
    stopReader = () => consumer.disconnect();
  } else {
    const subscription = nc.subscribe(to.config.subject as string, { callback: (_e, msg) => note(msg.string(), wallClockMs()) });
    stopReader = async () => subscription.unsubscribe();
  }
  let relay: ReturnType<typeof spawnRelay> | undefined;
  try {
    await sql`SELECT tide.outbox_create('bench', p_notify := ${notify})`;
    await sql`SELECT tide.relay_set_outbox('latency', 'bench', ${sink}, ${sql.json(to.config as never)}, p_batch_size := ${BATCH})`;
    relay = spawnRelay(db.url);
    await relay.logged("pipeline started");
    // Warm up the path (connections, metadata, the reader's partition assignment) before measuring.
    await sql`SELECT tide.outbox_publish('bench', jsonb_build_object('seq', -1, 't_ms', 0))`;
    while (!arrivals.has(-1)) await Bun.sleep(10);
    arrivals.clear();

    await waitForQuiet();
    const cpu = await startCpuAccount(() => (relay ? [relay.pid] : []));
    const total = RATE * SECONDS;
    const pad = "x".repeat(980);
    const start = performance.now();
    const inFlight: Promise<unknown>[] = [];
    for (let seq = 0; seq < total; seq++) {
      const due = start + (seq * 1000) / RATE;
      const wait = due - performance.now();
      if (wait > 1) await Bun.sleep(wait);
      inFlight.push(sql`
        SELECT tide.outbox_publish('bench', jsonb_build_object('seq', ${seq}::int, 'pad', ${pad}::text,
          't_ms', extract(epoch FROM clock_timestamp()) * 1000), '{"event_type": "order.created"}'::jsonb)`);
      if (inFlight.length >= 1000) await Promise.all(inFlight.splice(0));
    }
    await Promise.all(inFlight);
    const deadline = performance.now() + 30_000;
    while (arrivals.size < total && performance.now() < deadline) await Bun.sleep(20);
    const used = cpu.read();
    if (relay.problems.length > 0) console.log(`  relay warnings:\n  ${relay.problems.slice(0, 5).join("\n  ")}`);
    return { sink, notify, sent: total, received: arrivals.size, latency: summarize([...arrivals.values()]), otherCores: used.others / used.wallSeconds };
  } finally {
    await stopReader().catch(() => {});
    await relay?.stop();
    await sql.end({ timeout: 1 });
    await db.drop();
    await to.drop();
  }
}

// ---------------------------------------------------------------------------------------------
// Reverse: JetStream → inbox

interface ReverseRun { seconds: number; msgsPerSecond: number; publishSeconds: number; peakRssMiB: number; relayCpu: number; postgresCpu: number; otherCores: number }

async function reverse(): Promise<ReverseRun> {
  const db = await scratchDatabase("brokers_reverse");
  const sql = connectTo(db.url, 2);
  const name = token();
  const stream = `BENCH_IN_${name}`;
  const subject = `bench.${name}.payments`;
  let relay: ReturnType<typeof spawnRelay> | undefined;
  try {
    await jsm.streams.add({ name: stream, subjects: [subject] });
    const js = jetstream(nc);
    const body = JSON.stringify(payloadOfSize(1024));
    const published = performance.now();
    for (let sent = 0; sent < MESSAGES; sent += 1000) {
      const acks = [];
      for (let i = sent; i < Math.min(MESSAGES, sent + 1000); i++) acks.push(js.publish(subject, body.replace('"order_id":0', `"order_id":${i}`)));
      await Promise.all(acks);
    }
    const publishSeconds = (performance.now() - published) / 1000;
    await sql`SELECT tide.inbox_create('bench')`;
    await sql`SELECT tide.relay_set_inbox('reverse', 'bench', ${sql.json({ source_type: "nats", url: NATS_URL, subject })}, p_batch_size := ${BATCH})`;

    await waitForQuiet();
    const cpu = await startCpuAccount(() => (relay ? [relay.pid] : []));
    relay = spawnRelay(db.url);
    const startedAt = await relay.logged("pipeline started");
    let doneAt = 0;
    for (;;) {
      // The id is a sequence: max(id) is the row count without scanning the table.
      const [{ n }] = await sql`SELECT coalesce(max(id), 0)::int AS n FROM tide.bench_inbox`;
      if (n >= MESSAGES) {
        doneAt = performance.now();
        break;
      }
      if (performance.now() - startedAt > TIME_LIMIT_MS) throw new Error(`reverse: not done within ${TIME_LIMIT_MS} ms`);
      await Bun.sleep(25);
    }
    const used = cpu.read();
    const peakRssMiB = processMemory(relay.pid).peakMiB;
    const [{ rows }] = await sql`SELECT count(*)::int AS rows FROM tide.bench_inbox`;
    if (rows !== MESSAGES) console.log(`  warning: the inbox holds ${rows} rows, not ${MESSAGES}`);
    if (relay.problems.length > 0) console.log(`  relay warnings:\n  ${relay.problems.slice(0, 5).join("\n  ")}`);
    const seconds = (doneAt - startedAt) / 1000;
    return {
      seconds, msgsPerSecond: MESSAGES / seconds, publishSeconds, peakRssMiB,
      relayCpu: used.children, postgresCpu: used.postgres, otherCores: used.others / used.wallSeconds,
    };
  } finally {
    await relay?.stop();
    await sql.end({ timeout: 1 });
    await db.drop();
    await jsm.streams.delete(stream).catch(() => {});
  }
}

// ---------------------------------------------------------------------------------------------

console.log(await describeMachine());
const [kafkaVersion] = await (async () => {
  const admin = kafka.admin();
  await admin.connect();
  try {
    const cluster = await admin.describeCluster();
    return [`Kafka: ${cluster.brokers.length} broker(s) at ${KAFKA_BROKER}`];
  } finally {
    await admin.disconnect();
  }
})();
console.log(`${kafkaVersion}\nNATS: ${nc.info?.version ?? "?"} at ${NATS_URL}, JetStream`);
console.log(`${MESSAGES} messages of ~1 KiB, batch_size ${BATCH}; latency at ${RATE} msg/s for ${SECONDS} s; ${RUNS} runs each\n`);

const sinks: Sink[] = process.argv.includes("--sinks")
  ? (process.argv[process.argv.indexOf("--sinks") + 1]!.split(",") as Sink[])
  : ["kafka", "nats"];
if (!ONLY || ONLY === "drain") {
  const runs: DrainRun[] = [];
  for (let round = 1; round <= RUNS; round++) {
    for (const sink of sinks) {
      const run = await drain(sink);
      runs.push(run);
      console.log(`drain run ${round} ${sink}: ${fixed(run.seconds, 2)} s, ${fixed(run.msgsPerSecond, 0)} msg/s, ${fixed(run.mbPerSecond, 1)} MB/s, ` +
        `peak RSS ${fixed(run.peakRssMiB, 0)} MiB, CPU s relay ${fixed(run.relayCpu, 1)} / postgres ${fixed(run.postgresCpu, 1)}, other processes ${fixed(run.otherCores, 2)} cores`);
    }
  }
  console.log(`\n${markdownTable(["outbox →", "drain s", "msg/s", "msg/s range", "MB/s", "relay peak RSS MiB", "relay CPU s", "PostgreSQL CPU s"],
    sinks.map((sink) => {
      const own = runs.filter((r) => r.sink === sink);
      const m = medianRun(own, (r) => r.msgsPerSecond);
      const range = `${fixed(Math.min(...own.map((r) => r.msgsPerSecond)), 0)}–${fixed(Math.max(...own.map((r) => r.msgsPerSecond)), 0)}`;
      return [sink === "kafka" ? "Kafka (acks all)" : "NATS JetStream (PubAck)", fixed(m.seconds, 2), fixed(m.msgsPerSecond, 0), range,
        fixed(m.mbPerSecond, 1), fixed(m.peakRssMiB, 0), fixed(m.relayCpu, 1), fixed(m.postgresCpu, 1)];
    }))}\n`);
}

if (!ONLY || ONLY === "latency") {
  const runs: LatencyRun[] = [];
  for (let round = 1; round <= RUNS; round++) {
    for (const sink of sinks) {
      for (const notify of [false, true]) {
        const run = await latency(sink, notify);
        runs.push(run);
        const l = run.latency;
        console.log(`latency run ${round} ${sink} p_notify ${notify}: ${run.received}/${run.sent} received, p50 ${fixed(l.p50, 1)} ms, ` +
          `p90 ${fixed(l.p90, 1)}, p99 ${fixed(l.p99, 1)}, max ${fixed(l.max, 1)} ms, other processes ${fixed(run.otherCores, 2)} cores`);
      }
    }
  }
  const rows = [];
  for (const sink of sinks) {
    for (const notify of [false, true]) {
      const own = runs.filter((r) => r.sink === sink && r.notify === notify);
      const m = medianRun(own, (r) => r.latency.p50);
      rows.push([sink === "kafka" ? "Kafka" : "NATS JetStream", notify ? "true (NOTIFY wake-up)" : "false (250 ms poll)",
        `${m.received}/${m.sent}`, fixed(m.latency.p50, 1), fixed(m.latency.p90, 1), fixed(m.latency.p99, 1), fixed(m.latency.max, 1),
        `${fixed(Math.min(...own.map((r) => r.latency.p99)), 1)}–${fixed(Math.max(...own.map((r) => r.latency.p99)), 1)}`]);
    }
  }
  console.log(`\n${markdownTable(["sink", "p_notify", "received", "p50 ms", "p90 ms", "p99 ms", "max ms", "p99 range of runs"], rows)}\n`);
}

if (!ONLY || ONLY === "reverse") {
  const runs: ReverseRun[] = [];
  for (let round = 1; round <= RUNS; round++) {
    const run = await reverse();
    runs.push(run);
    console.log(`reverse run ${round}: ${fixed(run.seconds, 2)} s, ${fixed(run.msgsPerSecond, 0)} msg/s (publishing took ${fixed(run.publishSeconds, 1)} s), ` +
      `peak RSS ${fixed(run.peakRssMiB, 0)} MiB, CPU s relay ${fixed(run.relayCpu, 1)} / postgres ${fixed(run.postgresCpu, 1)}, other processes ${fixed(run.otherCores, 2)} cores`);
  }
  const m = medianRun(runs, (r) => r.msgsPerSecond);
  const range = `${fixed(Math.min(...runs.map((r) => r.msgsPerSecond)), 0)}–${fixed(Math.max(...runs.map((r) => r.msgsPerSecond)), 0)}`;
  console.log(`\n${markdownTable(["→ inbox", "fill s", "msg/s", "msg/s range", "relay peak RSS MiB", "relay CPU s", "PostgreSQL CPU s"],
    [["NATS JetStream", fixed(m.seconds, 2), fixed(m.msgsPerSecond, 0), range, fixed(m.peakRssMiB, 0), fixed(m.relayCpu, 1), fixed(m.postgresCpu, 1)]])}\n`);
}

await nc.drain();
