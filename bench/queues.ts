// RabbitMQ, Redis Streams and MQTT: how fast the relay drains an outbox backlog into each, against a
// bare publish loop with the same client library in the same run, so that the ratio says what the
// relay costs on top of the client whatever else the machine is doing.
//
//   ./node_modules/.bin/bun bench/queues.ts [--messages 20000] [--batch 500] [--runs 3] [--sinks rabbitmq,redis,mqtt]
//
// RabbitMQ on 127.0.0.1:5672 (guest), Redis on 127.0.0.1:6379 and Mosquitto on 127.0.0.1:1883 must
// answer (scripts/services.sh up).
//
// Bare loop: `--messages` bodies of ~1 KiB (the same JSON text the relay sends), published in
// windows of `--batch`, each window waiting for the broker's acknowledgements before the next, as
// the relay's sink does per batch: amqplib on a confirm channel (persistent, mandatory, to a queue
// through the default exchange), ioredis with one pipeline of XADD per window, mqtt.js at QoS 1
// (each PUBACK). Drain: a fresh database gets the same messages (one INSERT ... SELECT, VACUUM
// ANALYZE, CHECKPOINT), then `bun main.ts run` starts as a child process with its default flags and
// one pipeline (batch_size `--batch`, the sink's defaults: for redis the idempotent add through a Lua
// script); timed from the relay's "pipeline started" log line until the consumer group acknowledged
// everything; the broker is then checked to hold every message. Ratio = drain msg/s / bare msg/s,
// per run (the bare loop runs right before the drain).

import amqp from "amqplib";
import { Redis } from "ioredis";
import mqtt from "mqtt";
import {
  connectTo, describeMachine, fixed, intFlag, markdownTable, medianRun, payloadOfSize, scratchDatabase, spawnRelay,
  startCpuAccount, waitForQuiet,
} from "./support.ts";

