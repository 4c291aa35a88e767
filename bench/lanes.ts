// Keyed lanes and scale-out: does a pipeline drain faster with more lanes and more relays, and what
// saturates at each step? For each sink, in one run on the same outbox:
//
// - 1 relay × 1 lane (the default), 1 relay × 4 lanes, 2 relays × 4 lanes (same relay group: each
//   relay owns two lanes).
//
//   ./node_modules/.bin/bun bench/lanes.ts [--messages 100000] [--runs 3] [--only nats|kafka|webhook]
//                                          [--webhook-messages 4000] [--webhook-ms 5]
//
// "webhook" is a sink whose every request takes --webhook-ms to answer (a receiver in this process
// that waits that long before its 204), in the webhook plugin's default single mode: one message per
// request, in order, as a remote endpoint with a round trip of that length sees it. There a lane is
// bound by the sink's latency, not by CPU, which is what lanes are for. It drains --webhook-messages
// (fewer: one lane delivers about 1000 / --webhook-ms messages a second) and also 2 relays × 8 lanes.
//
// The outbox holds `--messages` messages of ~1 KiB with a `key` header over 500 keys (the default
// lane key), one INSERT ... SELECT, VACUUM ANALYZE, CHECKPOINT. Each setup gets a pipeline of its own
// with default settings except `lanes`, and a fresh target: a JetStream stream (each message waits
// for its PubAck) or a Kafka topic of 4 partitions (acks "all"). The previous setup's pipeline is
// deleted first, so its relays have nothing else to do.
//
// Timing: from the first acknowledged batch to the moment every lane's position reached the last
// message (consumer_groups, polled every 10 ms); start-up is not timed, and the rate counts all the
// messages (the first batches, acknowledged when the clock starts, are < 1 % of them). CPU: the relays' (summed),
// PostgreSQL's (this database's backends and the server's shared processes) and everything else on
// the machine (the brokers, and whatever else runs), each as cores used over the drain. The ratio
// of each setup to 1 × 1 is measured within one run; the order of the setups rotates between runs.

import { Kafka, logLevel } from "kafkajs";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { jetstreamManager, type JetStreamManager } from "@nats-io/jetstream";
import {
  connectTo, describeMachine, fixed, intFlag, markdownTable, payloadOfSize, processMemory,
  type RelayProcess, scratchDatabase, spawnRelay, startCpuAccount, waitForQuiet, onlyFlag,
} from "./support.ts";
import { createTarget, KAFKA_BROKER, NATS_URL, type Target } from "./targets.ts";

const KEYS = 500;
const TIME_LIMIT_MS = 600_000;
const QUIET_WAIT_MS = 20_000;

type Sink = "nats" | "kafka" | "webhook";
interface Setup {
  relays: number;
  lanes: number;
}
const SETUPS: Setup[] = [{ relays: 1, lanes: 1 }, { relays: 1, lanes: 4 }, { relays: 2, lanes: 4 }];
const WEBHOOK_SETUPS: Setup[] = [...SETUPS, { relays: 2, lanes: 8 }];
const setupsOf = (sink: Sink) => (sink === "webhook" ? WEBHOOK_SETUPS : SETUPS);
const label = (s: Setup) => `${s.relays} × ${s.lanes}`;

interface Measured {
  setup: Setup;
  msgsPerSecond: number;
  relayCores: number;
  postgresCores: number;
  otherCores: number;
  peakRssMiB: number;
}

