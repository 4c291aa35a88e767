// Inbox consumers: claim + process + mark throughput with 1, 4 and 16 workers, side by side with
// pg-boss's fetch-and-complete loop on the same database, in one run.
//
//   npm install --no-save pg-boss@12      # the comparison; not a dependency of tide
//   ./node_modules/.bin/bun bench/inbox.ts [--messages 10000] [--batch 10] [--runs 3] [--pg-boss <module>]
//
// Every case starts from N messages of ~1 KiB already waiting (inserted before the clock starts)
// and ends when all are done. W workers run at once, each with a connection of its own, in this
// process (the work is the database's). The cases:
//   tide, SQL loop       tide.inbox_claim(inbox, B) then tide.inbox_mark_processed(inbox, ids, claim)
//                        marking the batch processed in one statement: what pg-boss's loop does.
//   tide, client work()  pg-tide/client's work() with concurrency 1 and batchSize B per worker: each
//                        message in a transaction of its own (BEGIN, the handler, the fenced mark,
//                        COMMIT), as an application's side effects need.
//   ... async commit     the same, the handler starting with SET LOCAL synchronous_commit = off
//                        (docs/client.md, "Throughput").
//   pg-boss              boss.fetch(queue, { batchSize: B }) then boss.complete(queue, ids).
// Cases are interleaved run by run (the machine is shared); each figure is the median of the runs,
// and the ratio column compares medians of the same run set. Database CPU is that of the scratch
// database's backends (and the server's background writers) during the case, per message.

import { work } from "../client/index.js";
import {
  connectTo, describeMachine, fixed, intFlag, markdownTable, payloadOfSize, scratchDatabase, type Sql,
  startCpuAccount, waitForQuiet,
} from "./support.ts";

const MESSAGES = intFlag("messages", 10_000);
const BATCH = intFlag("batch", 10);
const RUNS = intFlag("runs", 3);
const WORKERS = [1, 4, 16];
const PG_BOSS = process.argv.includes("--pg-boss") ? process.argv[process.argv.indexOf("--pg-boss") + 1]! : "pg-boss";
const PAYLOAD = payloadOfSize(1024);

type System = "tide, SQL loop" | "tide, client work()" | "tide, client work(), async commit" | "pg-boss";
const SYSTEMS: System[] = ["tide, SQL loop", "tide, client work()", "tide, client work(), async commit", "pg-boss"];

interface Measured {
  system: System;
  workers: number;
  messagesPerSecond: number;
  /** PostgreSQL CPU per message, µs. */
  databaseCpuUs: number;
  otherCores: number;
}

const { PgBoss } = await loadPgBoss();
const db = await scratchDatabase("inbox");
const sql = connectTo(db.url, 2);
const boss = new PgBoss({ connectionString: db.url, max: Math.max(...WORKERS) + 2, supervise: false, schedule: false });
boss.on("error", (error: Error) => console.error(`pg-boss: ${error.message}`));
try {
  console.log(await describeMachine());
  console.log(`messages ${MESSAGES} (~1 KiB), batch ${BATCH}, runs ${RUNS}, workers ${WORKERS.join(", ")}\n`);
  await boss.start();
  const results: Measured[] = [];
  for (let run = 1; run <= RUNS; run++) {
    for (const workers of WORKERS) {
      for (const system of SYSTEMS) {
        await waitForQuiet(0.3, 10_000);
        const measured = await measure(system, workers, `${run}_${workers}`);
        results.push(measured);
        console.log(
          `run ${run}: ${system}, ${workers} workers: ${fixed(measured.messagesPerSecond, 0)} msg/s, ` +
            `database ${fixed(measured.databaseCpuUs, 0)} µs/msg (others ${fixed(measured.otherCores, 2)} cores)`,
        );
      }
    }
  }
  console.log("\n" + report(results));
} finally {
  await boss.stop({ graceful: false, close: true }).catch(() => {});
  await sql.end();
  await db.drop();
}

