// Shared pieces of the benchmarks: a scratch database with the tide schema (created and dropped per
// run), the relay as a child process with its memory read from /proc, a ~1 KiB payload, percentiles,
// a description of the machine, and small table printing. Benchmarks print figures; they assert nothing.

import { cpus, totalmem } from "node:os";
import { readdirSync, readFileSync } from "node:fs";
import postgres from "postgres";

const ROOT = `${import.meta.dir}/..`;

/** The server to benchmark against; the scratch databases are created on it. */
export const ADMIN_URL = process.env.BENCH_POSTGRES_URL ?? "postgres://postgres@127.0.0.1:5432/postgres";

export type Sql = postgres.Sql<{}>;

export interface ScratchDatabase {
  name: string;
  url: string;
  /** Drops the database (WITH FORCE: any connection left over is cut). */
  drop(): Promise<void>;
}

/** A new database with the tide schema, installed as a user would: `bun main.ts install`. */
export async function scratchDatabase(label: string): Promise<ScratchDatabase> {
  const name = `tide_bench_${label}_${process.pid}_${Math.random().toString(36).slice(2, 8)}`;
  const admin = postgres(ADMIN_URL, { max: 1, onnotice: () => {} });
  try {
    await admin.unsafe(`CREATE DATABASE ${name}`);
  } finally {
    await admin.end();
  }
  const url = withDatabase(ADMIN_URL, name);
  const install = Bun.spawnSync([process.execPath, "main.ts", "install", "--postgres-url", url], { cwd: ROOT });
  if (install.exitCode !== 0) throw new Error(`install failed: ${install.stderr.toString()}`);
  return {
    name,
    url,
    async drop() {
      const admin = postgres(ADMIN_URL, { max: 1, onnotice: () => {} });
      try {
        await admin.unsafe(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
      } finally {
        await admin.end();
      }
    },
  };
}

export function connectTo(url: string, max = 4): Sql {
  return postgres(url, { max, onnotice: () => {} });
}

function withDatabase(url: string, database: string): string {
  const parsed = new URL(url);
  parsed.pathname = `/${database}`;
  return parsed.toString();
}

/** A JSON object of `bytes` bytes as JSON.stringify writes it (jsonb::text is ~30 bytes longer), shaped like an order event. */
export function payloadOfSize(bytes = 1024, seq = 0): Record<string, unknown> {
  const base = {
    order_id: seq,
    customer: { id: "cus_8f14e45fceea167a5a36dedd4bea2543", name: "Ada Lovelace", tier: "gold" },
    currency: "EUR",
    total: 149.99,
    items: [
      { sku: "SKU-000123", qty: 2, price: 49.5 },
      { sku: "SKU-000456", qty: 1, price: 50.99 },
    ],
    note: "",
  };
  base.note = "x".repeat(Math.max(0, bytes - JSON.stringify(base).length));
  return base;
}

// ---------------------------------------------------------------------------------------------
// The relay as a child process.

export interface RelayProcess {
  pid: number;
  /** Resolves with the time (performance.now()) of the first stderr log line whose message is `message`. */
  logged(message: string): Promise<number>;
  /** Lines at warn or error level, for the report. */
  problems: string[];
  /** Current VmRSS and peak VmHWM in MiB, from /proc/<pid>/status. */
  memory(): { rssMiB: number; peakMiB: number };
  /** SIGTERM, then waits for the exit (SIGKILL after 15 s). */
  stop(): Promise<number | null>;
}

/**
 * Starts `bun main.ts run --postgres-url URL ...` with JSON logs, the way an operator would run it.
 * Metrics stay on (as by default) but on 127.0.0.1 and a port the system picks.
 */
export function spawnRelay(url: string, extra: string[] = []): RelayProcess {
  const child = Bun.spawn(
    [process.execPath, ...(process.env.TIDE_BENCH_BUN_FLAGS?.split(" ").filter(Boolean) ?? []), "main.ts", "run", "--postgres-url", url, "--log-format", "json",
      "--metrics-addr", `127.0.0.1:${freePort()}`, ...extra],
    { cwd: ROOT, stdout: "ignore", stderr: "pipe" },
  );
  const seen = new Map<string, number>();
  const problems: string[] = [];
  let exited: string | undefined;
  void child.exited.then((code) => (exited = `the relay exited with code ${code}: ${problems.join("\n")}`));
  void (async () => {
    const decoder = new TextDecoder();
    let buffered = "";
    const reader = child.stderr.getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      const at = performance.now();
      buffered += decoder.decode(value, { stream: true });
      let newline;
      while ((newline = buffered.indexOf("\n")) >= 0) {
        const line = buffered.slice(0, newline);
        buffered = buffered.slice(newline + 1);
        let entry: { message?: string; level?: string };
        try {
          entry = JSON.parse(line);
        } catch {
          problems.push(line);
          continue;
        }
        if (entry.level === "warn" || entry.level === "error") problems.push(line);
        if (entry.message && !seen.has(entry.message)) seen.set(entry.message, at);
      }
    }
  })();
  return {
    pid: child.pid,
    problems,
    async logged(message) {
      const deadline = performance.now() + 30_000;
      while (!seen.has(message)) {
        if (exited) throw new Error(exited);
        if (performance.now() > deadline) throw new Error(`relay did not log "${message}" within 30 s: ${problems.join("\n")}`);
        await Bun.sleep(5);
      }
      return seen.get(message)!;
    },
    memory() {
      return processMemory(child.pid);
    },
    async stop() {
      child.kill("SIGTERM");
      const timer = setTimeout(() => child.kill("SIGKILL"), 15_000);
      const code = await child.exited;
      clearTimeout(timer);
      return code;
    },
  };
}

