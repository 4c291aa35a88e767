// Table capture from the write-ahead log: one reader per replication slot that tide.capture_table
// (p_mode 'wal') created. A reader streams the slot with pgoutput (pg-logical-replication, over its
// own replication connection), writes each source transaction's changes into the outbox in ONE
// transaction of its own (tide.wal_capture_write, a chunk of rows at a time, so memory stays bounded
// however large the source transaction), and only after that commit confirms the slot's position.
// Source transactions already received behind the one at hand join its outbox transaction (up to
// MAX_BATCHED_TRANSACTIONS), and so do those still on their way while the reader is behind (the
// source committed over BEHIND_MS ago): many small writes cost one write call and one commit, not one
// each, and a reader that fell behind catches up instead of staying behind by as much.
// A crash before the commit loses nothing (the slot hands the transactions out again); a crash after
// the commit and before the confirmation writes their messages a second time.
//
// Only one relay reads a slot: PostgreSQL lets one replication session at a time stream a slot, so
// the slot is its own lock. Other relays' attempts are refused ("active for PID") and retried at the
// next reconcile, so a slot is taken over within a reconcile interval of its reader's death.
//
// A slot over its limit (tide.wal_capture_set_limit) is warned about, then, as the capture is
// configured, paused (no relay reads it until tide.wal_capture_resume; the server keeps its WAL) or
// dropped (its WAL is freed; changes from then on are lost to the capture). The decision is
// tide.wal_capture_apply_limit's, which checks the lag again; every relay's reconcile asks it, so a
// slot is handled while any relay runs, whichever relay reads it (or none does).
//
// Values are carried as the text pgoutput sends; tide.wal_capture_write turns them into the column
// types and then JSON in SQL, so no value ever passes through a JS number.

import client from "prom-client";
import { LogicalReplicationService, PgoutputPlugin } from "pg-logical-replication";
import { connect, type ReservedSql, type Sql } from "../db.ts";
import { toError } from "../errors.ts";
import { failpoint } from "../engine/failpoints.ts";
import type { Logger } from "../log.ts";

export interface WalCaptureOptions {
  sql: Sql;
  postgresUrl: string;
  logger: Logger;
  /** Registry the slot metrics go to (the relay's). */
  registry?: client.Registry;
  /** How often the catalog is read for slots to start or stop reading, and slot health checked. */
  reconcileIntervalMs?: number;
  /** Rows handed to tide.wal_capture_write per call; a source transaction is written in such chunks. */
  chunkSize?: number;
  /** How often an idle reader asks the server where the WAL is, to confirm that position (heartbeat). */
  heartbeatIntervalMs?: number;
}

export const DEFAULT_WAL_CHUNK_SIZE = 1_000;
export const DEFAULT_WAL_HEARTBEAT_MS = 5_000;
const CONFIRMED_AT_INTERVAL_MS = 5_000;
const LAG_WARNING_INTERVAL_MS = 60_000;
/** Source transactions at most in one outbox transaction (each source transaction is whole in one). */
const MAX_BATCHED_TRANSACTIONS = 500;
/**
 * A source transaction that committed longer ago than this says the reader is behind: the server has
 * more to send, so the outbox transaction waits for it (CATCH_UP_WAIT_MS at most) instead of
 * committing a few source transactions at a time and staying behind. (Compares the server's commit
 * time with this host's clock: a clock ahead only adds CATCH_UP_WAIT_MS to a commit, one behind only
 * forgoes the joining.)
 */
const BEHIND_MS = 20;
const CATCH_UP_WAIT_MS = 5;
/** An outbox transaction open this long commits at its next source transaction's end, behind or not. */
const MAX_JOIN_MS = 50;

/** A row of tide.wal_capture_status, as the reconcile reads it. */
interface SlotHealth {
  slot_name: string;
  slot_exists: boolean;
  lag_bytes: bigint | null;
  confirmed_age_s: number;
  over_limit: boolean;
  lag_warn_bytes: bigint;
  on_lag_limit: "warn" | "pause" | "drop";
  /** streaming, not read, over limit, paused, dropped, missing or lost (sql/014_wal_slot_limit.sql). */
  state: string;
  active: boolean;
}