async function measure(system: System, workers: number, label: string): Promise<Measured> {
  const name = `bench_${system === "pg-boss" ? "boss" : "tide"}_${label}`;
  if (system === "pg-boss") {
    await boss.createQueue(name);
    for (let start = 0; start < MESSAGES; start += 5000) {
      await boss.insert(name, Array.from({ length: Math.min(5000, MESSAGES - start) }, () => ({ data: PAYLOAD })));
    }
  } else {
    await sql`SELECT tide.inbox_create(${name})`;
    for (let start = 0; start < MESSAGES; start += 5000) {
      const batch = Array.from({ length: Math.min(5000, MESSAGES - start) }, (_, i) => ({
        event_id: `${name}:${start + i}`,
        payload: PAYLOAD,
      }));
      await sql`SELECT * FROM tide.inbox_insert_batch(${name}, ${sql.json(batch as any)})`;
    }
  }
  await sql`VACUUM ANALYZE`;
  const clients = Array.from({ length: system.startsWith("tide, client") ? workers : 1 }, () => connectTo(db.url, workers + 1));
  try {
    const cpu = await startCpuAccount(() => [], { database: db.name });
    const started = performance.now();
    if (system === "pg-boss") await Promise.all(Array.from({ length: workers }, () => bossLoop(name)));
    else if (system === "tide, SQL loop") await Promise.all(Array.from({ length: workers }, () => tideLoop(clients[0]!, name)));
    else await tideWorkers(clients, name, system.endsWith("async commit"));
    const seconds = (performance.now() - started) / 1000;
    const used = cpu.read();
    await checkDone(system, name);
    return {
      system,
      workers,
      messagesPerSecond: MESSAGES / seconds,
      databaseCpuUs: (used.postgres / MESSAGES) * 1e6,
      otherCores: used.others / used.wallSeconds,
    };
  } finally {
    await Promise.all(clients.map((client) => client.end()));
    if (system === "pg-boss") await boss.deleteQueue(name);
    else await sql`SELECT tide.inbox_drop(${name})`;
  }
}

/** One worker: claim a batch (payloads parsed by the driver), mark it processed, until none is left. */
async function tideLoop(client: Sql, inbox: string): Promise<void> {
  for (;;) {
    const rows = await client`
      SELECT id, claim_id, payload FROM tide.inbox_claim(${inbox}, ${BATCH}, '5 minutes')`;
    if (rows.length === 0) return;
    await client`
      SELECT tide.inbox_mark_processed(${inbox}, ${rows.map((row) => row.id)}::bigint[], ${rows[0]!.claim_id}::bigint)`;
  }
}

/** W client workers (each its own postgres.js client), stopped once every message is processed. */
async function tideWorkers(clients: Sql[], inbox: string, asyncCommit: boolean): Promise<void> {
  let done = 0;
  const finished = Promise.withResolvers<void>();
  const workers = clients.map((client) =>
    work(client, inbox, async (_message, tx) => {
      if (asyncCommit) await tx`SET LOCAL synchronous_commit = off`;
      if (++done === MESSAGES) finished.resolve();
    }, { concurrency: 1, batchSize: BATCH, onError: (error) => console.error(error.message) })
  );
  await finished.promise;
  await Promise.all(workers.map((worker) => worker.stop()));
}

async function bossLoop(queue: string): Promise<void> {
  for (;;) {
    const jobs = await boss.fetch(queue, { batchSize: BATCH });
    if (jobs.length === 0) return;
    await boss.complete(queue, jobs.map((job: { id: string }) => job.id));
  }
}

async function checkDone(system: System, name: string): Promise<void> {
  if (system === "pg-boss") {
    const [{ open }] = await sql`
      SELECT count(*)::int AS open FROM pgboss.job WHERE name = ${name} AND state IN ('created', 'retry', 'active')`;
    if (open !== 0) throw new Error(`pg-boss queue ${name} still holds ${open} jobs`);
    return;
  }
  const [{ pending }] = await sql`SELECT pending FROM tide.inbox_stats WHERE inbox = ${name}`;
  if (Number(pending) !== 0) throw new Error(`inbox ${name} still has ${pending} pending messages`);
}

function report(results: Measured[]): string {
  const median = (values: number[]) => [...values].sort((a, b) => a - b)[Math.floor((values.length - 1) / 2)]!;
  const rows: (string | number)[][] = [];
  for (const workers of WORKERS) {
    const of = (system: System) => results.filter((r) => r.system === system && r.workers === workers);
    const boss = median(of("pg-boss").map((r) => r.messagesPerSecond));
    for (const system of SYSTEMS) {
      const runs = of(system);
      const rate = median(runs.map((r) => r.messagesPerSecond));
      rows.push([
        system, workers, fixed(rate, 0), system === "pg-boss" ? "1.00" : fixed(rate / boss, 2),
        fixed(median(runs.map((r) => r.databaseCpuUs)), 0), fixed(Math.max(...runs.map((r) => r.otherCores)), 2),
      ]);
    }
  }
  return markdownTable(
    ["consumer", "workers", "msg/s (median)", "× pg-boss", "database CPU µs/msg (median)", "other load, cores (max)"],
    rows,
  );
}

async function loadPgBoss(): Promise<{ PgBoss: any }> {
  try {
    return await import(PG_BOSS);
  } catch (error) {
    throw new Error(
      `cannot load pg-boss from "${PG_BOSS}" (${(error as Error).message}): install it with ` +
        "npm install --no-save pg-boss@12, or pass --pg-boss <path to its dist/index.js>",
    );
  }
}
