// Keyed lanes and scale-out: does a pipeline drain faster with more lanes and more relays, and what
// saturates at each step? For each sink, in one run on the same outbox:
//
// - 1 relay × 1 lane (the default), 1 relay × 4 lanes, 2 relays × 4 lanes (same relay group: each
//   relay owns two lanes).
//
//   ./node_modules/.bin/bun bench/lanes.ts [--messages 100000] [--runs 3] [--only nats|kafka]
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
  type RelayProcess, scratchDatabase, spawnRelay, startCpuAccount, waitForQuiet,
} from "./support.ts";
import { createTarget, KAFKA_BROKER, NATS_URL } from "./targets.ts";

const KEYS = 500;
const TIME_LIMIT_MS = 600_000;
const QUIET_WAIT_MS = 20_000;

type Sink = "nats" | "kafka";
interface Setup {
  relays: number;
  lanes: number;
}
const SETUPS: Setup[] = [{ relays: 1, lanes: 1 }, { relays: 1, lanes: 4 }, { relays: 2, lanes: 4 }];
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
const ONLY = process.argv.includes("--only") ? process.argv[process.argv.indexOf("--only") + 1] : undefined;
const SINKS = (["nats", "kafka"] as Sink[]).filter((s) => !ONLY || s === ONLY);
const token = () => `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;

const kafka = new Kafka({ clientId: "tide-bench-lanes", brokers: [KAFKA_BROKER], logLevel: logLevel.NOTHING });
const nc: NatsConnection = await connect({ servers: NATS_URL });
const jsm: JetStreamManager = await jetstreamManager(nc);

console.log(await describeMachine());
console.log(`${MESSAGES} messages of ~1 KiB over ${KEYS} keys per run, ${RUNS} runs; setups (relays × lanes): ${SETUPS.map(label).join(", ")}\n`);

const results: { sink: Sink; run: number; measured: Measured[] }[] = [];
for (let run = 1; run <= RUNS; run++) {
  for (const sink of SINKS) {
    const order = SETUPS.map((_, i) => SETUPS[(i + run - 1) % SETUPS.length]!);
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
  for (const setup of SETUPS) {
    const own = results.filter((r) => r.sink === sink).map((r) => {
      const m = r.measured.find((x) => label(x.setup) === label(setup))!;
      const base = r.measured.find((x) => x.setup.lanes === 1)!;
      return { ...m, ratio: m.msgsPerSecond / base.msgsPerSecond };
    });
    rows.push([
      sink === "nats" ? "NATS JetStream" : "Kafka (4 partitions)", label(setup),
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
        FROM generate_series(1, ${MESSAGES}) g`;
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
  const target = await createTarget({ kafka, jsm }, sink, `${pipeline}-${token()}`, sink === "kafka" ? 4 : 1);
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
    if (stored < MESSAGES) throw new Error(`${sink} ${label(setup)}: the target holds ${stored} messages, not ${MESSAGES}`);
    const used = (k: "postgres" | "children" | "others") => (last!.cpu[k] - first!.cpu[k]) / seconds;
    return {
      setup,
      msgsPerSecond: MESSAGES / seconds,
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