const MESSAGES = intFlag("messages", 100_000);
const RUNS = intFlag("runs", 3);
const WEBHOOK_MESSAGES = intFlag("webhook-messages", 4_000);
const WEBHOOK_MS = intFlag("webhook-ms", 5);
const ONLY = onlyFlag(["nats", "kafka", "webhook"]);
const SINKS = (["nats", "kafka", "webhook"] as Sink[]).filter((s) => !ONLY || s === ONLY);
const messagesOf = (sink: Sink) => (sink === "webhook" ? WEBHOOK_MESSAGES : MESSAGES);
const token = () => `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;

const kafka = new Kafka({ clientId: "tide-bench-lanes", brokers: [KAFKA_BROKER], logLevel: logLevel.NOTHING });
const nc: NatsConnection = await connect({ servers: NATS_URL });
const jsm: JetStreamManager = await jetstreamManager(nc);

console.log(await describeMachine());
console.log(`${MESSAGES} messages of ~1 KiB over ${KEYS} keys per run (webhook answering in ${WEBHOOK_MS} ms: ${WEBHOOK_MESSAGES}), ` +
  `${RUNS} runs; setups (relays × lanes): ${SETUPS.map(label).join(", ")} (webhook also 2 × 8)\n`);

const results: { sink: Sink; run: number; measured: Measured[] }[] = [];
for (let run = 1; run <= RUNS; run++) {
  for (const sink of SINKS) {
    const setups = setupsOf(sink);
    const order = setups.map((_, i) => setups[(i + run - 1) % setups.length]!);
    const measured = await drainAll(sink, order);
    results.push({ sink, run, measured });
    const base = measured.find((m) => m.setup.lanes === 1)!;
    for (const m of measured) {
      console.log(`run ${run} ${sink} ${label(m.setup)}: ${fixed(m.msgsPerSecond, 0)} msg/s (× ${fixed(m.msgsPerSecond / base.msgsPerSecond, 2)} of 1 × 1); ` +
        `relays ${fixed(m.relayCores, 2)} cores, PostgreSQL ${fixed(m.postgresCores, 2)}, others ${fixed(m.otherCores, 2)}; peak RSS ${fixed(m.peakRssMiB, 0)} MiB`);
    }
  }
}

const median = (values: number[]) => [...values].sort((a, b) => a - b)[Math.floor((values.length - 1) / 2)]!;
const range = (values: number[], digits = 2) => `${fixed(Math.min(...values), digits)}–${fixed(Math.max(...values), digits)}`;
const rows: (string | number)[][] = [];
for (const sink of SINKS) {
  for (const setup of setupsOf(sink)) {
    const own = results.filter((r) => r.sink === sink).map((r) => {
      const m = r.measured.find((x) => label(x.setup) === label(setup))!;
      const base = r.measured.find((x) => x.setup.lanes === 1)!;
      return { ...m, ratio: m.msgsPerSecond / base.msgsPerSecond };
    });
    rows.push([
      sink === "nats" ? "NATS JetStream" : sink === "kafka" ? "Kafka (4 partitions)" : `webhook answering in ${WEBHOOK_MS} ms`, label(setup),
      `${fixed(median(own.map((m) => m.msgsPerSecond)), 0)} (${range(own.map((m) => m.msgsPerSecond), 0)})`,
      `${fixed(median(own.map((m) => m.ratio)), 2)} (${range(own.map((m) => m.ratio))})`,
      fixed(median(own.map((m) => m.relayCores)), 2),
      fixed(median(own.map((m) => m.postgresCores)), 2),
      fixed(median(own.map((m) => m.otherCores)), 2),
    ]);
  }
}
console.log(`\n${markdownTable(["outbox →", "relays × lanes", "msg/s median (range)", "× of 1 × 1 in the same run (range)",
  "relay cores", "PostgreSQL cores", "other cores"], rows)}`);
await nc.drain();

async function drainAll(sink: Sink, order: Setup[]): Promise<Measured[]> {
  const db = await scratchDatabase("lanes");
  const sql = connectTo(db.url, 2);
  try {
    await sql`SELECT tide.outbox_create('bench')`;
    await sql`
      INSERT INTO tide.outbox_messages (outbox, payload, headers)
      SELECT 'bench', ${sql.json(payloadOfSize(1024) as never)}::jsonb || jsonb_build_object('order_id', g),
             jsonb_build_object('event_type', 'order.created', 'key', 'customer-' || (g % ${KEYS}))
        FROM generate_series(1, ${messagesOf(sink)}) g`;
    await sql`VACUUM ANALYZE tide.outbox_messages`;
    await sql`CHECKPOINT`;
    const measured: Measured[] = [];
    for (const setup of order) {
      await waitForQuiet(0.25, QUIET_WAIT_MS);
      measured.push(await drain(sink, sql, db, setup));
    }
    return measured;
  } finally {
    await sql.end({ timeout: 1 });
    await db.drop();
  }
}

async function drain(sink: Sink, sql: ReturnType<typeof connectTo>, db: { url: string; name: string }, setup: Setup): Promise<Measured> {
  const pipeline = `lanes-${setup.relays}x${setup.lanes}`;
  const target = sink === "webhook" ? slowWebhook() : await createTarget({ kafka, jsm }, sink, `${pipeline}-${token()}`, sink === "kafka" ? 4 : 1);
  const relays: RelayProcess[] = [];
  try {
    await sql`SELECT tide.relay_set_outbox(${pipeline}, 'bench', ${sink}, ${sql.json({ ...target.config, lanes: setup.lanes } as never)})`;
    const cpu = await startCpuAccount(() => relays.map((r) => r.pid), { database: db.name });
    for (let i = 0; i < setup.relays; i++) relays.push(spawnRelay(db.url));
    const startedAt = Math.max(...(await Promise.all(relays.map((r) => r.logged("relay started")))));
    const [{ maxId }] = await sql`SELECT max(id)::bigint AS "maxId" FROM tide.outbox_messages WHERE outbox = 'bench'`;
    let first: { at: number; cpu: ReturnType<typeof cpu.read> } | undefined;
    let last: typeof first;
    for (;;) {
      // A lane's group moves past the other lanes' messages too: the drain ends when every lane's
      // position reached the last message.
      const [{ started, done }] = await sql`
        SELECT count(*) FILTER (WHERE committed_offset > 0)::int AS started,
               count(*) FILTER (WHERE committed_offset >= ${maxId})::int AS done
          FROM tide.consumer_groups WHERE group_name = ${pipeline} OR group_name LIKE ${`${pipeline}.lane-%`}`;
      const at = performance.now();
      if (started > 0 && !first) first = { at, cpu: cpu.read() };
      if (done === setup.lanes) {
        last = { at, cpu: cpu.read() };
        break;
      }
      if (at - startedAt > TIME_LIMIT_MS) throw new Error(`${sink} ${label(setup)}: not drained within ${TIME_LIMIT_MS} ms`);
      await Bun.sleep(10);
    }
    const seconds = (last.at - first!.at) / 1000;
    const problems = relays.flatMap((r) => r.problems);
    if (problems.length > 0) console.log(`  relay warnings:\n  ${problems.slice(0, 5).join("\n  ")}`);
    const stored = await target.count();
    if (stored < messagesOf(sink)) throw new Error(`${sink} ${label(setup)}: the target holds ${stored} messages, not ${messagesOf(sink)}`);
    const used = (k: "postgres" | "children" | "others") => (last!.cpu[k] - first!.cpu[k]) / seconds;
    return {
      setup,
      msgsPerSecond: messagesOf(sink) / seconds,
      relayCores: used("children"),
      postgresCores: used("postgres"),
      otherCores: used("others"),
      peakRssMiB: Math.max(...relays.map((r) => processMemory(r.pid).peakMiB)),
    };
  } finally {
    await Promise.all(relays.map((r) => r.stop()));
    await sql`SELECT tide.relay_delete(${pipeline})`;
    await target.drop();
  }
}

/** A webhook that answers every request after WEBHOOK_MS, counting the messages it received. */
function slowWebhook(): Target {
  let received = 0;
  const server = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(request) {
      await request.arrayBuffer();
      await Bun.sleep(WEBHOOK_MS);
      received++;
      return new Response(null, { status: 204 });
    },
  });
  return {
    config: { url: `http://127.0.0.1:${server.port}/hook` },
    count: async () => received,
    drop: async () => void server.stop(true),
  };
}