/** A TCP port on 127.0.0.1 that was free a moment ago. */
function freePort(): number {
  const server = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
  const port = server.port;
  server.stop(true);
  return port;
}

/** User + system CPU seconds a process has used so far (/proc/<pid>/stat, 100 ticks per second on Linux). */
export function processCpuSeconds(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

export function processMemory(pid: number): { rssMiB: number; peakMiB: number } {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  const kib = (field: string) => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(status)?.[1] ?? NaN);
  return { rssMiB: kib("VmRSS") / 1024, peakMiB: kib("VmHWM") / 1024 };
}

// ---------------------------------------------------------------------------------------------
// A local webhook endpoint.

export interface Receiver {
  url: string;
  /** Called with the request and its arrival time (ms on the performance.timeOrigin scale). */
  stop(): void;
}

export function startReceiver(onRequest: (request: Request, body: string, arrivedAtMs: number) => void): Receiver {
  const server = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(request) {
      const arrived = wallClockMs();
      const body = await request.text();
      onRequest(request, body, arrived);
      return new Response(null, { status: 204 });
    },
  });
  return { url: `http://127.0.0.1:${server.port}/hook`, stop: () => void server.stop(true) };
}

/** Wall-clock milliseconds with sub-millisecond resolution (comparable with PostgreSQL's clock_timestamp()). */
export function wallClockMs(): number {
  return performance.timeOrigin + performance.now();
}

// ---------------------------------------------------------------------------------------------
// Figures.

/** Nearest-rank percentile of an ascending array. */
export function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return NaN;
  const rank = Math.ceil((p / 100) * sorted.length);
  return sorted[Math.min(sorted.length - 1, Math.max(0, rank - 1))]!;
}

export function summarize(values: number[]) {
  const sorted = [...values].sort((a, b) => a - b);
  const mean = values.reduce((a, b) => a + b, 0) / values.length;
  return {
    count: values.length,
    mean,
    p50: percentile(sorted, 50),
    p90: percentile(sorted, 90),
    p99: percentile(sorted, 99),
    max: sorted[sorted.length - 1] ?? NaN,
  };
}

/** The run whose `key` is the median of the runs (the lower middle one for an even count). */
export function medianRun<T>(runs: T[], key: (run: T) => number): T {
  const sorted = [...runs].sort((a, b) => key(a) - key(b));
  return sorted[Math.floor((sorted.length - 1) / 2)]!;
}

export function fixed(value: number, digits = 1): string {
  return Number.isFinite(value) ? value.toFixed(digits) : "n/a";
}

/** A Markdown table, so that the output can be pasted into docs/benchmarks.md. */
export function markdownTable(header: string[], rows: (string | number)[][]): string {
  const line = (cells: (string | number)[]) => `| ${cells.join(" | ")} |`;
  return [line(header), line(header.map(() => "---")), ...rows.map(line)].join("\n");
}

