// Table capture: (1) the write overhead of the capture triggers on a bulk INSERT ... SELECT and on
// single-row transactions, against the same table without capture; (2) change → webhook latency
// p50/p99: a writer inserts one row per transaction at a steady rate, the relay delivers each change
// (wire_format sequin) to a local webhook that records the arrival time.
//   bun bench/capture.ts [--rows 100000] [--singles 5000] [--rate 500] [--seconds 20]
// With --wal: plain vs trigger-captured vs WAL-captured tables in one run, on an embedded PostgreSQL 18
// started with wal_level=logical: single-row insert p50/p99 at --clients (8) concurrent writers, a bulk
// insert of --rows (the WAL table a second time with the relay paused: the writer's own cost), the change → webhook latency p50/p99 of trigger vs WAL capture at --latency-rate
// (1000) rows/s, the modes alternating in --latency-rounds (3) rounds of --latency-seconds (10) each,
// and the relay's peak RSS while it reads one source transaction of --big-mb MiB. --only latency
// runs the latency comparison alone. --pin (Linux, taskset) gives the capture a core of its own, as a
// database server with cores to spare would: the writers (this process and their backends, and every
// other PostgreSQL process) run on CPU 0, the relay, the WAL sender it streams from and the relay's own
// backends on CPU 1, for every table's turn alike.
//   bun bench/capture.ts --wal [--rows 100000] [--singles 4000] [--clients 8] [--big-mb 100] [--only latency] [--pin]
// Figures go to stdout; nothing is asserted.

import {
  connectTo, describeMachine, fixed, intFlag, markdownTable, type Sql, scratchDatabase, spawnRelay, startReceiver, summarize, onlyFlag,
} from "./support.ts";
import { readdirSync, readFileSync } from "node:fs";
import { startEmbeddedPostgres } from "../core/embedded.ts";
import { installSchema } from "../core/schema.ts";

const ROWS = intFlag("rows", 100_000);
const SINGLES = intFlag("singles", 5_000);
const RATE = intFlag("rate", 500);
const SECONDS = intFlag("seconds", 20);

const TABLE = `(id bigint PRIMARY KEY, customer_id int NOT NULL, total numeric(10,2), status text, created_at timestamptz DEFAULT now())`;

async function writeOverhead() {
  const db = await scratchDatabase("capture");
  const sql = connectTo(db.url, 2);
  try {
    await sql.unsafe(`CREATE TABLE plain ${TABLE}; CREATE TABLE captured ${TABLE}`);
    await sql`SELECT tide.outbox_create('changes')`;
    await sql`SELECT tide.capture_table('captured', 'changes')`;
    const rows: (string | number)[][] = [];
    for (const table of ["plain", "captured"]) {
      const bulkStart = performance.now();
      await sql.unsafe(`INSERT INTO ${table} (id, customer_id, total, status)
                        SELECT g, g % 1000, g * 0.5, 'new' FROM generate_series(1, ${ROWS}) g`);
      const bulkMs = performance.now() - bulkStart;
      const updateStart = performance.now();
      await sql.unsafe(`UPDATE ${table} SET status = 'paid' WHERE id <= ${ROWS / 10}`);
      const updateMs = performance.now() - updateStart;
      const latencies: number[] = [];
      for (let i = 0; i < SINGLES; i++) {
        const start = performance.now();
        await sql.unsafe(`INSERT INTO ${table} (id, customer_id, total) VALUES (${ROWS + 1 + i}, 1, 9.99)`);
        latencies.push(performance.now() - start);
      }
      const single = summarize(latencies);
      rows.push([table, fixed(bulkMs, 0), fixed((ROWS / bulkMs) * 1000, 0), fixed(updateMs, 0), fixed(single.p50, 3), fixed(single.p99, 3)]);
    }
    const [{ n }] = await sql`SELECT count(*)::int AS n FROM tide.outbox_messages`;
    console.log(`\n### Capture write overhead (${ROWS} rows bulk, ${ROWS / 10} rows updated, ${SINGLES} single-row inserts)\n`);
    console.log(markdownTable(["table", "bulk INSERT ms", "rows/s", `UPDATE of ${ROWS / 10} rows ms`, "single insert p50 ms", "p99 ms"], rows));
    console.log(`\ncaptured events: ${n}`);
  } finally {
    await sql.end();
    await db.drop();
  }
}

