// Publish overhead: what `outbox_publish` and table capture add to the business transaction they
// live in. pgbench runs each variant below from 8 clients (`-M prepared`), one transaction per
// order; the variants are interleaved run by run, so that every run's figures come from the same
// few seconds of a shared machine, and each variant is compared with "INSERT alone" of its own run.
//
//   ./node_modules/.bin/bun bench/publish.ts [--seconds 10] [--clients 8] [--runs 5] [--payload-bytes 1024]
//                                            [--only pgbench|statements]
//
// The variants separate what costs what: one more statement in the transaction (SELECT 1), the
// outbox row itself (an INSERT into a plain table with tide's columns and indexes), and tide's
// function around that row; and the same publish sent in one statement with the INSERT (a CTE). The
// notify variant runs with one session LISTENing, as a relay would.
// Reported per variant: median transactions/s, p50 and p99 latency (pgbench's per-transaction log),
// the medians of the per-run ratios to "INSERT alone", and CPU per transaction of PostgreSQL (this
// database's backends and the shared background processes) and of pgbench.
//
// Then what each statement costs the server by itself: one session runs each statement 20,000 times
// in a PL/pgSQL loop (plans cached, as with -M prepared, no commit in between), and the backend's own
// CPU time (/proc/<pid>/stat) is divided by the count. The minimum over --runs rounds is reported:
// other load on the machine only ever adds to it.

import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  connectTo, describeMachine, fixed, intFlag, markdownTable, payloadOfSize, processCpuSeconds, scratchDatabase,
  startCpuAccount, summarize, waitForQuiet, onlyFlag,
} from "./support.ts";

const SECONDS = intFlag("seconds", 10);
const CLIENTS = intFlag("clients", 8);
const RUNS = intFlag("runs", 5);
const PAYLOAD_BYTES = intFlag("payload-bytes", 1024);
const ONLY = onlyFlag(["pgbench", "statements"]);
const LOOP = 20_000;
const WARMUP_SECONDS = 2;

const PAYLOAD = JSON.stringify(payloadOfSize(PAYLOAD_BYTES));
const HEADERS = JSON.stringify({ event_type: "order.created" });
const literal = (text: string) => `'${text.replaceAll("'", "''")}'`;
const ORDER = "INSERT INTO orders (customer_id, total, status) VALUES (42, 149.99, 'new')";
const PLAIN_ROW = `INSERT INTO plain_outbox (outbox, payload, headers) VALUES ('bench', ${literal(PAYLOAD)}::jsonb, ${literal(HEADERS)}::jsonb)`;
const PUBLISH = `tide.outbox_publish('bench', ${literal(PAYLOAD)}::jsonb, ${literal(HEADERS)}::jsonb)`;
const PUBLISH_TOPIC = `tide.outbox_publish('bench', 'orders', ${literal(PAYLOAD)}::jsonb, ${literal(HEADERS)}::jsonb)`;

interface Variant {
  name: string;
  /** The statements between BEGIN and COMMIT. */
  statements: string[];
  listen?: boolean;
}

const BASELINE = "INSERT alone";
const VARIANTS: Variant[] = [
  { name: BASELINE, statements: [ORDER] },
  { name: "INSERT + SELECT 1 (one more statement)", statements: [ORDER, "SELECT 1"] },
  { name: "INSERT + INSERT into a plain table shaped like the outbox", statements: [ORDER, PLAIN_ROW] },
  { name: "INSERT + outbox_publish (3 arguments)", statements: [ORDER, `SELECT ${PUBLISH}`] },
  { name: "INSERT + outbox_publish (4 arguments, topic)", statements: [ORDER, `SELECT ${PUBLISH_TOPIC}`] },
  { name: "INSERT and outbox_publish in one statement", statements: [`WITH o AS (${ORDER} RETURNING id) SELECT ${PUBLISH} FROM o`] },
  {
    name: "INSERT + outbox_publish, p_notify := true",
    statements: [ORDER, `SELECT tide.outbox_publish('bench_notify', ${literal(PAYLOAD)}::jsonb, ${literal(HEADERS)}::jsonb)`],
    listen: true,
  },
  { name: "INSERT into a captured table", statements: [ORDER.replace("orders", "captured_orders")] },
];