/** Integer flag `--name N` from argv, else the fallback. */
export function intFlag(name: string, fallback: number): number {
  const at = process.argv.indexOf(`--${name}`);
  if (at < 0) return fallback;
  const value = Number(process.argv[at + 1]);
  if (!Number.isInteger(value) || value <= 0) throw new Error(`--${name} must be a positive integer`);
  return value;
}

/** `--only X` from argv, one of `choices` (refused otherwise), else undefined: run everything. */
export function onlyFlag<T extends string>(choices: readonly T[]): T | undefined {
  const at = process.argv.indexOf("--only");
  if (at < 0) return undefined;
  const value = process.argv[at + 1] as T;
  if (!choices.includes(value)) throw new Error(`--only must be one of ${choices.join(", ")} (got ${value ?? "nothing"})`);
  return value;
}

/** CPU, cores, RAM, PostgreSQL and Bun versions and the settings that shape commit latency. */
export async function describeMachine(): Promise<string> {
  const cpuinfo = readFileSync("/proc/cpuinfo", "utf8");
  const model = /^model name\s*:\s*(.*)$/m.exec(cpuinfo)?.[1] ?? "unknown";
  const admin = postgres(ADMIN_URL, { max: 1, onnotice: () => {} });
  try {
    const [{ version }] = await admin`SELECT version()`;
    const settings = await admin`
      SELECT name, setting, unit FROM pg_settings
       WHERE name IN ('fsync', 'synchronous_commit', 'shared_buffers', 'wal_level', 'max_wal_size')
       ORDER BY name`;
    const shown = settings.map((s) => `${s.name}=${s.setting}${s.unit ? ` ${s.unit}` : ""}`).join(", ");
    return [
      `CPU: ${model}, ${cpus().length} cores; RAM ${(totalmem() / 2 ** 30).toFixed(1)} GiB`,
      `PostgreSQL: ${version}`,
      `PostgreSQL settings: ${shown}`,
      `Bun: ${Bun.version}`,
    ].join("\n");
  } finally {
    await admin.end();
  }
}

// ---------------------------------------------------------------------------------------------
// Other load on the machine. Benchmarks here share their cores with whatever else runs (test suites,
// other servers): wait for a quiet moment before a run, and measure how much CPU others took during it.

/** Busy CPU seconds of the whole machine since boot (/proc/stat: all but idle and iowait). */
function machineBusySeconds(): number {
  const fields = readFileSync("/proc/stat", "utf8").split("\n")[0]!.trim().split(/\s+/).slice(1).map(Number);
  const total = fields.slice(0, 8).reduce((a, b) => a + b, 0);
  return (total - fields[3]! - fields[4]!) / 100;
}

/** Waits (up to maxMs) until the machine is below `cores` busy cores over a 1 s window. */
export async function waitForQuiet(cores = 0.25, maxMs = 120_000): Promise<boolean> {
  const deadline = Date.now() + maxMs;
  while (Date.now() < deadline) {
    const before = machineBusySeconds();
    await Bun.sleep(1000);
    if (machineBusySeconds() - before < cores) return true;
  }
  console.log(`  note: the machine was still busy (> ${cores} cores) after ${maxMs / 1000} s; running anyway`);
  return false;
}

const SHARED_SERVER_PROCESS = /(checkpointer|background writer|walwriter|autovacuum launcher|logical replication launcher|archiver)\s*$/;

/**
 * CPU seconds so far of each process of the benchmarked PostgreSQL (children of its postmaster): the
 * backends of `database` (their title names it) and the shared background processes; with no
 * database, every child. Other databases' backends (a test suite, say) are left to "others".
 */
function serverProcessSeconds(postmasterPid: number, database?: string): Map<number, number> {
  const seconds = new Map<number, number>();
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, "utf8");
      const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      if (Number(f[1]) !== postmasterPid) continue;
      if (database) {
        const title = readFileSync(`/proc/${entry}/cmdline`, "utf8").replaceAll("\0", " ").trim();
        if (!title.includes(` ${database} `) && !title.endsWith(` ${database}`) && !SHARED_SERVER_PROCESS.test(title)) continue;
      }
      seconds.set(Number(entry), (Number(f[11]) + Number(f[12])) / 100);
    } catch {
      // the process ended meanwhile
    }
  }
  return seconds;
}

