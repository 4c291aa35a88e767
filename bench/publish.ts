// Publish overhead: latency and throughput of a one-row transaction
//   BEGIN; SELECT tide.outbox_publish('bench', <~1 KiB jsonb>, '{"event_type":"x"}'); COMMIT;
// from 8 concurrent clients, for an outbox created with p_notify := false and with p_notify := true,
// against the same transaction inserting into plain tables with the same columns (no tide).
//
//   ./node_modules/.bin/bun bench/publish.ts [--transactions 20000] [--clients 8] [--runs 3] [--driver postgresjs|pgbench]
//                                            [--experiments]
//
// driver postgresjs (default): 8 reserved postgres.js connections, each sending BEGIN, the statement
// (prepared) and COMMIT as three awaited round trips, latency timed around all three.
// driver pgbench: the same three statements as a pgbench script (-M prepared), latencies from its
// per-transaction log. Each run starts from empty tables after a CHECKPOINT; the variants are
// interleaved run by run, and the run with the median transactions/s is reported.
// The notify variant runs with one session LISTENing on tide_outbox_notify, as a relay would.
// Also measured: the 4-argument form (topic NULL), which skips the SQL-language 3-argument wrapper.
// --experiments adds a candidate fix that exists only in the scratch database: the 3-argument
// wrapper written in PL/pgSQL instead of SQL.

import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import postgres from "postgres";
import {
  type CpuAccount, connectTo, describeMachine, fixed, intFlag, markdownTable, medianRun, payloadOfSize, scratchDatabase,
  startCpuAccount, summarize, undisturbed, waitForQuiet,
} from "./support.ts";

const TRANSACTIONS = intFlag("transactions", 20_000);
const CLIENTS = intFlag("clients", 8);
const RUNS = intFlag("runs", 3);
const WARMUP = 1_000;
const DRIVER = process.argv.includes("--driver") ? process.argv[process.argv.indexOf("--driver") + 1] : "postgresjs";
if (DRIVER !== "postgresjs" && DRIVER !== "pgbench") throw new Error("--driver must be postgresjs or pgbench");

// postgres.js sends a jsonb parameter as JSON.stringify(value): pass objects, not JSON text.
const PAYLOAD = payloadOfSize(1024);
const HEADERS = { event_type: "x" };
const PAYLOAD_BYTES = JSON.stringify(PAYLOAD).length;

interface Variant {
  name: string;
  /** The middle statement, with $1 = payload and $2 = headers. */
  statement: string;
  /** Table(s) to empty before a run. */
  truncate: string;
  listen?: boolean;
}

const VARIANTS: Variant[] = [
  {
    name: "plain table, primary key only",
    statement: "INSERT INTO bench_plain (outbox, payload, headers) VALUES ('bench', $1::jsonb, $2::jsonb)",
    truncate: "bench_plain",
  },
  {
    name: "plain table, tide's indexes",
    statement: "INSERT INTO bench_indexed (outbox, payload, headers) VALUES ('bench', $1::jsonb, $2::jsonb)",
    truncate: "bench_indexed",
  },
  {
    name: "tide.outbox_publish, p_notify := false",
    statement: "SELECT tide.outbox_publish('bench', $1::jsonb, $2::jsonb)",
    truncate: "tide.outbox_messages",
  },
  {
    name: "tide.outbox_publish 4-arg (topic NULL), p_notify := false",
    statement: "SELECT tide.outbox_publish('bench', NULL::text, $1::jsonb, $2::jsonb)",
    truncate: "tide.outbox_messages",
  },
  {
    name: "tide.outbox_publish, p_notify := true",
    statement: "SELECT tide.outbox_publish('bench_notify', $1::jsonb, $2::jsonb)",
    truncate: "tide.outbox_messages",
    listen: true,
  },
];
if (process.argv.includes("--experiments")) {
  VARIANTS.push({
    name: "experiment: 3-arg wrapper in PL/pgSQL, p_notify := false",
    statement: "SELECT public.publish_plpgsql_wrapper('bench', $1::jsonb, $2::jsonb)",
    truncate: "tide.outbox_messages",
  });
}