interface Run {
  variant: string;
  round: number;
  tps: number;
  p50: number;
  p99: number;
  /** CPU per transaction, µs: PostgreSQL, and pgbench. */
  serverUs: number;
  clientUs: number;
  otherCores: number;
}

const db = await scratchDatabase("publish");
const sql = connectTo(db.url, 2);
try {
  console.log(await describeMachine());
  console.log(`pgbench -M prepared, ${CLIENTS} clients, ${SECONDS} s per run (after ${WARMUP_SECONDS} s of warm-up), ` +
    `${RUNS} runs, payload ${PAYLOAD.length} bytes of JSON\n`);
  await setUp();
  const runs: Run[] = [];
  for (let round = 1; round <= (ONLY === "statements" ? 0 : RUNS); round++) {
    for (const variant of VARIANTS) {
      const run = { ...(await measure(variant)), round };
      runs.push(run);
      console.log(
        `run ${round} ${variant.name}: ${fixed(run.tps, 0)} tx/s, p50 ${fixed(run.p50, 3)} ms, p99 ${fixed(run.p99, 2)} ms, ` +
          `CPU per tx: PostgreSQL ${fixed(run.serverUs, 0)} µs, pgbench ${fixed(run.clientUs, 0)} µs; other processes ${fixed(run.otherCores, 2)} cores`,
      );
    }
  }
  if (runs.length > 0) console.log(`\n${report(runs)}`);
  if (ONLY !== "pgbench") console.log(`\n${await statementCosts()}`);
} finally {
  await sql.end();
  await db.drop();
}

/** One row per variant: medians over the runs, and the medians of the per-run differences to the baseline. */
function report(runs: Run[]): string {
  const median = (values: number[]) => summarize(values).p50;
  const range = (values: number[], digits: number) =>
    `${fixed(Math.min(...values), digits)}–${fixed(Math.max(...values), digits)}`;
  const baseline = (round: number) => runs.find((r) => r.round === round && r.variant === BASELINE)!;
  const rows = VARIANTS.map((variant) => {
    const own = runs.filter((r) => r.variant === variant.name);
    const p50Added = own.map((r) => r.p50 - baseline(r.round).p50);
    const tpsRatio = own.map((r) => r.tps / baseline(r.round).tps);
    const cpuAdded = own.map((r) => r.serverUs + r.clientUs - baseline(r.round).serverUs - baseline(r.round).clientUs);
    return [
      variant.name, fixed(median(own.map((r) => r.tps)), 0), fixed(median(own.map((r) => r.p50)), 3),
      fixed(median(own.map((r) => r.p99)), 2), `${fixed(median(p50Added), 3)} (${range(p50Added, 3)})`,
      `${fixed(median(tpsRatio), 2)} (${range(tpsRatio, 2)})`, fixed(median(own.map((r) => r.serverUs)), 0),
      fixed(median(own.map((r) => r.clientUs)), 0), fixed(median(cpuAdded), 0), range(own.map((r) => r.otherCores), 2),
    ];
  });
  return markdownTable([
    "variant", "tx/s", "p50 ms", "p99 ms", "p50 added, ms (range)", "tx/s ratio (range)", "PostgreSQL CPU µs/tx",
    "pgbench CPU µs/tx", "CPU added µs/tx", "other load (cores)",
  ], rows);
}

async function setUp() {
  const order = `(id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, customer_id int NOT NULL, total numeric(10,2),
    status text, created_at timestamptz NOT NULL DEFAULT now())`;
  await sql.unsafe(`CREATE TABLE orders ${order}`);
  await sql.unsafe(`CREATE TABLE captured_orders ${order}`);
  // The same columns, defaults and indexes as tide.outbox_messages.
  await sql.unsafe(`CREATE TABLE plain_outbox (LIKE tide.outbox_messages INCLUDING ALL)`);
  await sql`SELECT tide.outbox_create('bench', p_notify := false)`;
  await sql`SELECT tide.outbox_create('bench_notify', p_notify := true)`;
  await sql`SELECT tide.outbox_create('changes', p_notify := false)`;
  await sql`SELECT tide.capture_table('captured_orders', 'changes')`;
}