export interface CpuAccount {
  /** CPU seconds since start: PostgreSQL (see startCpuAccount), this process, the watched children, everything else. */
  read(): { postgres: number; bench: number; children: number; others: number; wallSeconds: number };
  /** Counts CPU of a child that already exited (e.g. from Bun's subprocess resourceUsage()) as ours. */
  addExitedChild(seconds: number): void;
}

/**
 * Starts accounting CPU time. `children()` lists pids to count as ours (the relay); read them before
 * they exit. PostgreSQL's share: with `options.database`, that database's backends plus the server's
 * shared background processes; without, all of the server's processes. A backend that ends during
 * the account counts up to its last reading (every 50 ms). `others` is machine-wide busy time minus
 * all of the above: CPU taken by unrelated processes.
 */
export async function startCpuAccount(
  children: () => number[] = () => [],
  options: { database?: string } = {},
): Promise<CpuAccount> {
  const admin = postgres(ADMIN_URL, { max: 1, onnotice: () => {} });
  let postmasterPid = 0;
  try {
    const [{ setting }] = await admin`SELECT setting FROM pg_settings WHERE name = 'data_directory'`;
    postmasterPid = Number(readFileSync(`${setting}/postmaster.pid`, "utf8").split("\n")[0]);
  } catch {
    // not a local server we can read: PostgreSQL's share is then counted under "others"
  } finally {
    await admin.end();
  }
  // Backends come and go (pgbench, connection pools): remember each one's last reading, refreshed
  // every 50 ms, so that one that ended before read() still counts up to its last 50 ms.
  const scan = () => (postmasterPid ? serverProcessSeconds(postmasterPid, options.database) : new Map<number, number>());
  const startServer = scan();
  const lastSeen = new Map(startServer);
  let scans = 0;
  const refresh = () => {
    const current = scans++ % 5 === 0 ? scan() : rereadKnown(lastSeen);
    for (const [pid, seconds] of current) lastSeen.set(pid, seconds);
  };
  const sampler = setInterval(refresh, 50);
  sampler.unref();
  const benchSeconds = () => {
    const usage = process.cpuUsage();
    return (usage.user + usage.system) / 1e6;
  };
  const childSeconds = () => children().reduce((sum, pid) => sum + safeCpu(pid), 0);
  const start = { machine: machineBusySeconds(), bench: benchSeconds(), wall: performance.now() };
  const startChildren = childSeconds();
  let exitedChildren = 0;
  return {
    addExitedChild(seconds) {
      exitedChildren += seconds;
    },
    read() {
      const machine = machineBusySeconds() - start.machine;
      for (const [pid, seconds] of scan()) lastSeen.set(pid, seconds);
      let pg = 0;
      for (const [pid, seconds] of lastSeen) pg += seconds - (startServer.get(pid) ?? 0);
      const bench = benchSeconds() - start.bench;
      const kids = childSeconds() - startChildren + exitedChildren;
      return { postgres: pg, bench, children: kids, others: Math.max(0, machine - pg - bench - kids), wallSeconds: (performance.now() - start.wall) / 1000 };
    },
  };
}

/** The same processes' CPU seconds again (cheaper than scanning /proc); ended ones are left out. */
function rereadKnown(known: Map<number, number>): Map<number, number> {
  const seconds = new Map<number, number>();
  for (const pid of known.keys()) {
    const value = safeCpu(pid);
    if (value > 0) seconds.set(pid, value);
  }
  return seconds;
}

/**
 * Runs `measure` again, up to `attempts` times in all, while other processes took more than `limit`
 * cores during it (the machine is shared); returns the last run, disturbed or not.
 */
export async function undisturbed<T extends { otherCores: number }>(
  measure: () => Promise<T>, limit = 0.15, attempts = 4,
): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    const run = await measure();
    if (run.otherCores <= limit || attempt >= attempts) return run;
    console.log(`  other processes took ${run.otherCores.toFixed(2)} cores during this run; repeating it`);
  }
}

function safeCpu(pid: number): number {
  try {
    return processCpuSeconds(pid);
  } catch {
    return 0;
  }
}