interface Run {
  variant: string;
  tps: number;
  mean: number;
  p50: number;
  p99: number;
  max: number;
  /** PostgreSQL CPU (all backends) per transaction, µs; and the same for the client (bench or pgbench). */
  serverUs: number;
  clientUs: number;
  otherCores: number;
}

const db = await scratchDatabase("publish");
const sql = connectTo(db.url, 2);
try {
  console.log(await describeMachine());
  console.log(`driver ${DRIVER}, ${CLIENTS} clients, ${TRANSACTIONS} transactions per run, ${RUNS} runs, payload ${PAYLOAD_BYTES} bytes of JSON\n`);
  await setUp(sql);
  const runs: Run[] = [];
  for (let round = 1; round <= RUNS; round++) {
    for (const variant of VARIANTS) {
      const run = await undisturbed(() => measure(variant));
      runs.push(run);
      console.log(
        `run ${round} ${variant.name}: ${fixed(run.tps, 0)} tx/s, p50 ${fixed(run.p50, 2)} ms, p99 ${fixed(run.p99, 2)} ms, ` +
          `CPU per tx: PostgreSQL ${fixed(run.serverUs, 0)} µs, client ${fixed(run.clientUs, 0)} µs; other processes ${fixed(run.otherCores, 2)} cores`,
      );
    }
  }
  const rows = VARIANTS.map((variant) => {
    const own = runs.filter((r) => r.variant === variant.name);
    const median = medianRun(own, (r) => r.tps);
    const spread = `${fixed(Math.min(...own.map((r) => r.tps)), 0)}–${fixed(Math.max(...own.map((r) => r.tps)), 0)}`;
    return [variant.name, fixed(median.tps, 0), spread, fixed(median.mean, 2), fixed(median.p50, 2), fixed(median.p99, 2),
      fixed(median.max, 1), fixed(median.serverUs, 0), fixed(median.otherCores, 2)];
  });
  console.log(`\n${markdownTable(["variant", "tx/s", "tx/s range of runs", "mean ms", "p50 ms", "p99 ms", "max ms",
    "PostgreSQL CPU µs/tx", "other load (cores)"], rows)}`);
} finally {
  await sql.end();
  await db.drop();
}

async function setUp(sql: postgres.Sql) {
  const columns = `id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, outbox text NOT NULL, topic text,
    payload jsonb NOT NULL, headers jsonb NOT NULL DEFAULT '{}', txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    created_at timestamptz NOT NULL DEFAULT now()`;
  await sql.unsafe(`CREATE TABLE bench_plain (${columns})`);
  await sql.unsafe(`CREATE TABLE bench_indexed (${columns})`);
  await sql.unsafe("CREATE INDEX ON bench_indexed (outbox, txid, id)");
  await sql.unsafe("CREATE INDEX ON bench_indexed (outbox, id)");
  await sql`SELECT tide.outbox_create('bench', p_notify := false)`;
  await sql`SELECT tide.outbox_create('bench_notify', p_notify := true)`;
  // Same signature, privileges and search_path pinning as tide's 3-argument overload, other language.
  await sql.unsafe(`
    CREATE FUNCTION public.publish_plpgsql_wrapper(p_outbox text, p_payload jsonb, p_headers jsonb DEFAULT '{}')
    RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    BEGIN
      RETURN tide.outbox_publish(p_outbox, NULL::text, p_payload, p_headers);
    END $$`);
}

async function measure(variant: Variant): Promise<Run> {
  await sql.unsafe(`TRUNCATE ${variant.truncate}`);
  await sql.unsafe("CHECKPOINT");
  const listener = variant.listen ? connectTo(db.url, 1) : undefined;
  let notified = 0;
  if (listener) await listener.listen("tide_outbox_notify", () => void notified++);
  try {
    await waitForQuiet();
    const cpu = await startCpuAccount(undefined, { database: db.name });
    const { latencies, seconds } = DRIVER === "pgbench" ? await viaPgbench(variant, cpu) : await viaPostgresJs(variant);
    const used = cpu.read();
    const s = summarize(latencies);
    if (listener) console.log(`  (the listening session received ${notified} notifications)`);
    const all = TRANSACTIONS + WARMUP; // the CPU account covers the warm-up too
    return {
      variant: variant.name, tps: latencies.length / seconds, mean: s.mean, p50: s.p50, p99: s.p99, max: s.max,
      serverUs: (used.postgres / all) * 1e6, clientUs: ((used.bench + used.children) / all) * 1e6,
      otherCores: used.others / used.wallSeconds,
    };
  } finally {
    await listener?.end();
  }
}