const RABBITMQ_URL = "amqp://127.0.0.1:5672";
const REDIS_URL = "redis://127.0.0.1:6379";
const MQTT_URL = "mqtt://127.0.0.1:1883";
const MESSAGES = intFlag("messages", 20_000);
const BATCH = intFlag("batch", 500);
const RUNS = intFlag("runs", 3);
const TIME_LIMIT_MS = 600_000;
const SINKS = ["rabbitmq", "redis", "mqtt"] as const;
type Sink = (typeof SINKS)[number];
const token = () => `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;

/** A queue, stream or topic for one run: the pipeline config, a bare publish loop, and what arrived. */
interface Target {
  config: Record<string, unknown>;
  /** Publishes `bodies` in windows of BATCH, each acknowledged before the next; returns the seconds taken. */
  bare(bodies: string[]): Promise<number>;
  /** How many messages the broker holds (or the subscriber received) since `reset()`. */
  count(): Promise<number>;
  reset(): Promise<void>;
  drop(): Promise<void>;
}

async function target(sink: Sink): Promise<Target> {
  const name = `bench-${token()}`;
  if (sink === "rabbitmq") {
    const connection = await amqp.connect(RABBITMQ_URL);
    const channel = await connection.createConfirmChannel();
    await channel.assertQueue(name, { durable: true });
    return {
      config: { url: RABBITMQ_URL, routing_key: name },
      async bare(bodies) {
        const start = performance.now();
        for (let i = 0; i < bodies.length; i += BATCH) {
          for (const [j, body] of bodies.slice(i, i + BATCH).entries()) {
            channel.publish("", name, Buffer.from(body), { persistent: true, mandatory: true, messageId: `bare:${i + j}`, contentType: "application/json" });
          }
          await channel.waitForConfirms();
        }
        return (performance.now() - start) / 1000;
      },
      async count() {
        return (await channel.checkQueue(name)).messageCount;
      },
      async reset() {
        await channel.purgeQueue(name);
      },
      async drop() {
        await channel.deleteQueue(name).catch(() => {});
        await connection.close();
      },
    };
  }
  if (sink === "redis") {
    const redis = new Redis(REDIS_URL, { protocol: 2 });
    const stream = `bench:${name}`;
    const reset = async () => {
      const keys = await redis.keys(`${stream}*`);
      if (keys.length > 0) await redis.del(...keys);
    };
    return {
      config: { url: REDIS_URL, stream },
      async bare(bodies) {
        const start = performance.now();
        for (let i = 0; i < bodies.length; i += BATCH) {
          const pipeline = redis.pipeline();
          for (const [j, body] of bodies.slice(i, i + BATCH).entries()) pipeline.xadd(stream, "*", "payload", body, "tide-dedup-key", `bare:${i + j}`);
          await pipeline.exec();
        }
        return (performance.now() - start) / 1000;
      },
      async count() {
        return await redis.xlen(stream);
      },
      reset,
      async drop() {
        await reset();
        redis.disconnect();
      },
    };
  }
  const topic = `bench/${name}`;
  const subscriber = await mqtt.connectAsync(MQTT_URL, { protocolVersion: 5, reconnectPeriod: 0 });
  let received = 0;
  subscriber.on("message", () => void received++);
  await subscriber.subscribeAsync(topic, { qos: 1 });
  const publisher = await mqtt.connectAsync(MQTT_URL, { protocolVersion: 5, reconnectPeriod: 0 });
  return {
    config: { url: MQTT_URL, topic },
    async bare(bodies) {
      const start = performance.now();
      for (let i = 0; i < bodies.length; i += BATCH) {
        await Promise.all(bodies.slice(i, i + BATCH).map((body) => publisher.publishAsync(topic, body, { qos: 1 })));
      }
      return (performance.now() - start) / 1000;
    },
    async count() {
      return received;
    },
    async reset() {
      const deadline = performance.now() + 30_000;
      // Wait until the subscriber has everything of the bare loop, then start counting again.
      for (let last = -1; last !== received && performance.now() < deadline; await Bun.sleep(200)) last = received;
      received = 0;
    },
    async drop() {
      await publisher.endAsync();
      await subscriber.endAsync();
    },
  };
}

interface Run { sink: Sink; bareMsgsPerSecond: number; drainSeconds: number; drainMsgsPerSecond: number; ratio: number; relayCpu: number; otherCores: number }

async function run(sink: Sink): Promise<Run> {
  const db = await scratchDatabase("queues_drain");
  const sql = connectTo(db.url, 2);
  const to = await target(sink);
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
    // The very bodies the relay will send: jsonb's text of each payload.
    const bodies = (await sql`SELECT payload::text AS body FROM tide.outbox_messages ORDER BY id`).map((r) => r.body as string);

    await waitForQuiet();
    const bareSeconds = await to.bare(bodies);
    await to.reset();

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
    const deadline = performance.now() + 30_000;
    let stored = await to.count();
    while (stored < MESSAGES && performance.now() < deadline) stored = (await Bun.sleep(100), await to.count());
    if (stored !== MESSAGES) console.log(`  warning: the ${sink} target holds ${stored} messages, not ${MESSAGES}`);
    if (relay.problems.length > 0) console.log(`  relay warnings:\n  ${relay.problems.slice(0, 5).join("\n  ")}`);
    const drainSeconds = (doneAt - startedAt) / 1000;
    const bareMsgsPerSecond = MESSAGES / bareSeconds;
    const drainMsgsPerSecond = MESSAGES / drainSeconds;
    return {
      sink, bareMsgsPerSecond, drainSeconds, drainMsgsPerSecond, ratio: drainMsgsPerSecond / bareMsgsPerSecond,
      relayCpu: used.children, otherCores: used.others / used.wallSeconds,
    };
  } finally {
    await relay?.stop();
    await sql.end({ timeout: 1 });
    await db.drop();
    await to.drop();
  }
}

const LABELS: Record<Sink, string> = {
  rabbitmq: "RabbitMQ (confirms, persistent)",
  redis: "Redis Streams (XADD, idempotent)",
  mqtt: "MQTT (QoS 1)",
};

const chosen = process.argv.includes("--sinks")
  ? (process.argv[process.argv.indexOf("--sinks") + 1]!.split(",") as Sink[])
  : [...SINKS];
console.log(await describeMachine());
console.log(`${MESSAGES} messages of ~1 KiB, batch_size ${BATCH}; ${RUNS} runs each\n`);
const runs: Run[] = [];
for (let round = 1; round <= RUNS; round++) {
  for (const sink of chosen) {
    const r = await run(sink);
    runs.push(r);
    console.log(`run ${round} ${sink}: bare ${fixed(r.bareMsgsPerSecond, 0)} msg/s, relay ${fixed(r.drainMsgsPerSecond, 0)} msg/s ` +
      `(${fixed(r.drainSeconds, 2)} s), ratio ${fixed(r.ratio, 2)}, relay CPU ${fixed(r.relayCpu, 1)} s, other processes ${fixed(r.otherCores, 2)} cores`);
  }
}
console.log(`\n${markdownTable(["outbox →", "bare loop msg/s", "relay drain msg/s", "drain ÷ bare", "ratio range", "relay CPU s"],
  chosen.map((sink) => {
    const own = runs.filter((r) => r.sink === sink);
    const m = medianRun(own, (r) => r.ratio);
    const range = `${fixed(Math.min(...own.map((r) => r.ratio)), 2)}–${fixed(Math.max(...own.map((r) => r.ratio)), 2)}`;
    return [LABELS[sink], fixed(m.bareMsgsPerSecond, 0), fixed(m.drainMsgsPerSecond, 0), fixed(m.ratio, 2), range, fixed(m.relayCpu, 1)];
  }))}\n`);