async function changeLatency() {
  const db = await scratchDatabase("capture_latency");
  const sql = connectTo(db.url, 2);
  const latencies: number[] = [];
  const receiver = startReceiver((_request, body, arrived) => {
    const change = JSON.parse(body);
    latencies.push(arrived - Date.parse(change.record.created_at));
  });
  const relay = spawnRelay(db.url, ["--poll-interval-ms", "50"]);
  try {
    await sql.unsafe(`CREATE TABLE orders ${TABLE}`);
    await sql`SELECT tide.outbox_create('changes', p_notify := true)`;
    await sql`SELECT tide.capture_table('orders', 'changes')`;
    await sql`SELECT tide.relay_set_outbox('hook', 'changes', 'webhook', ${sql.json({ url: receiver.url, wire_format: "sequin" })})`;
    await relay.logged("pipeline started");
    const total = RATE * SECONDS;
    const interval = 1000 / RATE;
    const begin = performance.now();
    for (let i = 0; i < total; i++) {
      const due = begin + i * interval;
      const wait = due - performance.now();
      if (wait > 0) await Bun.sleep(wait);
      // clock_timestamp() inside the row: the change's time as the database saw it (same clock as the receiver).
      await sql`INSERT INTO orders (id, customer_id, total, created_at) VALUES (${i + 1}, 1, 9.99, clock_timestamp())`;
    }
    const deadline = Date.now() + 60_000;
    while (latencies.length < total && Date.now() < deadline) await Bun.sleep(20);
    const s = summarize(latencies);
    const memory = relay.memory();
    console.log(`\n### Change → webhook latency (${RATE} changes/s for ${SECONDS} s, sequin format, NOTIFY wake-up)\n`);
    console.log(markdownTable(["delivered", "p50 ms", "p90 ms", "p99 ms", "max ms", "relay RSS MiB"], [
      [`${latencies.length}/${total}`, fixed(s.p50), fixed(s.p90), fixed(s.p99), fixed(s.max), fixed(memory.rssMiB)],
    ]));
  } finally {
    await relay.stop();
    receiver.stop();
    await sql.end();
    await db.drop();
  }
}