async function measure(variant: Variant): Promise<Omit<Run, "round">> {
  await sql.unsafe("TRUNCATE orders, captured_orders, plain_outbox, tide.outbox_messages");
  await sql.unsafe("CHECKPOINT");
  const listener = variant.listen ? connectTo(db.url, 1) : undefined;
  if (listener) await listener.listen("tide_outbox_notify", () => {});
  try {
    await waitForQuiet(0.5, 15_000); // the machine is shared: a calmer moment if one comes soon
    const dir = mkdtempSync(join(tmpdir(), "tide-bench-"));
    try {
      writeFileSync(join(dir, "tx.sql"), ["BEGIN;", ...variant.statements.map((s) => `${s};`), "COMMIT;", ""].join("\n"));
      const url = new URL(db.url);
      const base = ["pgbench", "-n", "-M", "prepared", "-h", url.hostname, "-p", url.port || "5432", "-U", url.username,
        "-c", String(CLIENTS), "-j", "2", "-f", join(dir, "tx.sql")];
      await pgbench([...base, "-T", String(WARMUP_SECONDS), db.name], dir);
      const cpu = await startCpuAccount(undefined, { database: db.name });
      cpu.addExitedChild(await pgbench([...base, "-T", String(SECONDS), "-l", "--log-prefix", join(dir, "log"), db.name], dir));
      const used = cpu.read();
      const latencies = readLatencies(dir);
      const s = summarize(latencies);
      return {
        variant: variant.name, tps: latencies.length / SECONDS, p50: s.p50, p99: s.p99,
        serverUs: (used.postgres / latencies.length) * 1e6, clientUs: ((used.bench + used.children) / latencies.length) * 1e6,
        otherCores: used.others / used.wallSeconds,
      };
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  } finally {
    await listener?.end();
  }
}

/** Per-transaction latencies in ms from pgbench's logs (client_id transaction_no latency_us ...). */
function readLatencies(dir: string): number[] {
  const latencies: number[] = [];
  for (const file of readdirSync(dir).filter((f) => f.startsWith("log"))) {
    for (const line of readFileSync(join(dir, file), "utf8").split("\n")) {
      const fields = line.split(" ");
      if (fields.length >= 6) latencies.push(Number(fields[2]) / 1000);
    }
  }
  return latencies;
}

/** Runs pgbench; returns the CPU seconds it used. */
async function pgbench(argv: string[], cwd: string): Promise<number> {
  const child = Bun.spawn(argv, { cwd, stdout: "ignore", stderr: "pipe" });
  const [code, stderr] = await Promise.all([child.exited, new Response(child.stderr).text()]);
  if (code !== 0) throw new Error(`pgbench failed: ${stderr}`);
  return Number(child.resourceUsage()?.cpuTime.total ?? 0) / 1e6; // µs
}

/** Server CPU per execution of single statements, one session, minimum over the rounds. */
async function statementCosts(): Promise<string> {
  const statements: [string, string][] = [
    ["INSERT into a plain table (the business row)", ORDER],
    ["INSERT into a plain table shaped like the outbox", PLAIN_ROW],
    ["outbox_publish (3 arguments)", `PERFORM ${PUBLISH}`],
    ["outbox_publish (4 arguments, topic)", `PERFORM ${PUBLISH_TOPIC}`],
    ["INSERT into a captured table (one row)", ORDER.replace("orders", "captured_orders")],
    ["nothing (the loop itself)", "PERFORM 1"],
  ];
  const session = await sql.reserve();
  try {
    const [{ pid }] = await session`SELECT pg_backend_pid() AS pid`;
    const best = new Map<string, number>();
    for (let round = 1; round <= RUNS; round++) {
      for (const [name, statement] of statements) {
        await session.unsafe("BEGIN");
        const before = processCpuSeconds(pid);
        await session.unsafe(`DO $bench$ BEGIN FOR i IN 1..${LOOP} LOOP ${statement}; END LOOP; END $bench$`);
        const us = ((processCpuSeconds(pid) - before) / LOOP) * 1e6;
        await session.unsafe("ROLLBACK");
        best.set(name, Math.min(best.get(name) ?? Infinity, us));
      }
    }
    return `Server CPU per statement, one session, ${LOOP} executions, minimum of ${RUNS} rounds:\n\n` +
      markdownTable(["statement", "µs"], statements.map(([name]) => [name, fixed(best.get(name)!, 1)]));
  } finally {
    session.release();
  }
}