/** The states of tide.wal_capture_status in which no relay reads the slot. */
const NOT_READ_STATES = new Set(["paused", "dropped", "missing"]);

/** Starts and stops the readers of the WAL captures in the catalog. */
export class WalCaptures {
  readonly #options: WalCaptureOptions;
  readonly #readers = new Map<string, WalReader>();
  readonly #lastWarning = new Map<string, number>();
  #health: SlotHealth[] = [];
  #timer: ReturnType<typeof setInterval> | undefined;
  #ticking = false;
  #stopped = false;

  constructor(options: WalCaptureOptions) {
    this.#options = options;
    const registers = options.registry ? [options.registry] : [];
    const captures = this;
    new client.Gauge({
      name: "pg_tide_relay_wal_slot_lag_bytes",
      help: "WAL written since the position last confirmed on a WAL capture's replication slot",
      labelNames: ["slot"],
      registers,
      collect() {
        this.reset();
        for (const h of captures.#health) if (h.lag_bytes !== null) this.set({ slot: h.slot_name }, Number(h.lag_bytes));
      },
    });
    new client.Gauge({
      name: "pg_tide_relay_wal_slot_confirmed_age_seconds",
      help: "Seconds since a relay last confirmed a position of a WAL capture's replication slot",
      labelNames: ["slot"],
      registers,
      collect() {
        this.reset();
        for (const h of captures.#health) this.set({ slot: h.slot_name }, h.confirmed_age_s);
      },
    });
    new client.Gauge({
      name: "pg_tide_relay_wal_capture_state",
      help: "1 for a WAL capture's state: streaming, not read, over limit, paused, dropped, missing or lost",
      labelNames: ["slot", "state"],
      registers,
      collect() {
        this.reset();
        for (const h of captures.#health) this.set({ slot: h.slot_name, state: h.state }, 1);
      },
    });
  }

  start(): void {
    this.#timer = setInterval(() => void this.#tick(), this.#options.reconcileIntervalMs ?? 2_000);
    void this.#tick();
  }

  /** The slots this relay reads now. */
  reading(): string[] {
    return [...this.#readers.entries()].filter(([, r]) => r.streaming).map(([slot]) => slot);
  }

  async stop(): Promise<void> {
    this.#stopped = true;
    clearInterval(this.#timer);
    await Promise.all([...this.#readers.values()].map((r) => r.stop()));
    this.#readers.clear();
  }

  async #tick(): Promise<void> {
    if (this.#ticking || this.#stopped) return;
    this.#ticking = true;
    try {
      const rows = await this.#options.sql<SlotHealth[]>`
        SELECT slot_name, slot_exists, lag_bytes, extract(epoch FROM confirmed_age)::float8 AS confirmed_age_s, over_limit,
               lag_warn_bytes, on_lag_limit, state, active
          FROM tide.wal_capture_status`;
      for (const h of rows) if (h.state === "over limit") await this.#overLimit(h);
      this.#health = rows;
      const wanted = new Set(rows.filter((r) => r.slot_exists && !NOT_READ_STATES.has(r.state)).map((r) => r.slot_name));
      for (const [slot, reader] of this.#readers) {
        if (!wanted.has(slot) || reader.ended) {
          this.#readers.delete(slot);
          await reader.stop();
        }
      }
      for (const slot of wanted) {
        if (this.#stopped || this.#readers.has(slot)) continue;
        const reader = new WalReader(slot, this.#options);
        this.#readers.set(slot, reader);
        reader.run();
      }
    } catch (error) {
      this.#options.logger.warn("WAL capture reconcile failed", { error: toError(error) });
    } finally {
      this.#ticking = false;
    }
  }

  /** Warns (once a minute) about a slot over its limit, then applies its action (pause, drop). */
  async #overLimit(h: SlotHealth): Promise<void> {
    const { logger, sql } = this.#options;
    const fields = { slot: h.slot_name, lag_bytes: String(h.lag_bytes), limit_bytes: String(h.lag_warn_bytes), active: h.active };
    const last = this.#lastWarning.get(h.slot_name) ?? 0;
    if (Date.now() - last >= LAG_WARNING_INTERVAL_MS) {
      this.#lastWarning.set(h.slot_name, Date.now());
      logger.warn("WAL capture slot is behind: the server keeps its WAL until the relay catches up", { ...fields, on_lag_limit: h.on_lag_limit });
    }
    if (h.on_lag_limit === "warn") return;
    const [{ done }] = await sql<{ done: string | null }[]>`SELECT tide.wal_capture_apply_limit(${h.slot_name}) AS done`;
    if (done === "pause") {
      h.state = "paused";
      logger.error("WAL capture paused: its slot passed its limit. No relay reads it until tide.wal_capture_resume; the server keeps its WAL meanwhile", fields);
    } else if (done === "drop") {
      h.state = "dropped";
      h.slot_exists = false;
      logger.error("WAL capture slot dropped: it passed its limit. Changes to the table are not captured until it is captured again (uncapture_table, capture_table, capture_backfill)", fields);
    }
  }
}

type Column = { name: string; typeOid: number; typeMod: number };
type Row = { op: string; new?: (string | null)[]; old?: (string | null)[] | null; missing?: string[] };

/** Streams one slot into the outbox until stopped or its connection fails. */
class WalReader {
  readonly #slot: string;
  readonly #options: WalCaptureOptions;
  readonly #service: LogicalReplicationService;
  readonly #plugin: PgoutputPlugin;
  #columns: Column[] = [];
  /**
   * The outbox transaction being built: rows not yet written, the connection it runs on, and how
   * many source transactions it holds whole.
   */
  #tx: { rows: Row[]; columns: Column[]; conn?: ReservedSql; sources: number; openedAt: number } | undefined;
  #confirmed = "0/0";
  #confirmedAtWritten = 0;
  /** Commits the outbox transaction when the next source transaction does not come soon (#commit). */
  #closeTimer: ReturnType<typeof setTimeout> | undefined;
  /** That commit, while it runs: the next message waits for it. */
  #closing: Promise<void> | undefined;
  #failed = false;
  #heartbeat: ReturnType<typeof setInterval> | undefined;
  /**
   * The outbox transactions' own connection, outside the relay's pool: a connection the server drops
   * in the middle of one stays broken in postgres.js (its queries fail, it never reconnects), so it
   * must not go back to a shared pool. The reader ends this one with itself; the next reader opens
   * a new one.
   */
  readonly #writer: Sql;
  streaming = false;
  ended = false;

  constructor(slot: string, options: WalCaptureOptions) {
    this.#slot = slot;
    this.#options = options;
    this.#writer = connect(options.postgresUrl, { max: 1, keepAlive: true, applicationName: `pg-tide wal writer ${slot}` });
    this.#service = new LogicalReplicationService(
      { connectionString: options.postgresUrl, application_name: `pg-tide wal ${slot}` } as never,
      // Never confirm on the library's own: a position is confirmed only after its outbox commit.
      { acknowledge: { auto: false, timeoutSeconds: 0 }, flowControl: { enabled: true } },
    );
    this.#plugin = new PgoutputPlugin({ protoVersion: 1, publicationNames: [slot] });
    // Keep every value as the text PostgreSQL sent (no pg type parsers: they would turn numerics
    // and big integers into JS numbers).
    const parser = (this.#plugin as unknown as { parser: { readRelationColumn: (r: unknown) => object } }).parser;
    const readColumn = parser.readRelationColumn.bind(parser);
    parser.readRelationColumn = (reader: unknown) => ({ ...readColumn(reader), parser: (text: string) => text });
  }

  run(): void {
    const { logger } = this.#options;
    this.#service.on("data", (lsn: string, message: any) => this.#onMessage(lsn, message));
    this.#service.on("heartbeat", (lsn: string, _ts: number, respond: boolean) => this.#onKeepalive(lsn, respond));
    this.#service.on("error", (error: unknown) => void this.#fail(error));
    this.#service.on("start", () => {
      this.streaming = true;
      logger.info("reading WAL capture slot", { slot: this.#slot });
    });
    this.#heartbeat = setInterval(() => {
      // Ask the server for a keepalive: when nothing is pending, its position is confirmed.
      if (this.streaming && !this.#failed) void this.#service.acknowledge(this.#confirmed, true);
    }, this.#options.heartbeatIntervalMs ?? DEFAULT_WAL_HEARTBEAT_MS);
    this.#service
      .subscribe(this.#plugin, this.#slot)
      .then(() => this.#end())
      .catch((error) => this.#fail(error));
  }

  async #onMessage(_lsn: string, message: any): Promise<void> {
    if (this.#failed) return;
    clearTimeout(this.#closeTimer); // a source transaction came: it joins the open outbox transaction
    this.#closeTimer = undefined;
    if (this.#closing) await this.#closing;
    if (this.#failed) return;
    try {
      switch (message.tag) {
        case "begin":
          this.#tx ??= { rows: [], columns: this.#columns, sources: 0, openedAt: Date.now() };
          return;
        case "relation":
          if (this.#tx?.rows.length) await this.#flush();
          this.#columns = message.columns.map((c: Column) => ({ name: c.name, typeOid: c.typeOid, typeMod: c.typeMod }));
          if (this.#tx) this.#tx.columns = this.#columns;
          return;
        case "insert":
          await this.#push({ op: "insert", ...this.#tuple(message.new) });
          return;
        case "update": {
          const old = message.old ? this.#tuple(message.old).new : null;
          await this.#push({ op: "update", ...this.#tuple(message.new), old });
          return;
        }
        case "delete":
          await this.#push({ op: "delete", old: this.#tuple(message.old ?? message.key).new });
          return;
        case "truncate":
          await this.#push({ op: "truncate" });
          return;
        case "commit":
          await this.#commit(message.commitEndLsn as string, message.commitTime as bigint | undefined);
          return;
      }
    } catch (error) {
      await this.#fail(error);
    }
  }

  /** A tuple as an array of column text in relation order; unsent (unchanged TOASTed) columns listed. */
  #tuple(tuple: Record<string, string | null | undefined>): { new: (string | null)[]; missing: string[] } {
    const values: (string | null)[] = [];
    const missing: string[] = [];
    for (const column of this.#columns) {
      const value = tuple[column.name];
      if (value === undefined) missing.push(column.name);
      values.push(value ?? null);
    }
    return { new: values, missing };
  }

  async #push(row: Row): Promise<void> {
    if (!this.#tx) throw new Error(`WAL capture ${this.#slot}: a change outside a transaction`);
    this.#tx.rows.push(row);
    // Flow control awaits this handler before the next message: rows never pile up beyond a chunk.
    if (this.#tx.rows.length >= (this.#options.chunkSize ?? DEFAULT_WAL_CHUNK_SIZE)) await this.#flush();
  }

  async #flush(): Promise<void> {
    const tx = this.#tx!;
    if (tx.rows.length === 0) return;
    const rows = tx.rows;
    tx.rows = [];
    if (!tx.conn) {
      tx.conn = await this.#writer.reserve();
      // Durable before the slot's position moves past it, whatever the server's default.
      await tx.conn.unsafe("BEGIN; SET LOCAL synchronous_commit = on");
    }
    const columns = tx.columns.map((c) => [c.name, c.typeOid, c.typeMod]);
    await tx.conn.unsafe("SELECT tide.wal_capture_write($1, $2::text::jsonb, $3::text::jsonb)", [
      this.#slot,
      JSON.stringify(columns),
      JSON.stringify(rows),
    ]);
  }

  async #commit(commitEndLsn: string, commitTime: bigint | undefined): Promise<void> {
    const tx = this.#tx;
    if (!tx) return;
    tx.sources++;
    if (tx.sources < MAX_BATCHED_TRANSACTIONS && Date.now() - tx.openedAt < MAX_JOIN_MS) {
      // More received and waiting (the stream is paused while we work): it joins this outbox transaction.
      if (this.#queued() > 0) return;
      // Nothing received yet, but this one committed a while ago: more is on its way; wait for it a little.
      if (commitTime !== undefined && Date.now() - Number(commitTime / 1000n) > BEHIND_MS) {
        this.#closeTimer = setTimeout(() => {
          this.#closeTimer = undefined;
          // Not awaiting the failure's end: it stops the stream, whose next message may be waiting for this.
          this.#closing = this.#close(commitEndLsn)
            .catch((error) => void this.#fail(error))
            .finally(() => (this.#closing = undefined));
        }, CATCH_UP_WAIT_MS);
        return;
      }
    }
    await this.#close(commitEndLsn);
  }

  /** Writes what is left, commits the outbox transaction, then confirms the slot up to `commitEndLsn`. */
  async #close(commitEndLsn: string): Promise<void> {
    const tx = this.#tx;
    if (!tx) return;
    await this.#flush();
    this.#tx = undefined;
    if (tx.conn) {
      try {
        await failpoint("wal.before-outbox-commit");
        await tx.conn.unsafe("COMMIT");
      } finally {
        tx.conn.release();
      }
      await failpoint("wal.after-outbox-commit");
    }
    if (this.#failed) return;
    await this.#confirm(commitEndLsn);
  }

  async #confirm(lsn: string): Promise<void> {
    if (!(await this.#service.acknowledge(lsn))) return;
    this.#confirmed = lsn;
    if (Date.now() - this.#confirmedAtWritten > CONFIRMED_AT_INTERVAL_MS) {
      this.#confirmedAtWritten = Date.now();
      await this.#options.sql`SELECT tide.wal_capture_confirmed(${this.#slot})`.catch(() => {});
    }
  }

  /** Messages the library has received and not handed to #onMessage yet. */
  #queued(): number {
    return (this.#service as unknown as { _messageQueue: unknown[] })._messageQueue.length;
  }

  /** A keepalive carries the position the server has sent up to: with nothing pending, confirm it. */
  #onKeepalive(lsn: string, respond: boolean): void {
    if (this.#failed) return;
    const service = this.#service as unknown as { _processing: boolean };
    // Not while an outbox transaction is open or committing: its source transactions are not durable yet.
    const idle = this.#tx === undefined && this.#closing === undefined && this.#queued() === 0 && !service._processing;
    if (idle && lsnValue(lsn) > lsnValue(this.#confirmed)) void this.#confirm(lsn);
    else if (respond) void this.#service.acknowledge(this.#confirmed);
  }

  async #fail(error: unknown): Promise<void> {
    if (this.#failed) return;
    this.#failed = true;
    const message = toError(error).message;
    // Another relay reads this slot: normal for all but one relay.
    const busy = /is active for PID/i.test(message);
    if (!/Connection\s+terminated/i.test(message)) {
      this.#options.logger[busy ? "debug" : "warn"](busy ? "WAL capture slot is read by another relay" : "WAL capture reader failed", {
        slot: this.#slot,
        error: toError(error),
      });
    }
    await this.#end();
  }

  async #end(): Promise<void> {
    this.#failed = true;
    this.streaming = false;
    clearInterval(this.#heartbeat);
    clearTimeout(this.#closeTimer);
    const tx = this.#tx;
    this.#tx = undefined;
    if (tx?.conn) {
      await tx.conn.unsafe("ROLLBACK").catch(() => {});
      tx.conn.release();
    }
    await this.#writer.end({ timeout: 0 }).catch(() => {});
    await this.#service.stop().catch(() => {});
    this.ended = true;
  }

  async stop(): Promise<void> {
    await this.#end();
  }
}

function lsnValue(lsn: string): bigint {
  const [high, low] = lsn.split("/");
  return (BigInt(`0x${high}`) << 32n) + BigInt(`0x${low}`);
}