/** Trigger vs WAL capture vs no capture, on a server of its own with wal_level=logical. */
async function walMode() {
  const clients = intFlag("clients", 8);
  const singles = intFlag("singles", 4_000);
  const bigMiB = intFlag("big-mb", 100);
  const server = await startEmbeddedPostgres(undefined, ["-c", "wal_level=logical", "-c", "max_wal_size=4GB"]);
  const url = server.url.replace(/\/postgres$/, "/bench");
  const admin = connectTo(server.url, 1);
  await admin.unsafe("CREATE DATABASE bench");
  await admin.end();
  const sql = connectTo(url, clients + 2);
  let relay: ReturnType<typeof spawnRelay> | undefined;
  try {
    await installSchema(sql as never);
    const [{ version }] = await sql`SELECT current_setting('server_version') AS version`;
    const tables = ["plain", "trigger", "wal"];
    for (const table of tables) await sql.unsafe(`CREATE TABLE ${table} ${TABLE}`);
    await sql`SELECT tide.outbox_create('changes')`;
    await sql`SELECT tide.capture_table('trigger', 'changes')`;
    await sql`SELECT tide.capture_table('wal', 'changes', p_mode => 'wal')`;
    relay = spawnRelay(url);
    await relay.logged("reading WAL capture slot");
    const pinned = process.argv.includes("--pin") ? await pinCapture(sql, relay.pid) : undefined;
    if (onlyFlag(["latency"]) === "latency") {
      await walLatency(sql);
      return;
    }
    // Single-row inserts from `clients` writers; the tables take turns, in rounds, so drift hits each alike.
    // "wal, relay paused": the WAL table again with the relay stopped (SIGSTOP), so that neither it nor
    // the WAL sender it reads from competes for the cores: what is left is the writer's own cost.
    const PAUSED = "wal, relay paused";
    const turns = [...tables, PAUSED];
    const paused = async <T>(table: string, run: () => Promise<T>): Promise<T> => {
      await pinned?.(); // backends the relay opened since
      if (table !== PAUSED) return await run();
      process.kill(relay!.pid, "SIGSTOP");
      try {
        return await run();
      } finally {
        process.kill(relay!.pid, "SIGCONT");
      }
    };
    const target = (table: string) => (table === PAUSED ? "wal" : table);
    const latencies = new Map<string, number[]>(turns.map((t) => [t, []]));
    const rounds = 4;
    let next = ROWS + 1;
    for (let round = 0; round < rounds; round++) {
      for (const table of turns) {
        const per = Math.ceil(singles / rounds / clients);
        await paused(table, () => Promise.all(Array.from({ length: clients }, async () => {
          for (let i = 0; i < per; i++) {
            const id = next++;
            const start = performance.now();
            await sql.unsafe(`INSERT INTO ${target(table)} (id, customer_id, total) VALUES (${id}, 1, 9.99)`);
            latencies.get(table)!.push(performance.now() - start);
          }
        })));
      }
    }
    const bulk = new Map<string, number>();
    for (const table of turns) {
      const from = table === PAUSED ? 5_000_000 : 1; // the WAL table's second bulk: ids of its own
      const start = performance.now();
      await paused(table, () => sql.unsafe(`INSERT INTO ${target(table)} (id, customer_id, total, status)
                        SELECT g, g % 1000, g * 0.5, 'new' FROM generate_series(${from}, ${from + ROWS - 1}) g`));
      bulk.set(table, performance.now() - start);
    }
    const plain = summarize(latencies.get("plain")!);
    const rows = turns.map((table) => {
      const s = summarize(latencies.get(table)!);
      return [table, fixed(s.p50, 3), fixed(s.p99, 3), `${fixed(s.p50 / plain.p50, 2)}×`, fixed(bulk.get(table)!, 0),
        `${fixed(bulk.get(table)! / bulk.get("plain")!, 2)}×`];
    });
    console.log(`\n### Capture modes: writer cost (PostgreSQL ${version}, ${clients} clients, ${singles} single-row inserts per table, ${ROWS}-row bulk insert${pinned ? "; capture pinned to CPU 1, writers to CPU 0" : ""})\n`);
    console.log(markdownTable(["table", "single insert p50 ms", "p99 ms", "p50 / plain", "bulk INSERT ms", "bulk / plain"], rows));

    // One large source transaction: the relay's peak RSS while it writes it into the outbox.
    const expected = async () => (await sql`SELECT count(*)::int AS n FROM tide.outbox_messages WHERE topic = 'public.wal'`)[0].n;
    const walBefore = singles + ROWS;
    let deadline = Date.now() + 600_000;
    while ((await expected()) < walBefore && Date.now() < deadline) await Bun.sleep(200);
    const rssBefore = relay.memory().rssMiB;
    const bigRows = Math.floor((bigMiB * 1024 * 1024) / 1024);
    const start = performance.now();
    await sql.unsafe(`INSERT INTO wal (id, customer_id, total, status)
                      SELECT g, 1, 1.00, repeat('x', 1000) FROM generate_series(${10_000_000}, ${10_000_000 + bigRows - 1}) g`);
    const written = performance.now();
    deadline = Date.now() + 1_800_000;
    while ((await expected()) < walBefore + bigRows && Date.now() < deadline) await Bun.sleep(200);
    const done = performance.now();
    const memory = relay.memory();
    console.log(`\n### WAL capture of one ${bigMiB} MiB transaction (${bigRows} rows of ~1 KiB)\n`);
    console.log(markdownTable(["source INSERT s", "in the outbox after s", "relay RSS before MiB", "relay peak RSS MiB"], [
      [fixed((written - start) / 1000, 1), fixed((done - written) / 1000, 1), fixed(rssBefore), fixed(memory.peakMiB)],
    ]));
    await walLatency(sql);
    if (relay.problems.length) console.log(`\nrelay warnings:\n${relay.problems.join("\n")}`);
  } finally {
    await relay?.stop();
    await sql.end();
    await server.stop();
  }
}