/** Per-transaction latencies in ms and the wall time of the measured part in seconds. */
async function viaPostgresJs(variant: Variant): Promise<{ latencies: number[]; seconds: number }> {
  const pool = connectTo(db.url, CLIENTS);
  try {
    const clients = await Promise.all(Array.from({ length: CLIENTS }, () => pool.reserve()));
    const transact = async (client: postgres.ReservedSql) => {
      await client`BEGIN`;
      await client.unsafe(variant.statement, [PAYLOAD as never, HEADERS as never], { prepare: true });
      await client`COMMIT`;
    };
    const loop = async (client: postgres.ReservedSql, count: number, into?: number[]) => {
      for (let i = 0; i < count; i++) {
        const start = performance.now();
        await transact(client);
        into?.push(performance.now() - start);
      }
    };
    await Promise.all(clients.map((c) => loop(c, WARMUP / CLIENTS)));
    const perClient = clients.map(() => [] as number[]);
    const start = performance.now();
    await Promise.all(clients.map((c, i) => loop(c, Math.ceil(TRANSACTIONS / CLIENTS), perClient[i])));
    const seconds = (performance.now() - start) / 1000;
    for (const c of clients) c.release();
    return { latencies: perClient.flat(), seconds };
  } finally {
    await pool.end({ timeout: 1 });
  }
}

async function viaPgbench(variant: Variant, cpu: CpuAccount): Promise<{ latencies: number[]; seconds: number }> {
  const dir = mkdtempSync(join(tmpdir(), "tide-bench-"));
  try {
    // pgbench has no parameters for literals: the payload goes into the script, quoted.
    const literal = (text: string) => `'${text.replaceAll("'", "''")}'`;
    const statement = variant.statement
      .replace("$1", literal(JSON.stringify(PAYLOAD)))
      .replace("$2", literal(JSON.stringify(HEADERS)));
    writeFileSync(join(dir, "tx.sql"), `BEGIN;\n${statement};\nCOMMIT;\n`);
    const url = new URL(db.url);
    const base = ["pgbench", "-n", "-M", "prepared", "-h", url.hostname, "-p", url.port || "5432", "-U", url.username,
      "-c", String(CLIENTS), "-j", "2", "-f", join(dir, "tx.sql"), db.name];
    // Asynchronous spawn: the LISTEN session in this process must keep reading while pgbench runs.
    cpu.addExitedChild(await pgbench([...base.slice(0, -1), "-t", String(WARMUP / CLIENTS), db.name], dir));
    cpu.addExitedChild(await pgbench([...base.slice(0, -1), "-t", String(Math.ceil(TRANSACTIONS / CLIENTS)), "-l",
      "--log-prefix", join(dir, "log"), db.name], dir));
    // Log lines: client_id transaction_no latency_us script_no epoch_s epoch_us.
    const latencies: number[] = [];
    let first = Infinity;
    let last = 0;
    for (const file of readdirSync(dir).filter((f) => f.startsWith("log"))) {
      for (const line of readFileSync(join(dir, file), "utf8").split("\n")) {
        const f = line.split(" ");
        if (f.length < 6) continue;
        const latencyMs = Number(f[2]) / 1000;
        const endMs = Number(f[4]) * 1000 + Number(f[5]) / 1000;
        latencies.push(latencyMs);
        first = Math.min(first, endMs - latencyMs);
        last = Math.max(last, endMs);
      }
    }
    return { latencies, seconds: (last - first) / 1000 };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Runs pgbench; returns the CPU seconds it used. */
async function pgbench(argv: string[], cwd: string): Promise<number> {
  const child = Bun.spawn(argv, { cwd, stdout: "ignore", stderr: "pipe" });
  const [code, stderr] = await Promise.all([child.exited, new Response(child.stderr).text()]);
  if (code !== 0) throw new Error(`pgbench failed: ${stderr}`);
  return Number(child.resourceUsage()?.cpuTime.total ?? 0) / 1e6; // µs
}