/**
 * Change → webhook latency, trigger vs WAL capture, in one run: each mode has its table, outbox (with
 * NOTIFY) and webhook pipeline; writers insert one row per transaction at a steady rate, the modes
 * take turns in rounds, and each round waits for every delivery before the next begins. The latency
 * of a change is its arrival at the webhook minus the clock_timestamp() its row was written with.
 */
async function walLatency(sql: Sql) {
  const rate = intFlag("latency-rate", 1_000);
  const seconds = intFlag("latency-seconds", 10);
  const rounds = intFlag("latency-rounds", 3);
  const writers = 4;
  const modes = ["trigger", "wal"] as const;
  const arrived = new Map<string, number[]>(modes.map((m) => [`lat_${m}`, []]));
  const receiver = startReceiver((_request, body, at) => {
    const change = JSON.parse(body);
    arrived.get(change.metadata.table_name)?.push(at - Date.parse(change.record.created_at));
  });
  let next = 1;
  /** Inserts `total` rows into `table` at `perSecond`, then waits for all of them at the webhook. */
  const measure = async (table: string, total: number, perSecond: number): Promise<number[]> => {
    arrived.set(table, []);
    const per = Math.ceil(total / writers);
    const interval = (1000 * writers) / perSecond;
    const begin = performance.now();
    await Promise.all(Array.from({ length: writers }, async (_, w) => {
      for (let i = 0; i < per; i++) {
        const wait = begin + (i * interval) + (w * interval) / writers - performance.now();
        if (wait > 0) await Bun.sleep(wait);
        const id = next++;
        // clock_timestamp() inside the row: the change's time as the database saw it (same clock as the receiver).
        await sql.unsafe(`INSERT INTO ${table} (id, customer_id, total, created_at) VALUES (${id}, 1, 9.99, clock_timestamp())`);
      }
    }));
    const deadline = Date.now() + 120_000;
    while (arrived.get(table)!.length < per * writers && Date.now() < deadline) await Bun.sleep(20);
    return arrived.get(table)!;
  };
  try {
    for (const mode of modes) {
      const name = `lat_${mode}`;
      await sql.unsafe(`CREATE TABLE ${name} ${TABLE}`);
      await sql`SELECT tide.outbox_create(${name}, p_notify := true)`;
      await sql`SELECT tide.capture_table(${name}, ${name}, p_mode => ${mode})`;
      await sql`SELECT tide.relay_set_outbox(${name}, ${name}, 'webhook', ${sql.json({ url: receiver.url, wire_format: "sequin" })})`;
    }
    for (const mode of modes) await measure(`lat_${mode}`, writers, writers); // the pipelines and the WAL reader run
    const results = new Map<string, { p50: number; p99: number; delivered: number; total: number }[]>(modes.map((m) => [m, []]));
    for (let round = 0; round < rounds; round++) {
      for (const mode of round % 2 === 0 ? modes : [...modes].reverse()) {
        const total = rate * seconds;
        const latencies = await measure(`lat_${mode}`, total, rate);
        const s = summarize(latencies);
        results.get(mode)!.push({ p50: s.p50, p99: s.p99, delivered: latencies.length, total: Math.ceil(total / writers) * writers });
      }
    }
    // Where a WAL change's time goes: until its outbox transaction began (the outbox row's created_at
    // is now() of that transaction), and from there to the webhook.
    const [split] = await sql`
      SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM m.created_at - (m.payload->'record'->>'created_at')::timestamptz) * 1000) AS to_outbox_p50,
             percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM m.created_at - (m.payload->'record'->>'created_at')::timestamptz) * 1000) AS to_outbox_p99,
             count(DISTINCT m.txid) AS outbox_transactions, count(*) AS messages
        FROM tide.outbox_messages m WHERE m.outbox = 'lat_wal'`;
    console.log(`WAL: row written → its outbox transaction began: p50 ${fixed(split.to_outbox_p50)} ms, p99 ${fixed(split.to_outbox_p99)} ms; ` +
      `${split.messages} changes in ${split.outbox_transactions} outbox transactions`);
    const median = (values: number[]) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)];
    const trigger = results.get("trigger")!;
    const rows = modes.map((mode) => {
      const r = results.get(mode)!;
      return [mode, r.map((x) => `${x.delivered}/${x.total}`).join(", "), r.map((x) => fixed(x.p50)).join(", "), fixed(median(r.map((x) => x.p50))),
        r.map((x) => fixed(x.p99)).join(", "), fixed(median(r.map((x) => x.p99))),
        `${fixed(median(r.map((x, i) => x.p50 / trigger[i].p50)), 2)}×`, `${fixed(median(r.map((x, i) => x.p99 / trigger[i].p99)), 2)}×`];
    });
    const [{ version }] = await sql`SELECT current_setting('server_version') AS version`;
    console.log(`\n### Change → webhook latency, trigger vs WAL capture (PostgreSQL ${version}, ${rate} rows/s from ${writers} writers, ${rounds} rounds of ${seconds} s per mode, sequin format, NOTIFY wake-up)\n`);
    console.log(markdownTable(["capture", "delivered per round", "p50 ms per round", "median p50 ms", "p99 ms per round", "median p99 ms",
      "p50 / trigger (median of rounds)", "p99 / trigger"], rows));
  } finally {
    receiver.stop();
  }
}

console.log(await describeMachine());
if (process.argv.includes("--wal")) {
  await walMode();
} else {
  await writeOverhead();
  await changeLatency();
}

/**
 * --pin: every process of the server and this one (the writers) on CPU 0; the relay (all threads),
 * the WAL sender and the relay's backends on CPU 1. Returns a function that pins the relay's
 * backends opened since (run before each turn).
 */
async function pinCapture(sql: Sql, relayPid: number): Promise<() => Promise<void>> {
  const taskset = (cpu: number, pid: number) => {
    const result = Bun.spawnSync(["taskset", "-a", "-p", "-c", String(cpu), String(pid)], { stdout: "ignore", stderr: "pipe" });
    if (result.exitCode !== 0 && existsPid(pid)) throw new Error(`taskset ${pid}: ${result.stderr.toString().trim()}`);
  };
  const [{ backend }] = await sql`SELECT pg_backend_pid() AS backend`;
  const postmaster = parentOf(backend);
  taskset(0, process.pid);
  taskset(0, postmaster);
  for (const pid of childrenOf(postmaster)) taskset(0, pid);
  const captureSide = async () => {
    const rows = await sql<{ pid: number }[]>`
      SELECT pid FROM pg_stat_activity WHERE backend_type = 'walsender' OR application_name LIKE 'pg-tide%'`;
    taskset(1, relayPid);
    for (const { pid } of rows) taskset(1, pid);
  };
  await captureSide();
  return captureSide;
}

function parentOf(pid: number): number {
  return Number(/^PPid:\s+(\d+)$/m.exec(readFileSync(`/proc/${pid}/status`, "utf8"))![1]);
}

function childrenOf(parent: number): number[] {
  return readdirSync("/proc").filter((name) => /^\d+$/.test(name)).map(Number).filter((pid) => {
    try {
      return parentOf(pid) === parent;
    } catch {
      return false; // gone meanwhile
    }
  });
}

function existsPid(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}
