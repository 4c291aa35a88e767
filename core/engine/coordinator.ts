// Decides which pipelines this relay runs. Ownership is a session advisory lock keyed by
// (relay_group_id, pipeline) held on a connection of its own, outside the pool: if the relay dies,
// PostgreSQL drops the session and its locks, and another relay's next reconcile takes the pipelines
// over. Reconciles on NOTIFY tide_relay_config, on SIGHUP (via reconcile()) and every few seconds.
//
// Ownership is checked, not assumed: every tick (and whenever a worker's acknowledgement is refused
// as stale) the lock session is verified (core/engine/ownership.ts). On any doubt every worker is fenced at
// once (aborted, nothing acknowledged after), the session is closed, and ownership is taken again
// from scratch. While the session is good the tick refreshes the pipelines' heartbeat; an owner
// whose heartbeat is older than the lease (frozen) has its lock session ended by another relay
// (core/engine/heartbeat.ts). The fair share (how many units this relay may own) is decided here.

import type { Sql } from "../db.ts";
import { toError } from "../errors.ts";
import { ForwardWorker } from "./forward.ts";
import type { PipelineRow } from "../pipeline.ts";
import type { WorkerStatus } from "./worker_status.ts";
import { ReverseWorker } from "./reverse.ts";
import type { Logger } from "../log.ts";
import type { RelayEvents } from "./events.ts";
import type { HttpRoutes } from "../plugin.ts";
import type { PluginRegistry } from "../plugins.ts";
import { TIMED_OUT, within } from "./backoff.ts";
import { failpoint } from "./failpoints.ts";
import { IdleProbe } from "./idle_probe.ts";
import { redactText } from "../redact.ts";
import { laneCount, ownershipUnit } from "./lanes.ts";
import { LOCK_CHECK_TIMEOUT_MS, LockSession, ownershipApplicationName } from "./ownership.ts";
import { fenceFrozenOwners, writeHeartbeat } from "./heartbeat.ts";

export interface CoordinatorOptions {
  sql: Sql;
  postgresUrl?: string;
  http?: HttpRoutes;
  registry: PluginRegistry;
  logger: Logger;
  relayGroupId: string;
  /** This relay's name in status output; unique per process. */
  relayId: string;
  maxPipelines: number;
  reconcileIntervalMs: number;
  pollIntervalMs: number;
  drainTimeoutMs: number;
  /** An owner whose heartbeat is older than this loses its pipelines to another relay. */
  ownershipLeaseMs: number;
  events?: RelayEvents;
}

/** What the coordinator needs of a forward or reverse pipeline worker. */
export interface PipelineWorker {
  readonly name: string;
  /** Forward pipelines with lanes: the lane this worker delivers (0 otherwise). */
  readonly lane?: number;
  readonly outbox: string | null;
  readonly updatedAt: number;
  readonly status: WorkerStatus;
  start(): Promise<void>;
  stop(drainMs?: number): Promise<void>;
  /** Ownership is in doubt: stop delivering at once and never acknowledge again. */
  fence(): void;
  wake(): void;
  requeue(): void;
}

/** How often the lock session is verified (and the heartbeat written): a third of the lease, at most this. */
export const OWNERSHIP_TICK_MS = 1_000;
export const DEFAULT_OWNERSHIP_LEASE_MS = 6_000;
/** How soon a reconcile that failed without a lock session is tried again. */
const RECONNECT_RETRY_MS = 500;

export interface OwnedPipeline {
  name: string;
  /** The lane of the pipeline this relay owns (0 for a pipeline without lanes), of `lanes`. */
  lane: number;
  lanes: number;
  status: WorkerStatus;
}

/**
 * A unit of ownership: a pipeline, or one lane of a pipeline with `lanes` > 1. Its key names its
 * advisory lock (hashtext(key)): the pipeline's name, or `<pipeline>#<lane>`.
 */
interface Unit {
  key: string;
  row: PipelineRow;
  lane: number;
  lanes: number;
}

export class Coordinator {
  readonly #options: CoordinatorOptions;
  readonly #log: Logger;
  /** Tells waiting forward pipelines when they have something to read (one query for all of them). */
  readonly #probe: IdleProbe;
  readonly #workers = new Map<string, PipelineWorker>();
  /** The lane count of each owned unit with lanes (by unit key). */
  readonly #lanesOf = new Map<string, number>();
  /** Pipelines whose worker failed to start, with the config version that failed. */
  readonly #broken = new Map<string, number>();
  /** The lock session whose advisory locks are the units this relay owns. */
  readonly #lock: LockSession;
  #timer: ReturnType<typeof setInterval> | undefined;
  #tickTimer: ReturnType<typeof setInterval> | undefined;
  #heartbeatAt = 0;
  /** Pipelines being released: their worker drains its batch and may still acknowledge it. */
  readonly #draining = new Set<string>();
  #unlisten: (() => Promise<void>)[] = [];
  #reconciling: Promise<void> | undefined;
  #again = false;
  #stopped = false;
  running = false;

  constructor(options: CoordinatorOptions) {
    this.#options = options;
    this.#log = options.logger.child({ relay: options.relayId });
    this.#probe = new IdleProbe(options.sql, options.relayGroupId, this.#log);
    this.#lock = new LockSession({
      postgresUrl: options.postgresUrl,
      relayGroupId: options.relayGroupId,
      owned: () => [...this.#workers.keys()],
      lost: (problem) => this.#lose(problem),
    });
  }

  owned(): OwnedPipeline[] {
    return [...this.#workers.entries()].map(([key, w]) => ({
      name: w.name,
      lane: w.lane ?? 0,
      lanes: this.#lanesOf.get(key) ?? 1,
      status: w.status,
    }));
  }

  /** True from the moment start() begins: a reconcile requested after that sees every change. */
  started = false;

  async start(): Promise<void> {
    this.started = true;
    const { sql } = this.#options;
    const config = await sql.listen("tide_relay_config", (pipeline) => this.#onConfigNotice(pipeline), () => this.reconcile());
    const outbox = await sql.listen("tide_outbox_notify", (name) => this.#wakeOutbox(name));
    this.#unlisten = [config.unlisten, outbox.unlisten];
    await this.reconcile();
    this.#timer = setInterval(() => void this.reconcile(), this.#options.reconcileIntervalMs);
    const tick = Math.min(OWNERSHIP_TICK_MS, Math.floor(this.#options.ownershipLeaseMs / 3));
    this.#tickTimer = setInterval(() => void this.#tick(), tick);
    this.running = true;
  }

  /**
   * Whether this relay still holds its lock session (the reverse worker asks before it acknowledges
   * to its source). False also fences every worker.
   */
  async stillOwns(name: string): Promise<boolean> {
    return (this.#workers.has(name) || this.#draining.has(name)) && (await this.#lock.verify());
  }

  /**
   * A worker has reason to doubt ownership (its acknowledgement was refused: the position moved under
   * it; or the database failed it): check the lock session now rather than at the next tick.
   */
  doubtOwnership(): void {
    void this.#lock.verify();
  }

  /** Runs one reconcile; calls arriving meanwhile fold into one more run after it. */
  reconcile(): Promise<void> {
    if (this.#reconciling) {
      this.#again = true;
      return this.#reconciling;
    }
    this.#reconciling = (async () => {
      do {
        this.#again = false;
        try {
          await this.#reconcileOnce();
        } catch (error) {
          this.#log.error("reconcile failed; retrying on the next tick", { error: toError(error) });
          // Without a lock session (the server is away) try again soon: delivery resumes within
          // about a second of the server's return, not a whole reconcile interval later.
          if (!this.#lock.sql && !this.#stopped) setTimeout(() => void this.reconcile(), RECONNECT_RETRY_MS).unref?.();
        }
      } while (this.#again && !this.#stopped);
    })().finally(() => (this.#reconciling = undefined));
    return this.#reconciling;
  }

  /** Drains every worker, releases the locks and stops listening. */
  async stop(): Promise<void> {
    this.#stopped = true;
    this.running = false;
    clearInterval(this.#timer);
    clearInterval(this.#tickTimer);
    // A reconcile waiting on a server that went away must not hold the stop up.
    await within(this.#reconciling ?? Promise.resolve(), LOCK_CHECK_TIMEOUT_MS);
    await Promise.all([...this.#workers.keys()].map((name) => this.#release(name, { unlock: false })));
    this.#probe.stop();
    await within(Promise.all(this.#unlisten.map((unlisten) => unlisten().catch(() => {}))), 1_000);
    // Closing the session releases every lock at once; a dead server cannot hold the stop up.
    const owned = this.#lock.sql !== undefined;
    await this.#lock.close();
    // The other relays of the group take the units over now rather than at their next reconcile.
    if (owned) await within(this.#options.sql`SELECT pg_notify('tide_relay_config', '')`.catch(() => {}), 1_000);
  }

  async #reconcileOnce(): Promise<void> {
    if (this.#stopped) return;
    const { sql, relayGroupId } = this.#options;
    const locks = await this.#lock.open();
    const rows = await sql<PipelineRow[]>`
      SELECT * FROM tide.relay_pipelines WHERE enabled ORDER BY name`;
    const units = rows.flatMap(unitsOf);
    const wanted = new Map(units.map((unit) => [unit.key, unit]));
    // Not limited to the fair share: the frozen relay's session counts as a live relay until it ends.
    if (this.#workers.size < this.#options.maxPipelines) {
      await fenceFrozenOwners(sql, this.#options, this.#options.ownershipLeaseMs, wanted, this.#workers, this.#log);
    }

    for (const [key, worker] of this.#workers) {
      const unit = wanted.get(key);
      if (!unit || new Date(unit.row.updated_at).getTime() !== worker.updatedAt) {
        this.#log.info(unit ? "pipeline config changed; restarting it" : "pipeline disabled or deleted; stopping it",
          { pipeline: worker.name, lane: worker.lane ?? 0 });
        await this.#release(key);
      }
    }
    // A fair share: at most ceil(units / live relays of this relay group). A relay over it (another
    // one started) hands one unit over per reconcile, so ownership converges without flapping.
    const cap = Math.min(this.#options.maxPipelines, await this.#fairShare(locks, units.length));
    if (this.#workers.size > cap && !this.#stopped) {
      const key = [...this.#workers.keys()].pop()!;
      const worker = this.#workers.get(key)!;
      this.#log.info("owning more than a fair share; handing one over to another relay",
        { pipeline: worker.name, lane: worker.lane ?? 0, owned: this.#workers.size, share: cap });
      await this.#release(key);
      await sql`SELECT pg_notify('tide_relay_config', '')`; // the others reconcile now, not at their next tick
      return;
    }
    for (const unit of units) {
      if (this.#stopped || this.#workers.has(unit.key)) continue;
      if (this.#workers.size >= cap) break;
      if (this.#broken.get(unit.key) === new Date(unit.row.updated_at).getTime()) continue;
      const [{ locked }] = await locks<{ locked: boolean }[]>`
        SELECT pg_try_advisory_lock(hashtext(${relayGroupId}), hashtext(${unit.key})) AS locked`;
      if (!locked) continue;
      await failpoint("coordinator.holding-locks");
      await this.#startWorker(unit, locks);
    }
  }

  /**
   * How many units this relay may own: ceil(units / relays), the relays being the ownership sessions
   * of this relay group on this database (application_name `pg-tide ownership <group>`), this one
   * included.
   */
  async #fairShare(locks: Sql, units: number): Promise<number> {
    const [{ relays }] = await locks<{ relays: number }[]>`
      SELECT count(*)::int AS relays FROM pg_stat_activity
       WHERE datname = current_database() AND application_name = left(${ownershipApplicationName(this.#options.relayGroupId)}, 63)`;
    return Math.max(1, Math.ceil(units / Math.max(1, relays)));
  }

  async #startWorker(unit: Unit, locks: Sql): Promise<void> {
    const { row, key, lane } = unit;
    const hooks = { doubtOwnership: () => this.doubtOwnership(), stillOwner: () => this.stillOwns(key), probe: this.#probe };
    const worker: PipelineWorker = row.direction === "forward"
      ? new ForwardWorker(row, { ...this.#options, ...hooks, lane })
      : new ReverseWorker(row, { ...this.#options, ...hooks });
    try {
      await worker.start();
    } catch (error) {
      // A pipeline with a bad config never stops the others; it is retried once its config changes.
      const err = toError(error);
      this.#broken.set(key, new Date(row.updated_at).getTime());
      this.#log.error("pipeline cannot start", { pipeline: row.name, lane, error: err });
      await this.#options.sql`SELECT tide.relay_state_start_failed(${row.name}, ${this.#options.relayGroupId}, ${lane}, ${redactText(err.message)})`;
      await locks`SELECT pg_advisory_unlock(hashtext(${this.#options.relayGroupId}), hashtext(${key}))`;
      return;
    }
    if (this.#lock.sql !== locks) {
      // The session that took the lock was lost while the worker started: it owns nothing.
      worker.fence();
      await worker.stop(0);
      return;
    }
    this.#broken.delete(key);
    this.#workers.set(key, worker);
    if (unit.lanes > 1) this.#lanesOf.set(key, unit.lanes);
    this.#log.info("pipeline started", {
      pipeline: row.name,
      ...(unit.lanes > 1 ? { lane, lanes: unit.lanes } : {}),
      direction: row.direction,
      [row.direction === "forward" ? "sink" : "source"]: row.plugin_type,
      [row.direction === "forward" ? "outbox" : "inbox"]: row.outbox_name ?? row.inbox_name,
    });
    await this.#options.sql`
      SELECT tide.relay_state_acquired(${row.name}, ${this.#options.relayGroupId}, ${lane}, ${this.#options.relayId}, ${row.config_version})`;
  }

  /** Stops the worker of unit `key` (draining its batch), then gives its lock up. */
  async #release(key: string, { unlock = true } = {}): Promise<void> {
    const worker = this.#workers.get(key);
    const [name, lane] = [worker?.name ?? key, worker?.lane ?? 0];
    this.#workers.delete(key);
    this.#lanesOf.delete(key);
    this.#draining.add(key);
    try {
      await worker?.stop(this.#options.drainTimeoutMs);
    } finally {
      this.#draining.delete(key);
    }
    try {
      const session = this.#lock.sql;
      if (unlock && session) {
        const unlocked = session`SELECT pg_advisory_unlock(hashtext(${this.#options.relayGroupId}), hashtext(${key}))`;
        if ((await within(unlocked, LOCK_CHECK_TIMEOUT_MS)) === TIMED_OUT) throw new Error("the ownership connection did not answer");
      }
      await this.#options.sql`SELECT tide.relay_state_released(${name}, ${this.#options.relayGroupId}, ${lane}, ${this.#options.relayId})`;
    } catch (error) {
      // A closed connection took its session, and so the lock, with it: nothing is left to release.
      const closed = /CONNECTION_(CLOSED|ENDED|DESTROYED)/.test(String((error as { code?: string }).code));
      const log = closed ? this.#log.debug.bind(this.#log) : this.#log.warn.bind(this.#log);
      log("releasing pipeline ownership failed", { pipeline: name, lane, error: toError(error) });
    }
  }

  /**
   * The lock session is lost or in doubt: fence every worker at once (no drain, nothing acknowledged
   * after this), close the session, and let the next reconcile take ownership again from scratch.
   */
  async #lose(problem: string): Promise<void> {
    const workers = [...this.#workers.values()];
    this.#workers.clear();
    if (workers.length > 0) {
      this.#log.error("lost pipeline ownership; stopping every pipeline at once without acknowledging", {
        reason: redactText(problem),
        pipelines: [...new Set(workers.map((w) => w.name))],
      });
    } else {
      this.#log.warn("the ownership session was lost; opening a new one", { reason: redactText(problem) });
    }
    for (const worker of workers) worker.fence();
    await this.#lock.close();
    await failpoint("coordinator.reacquiring");
    await Promise.all(workers.map((w) => w.stop(0)));
    if (!this.#stopped) void this.reconcile();
  }

  /** Every tick: verify the lock session; every third of the lease, refresh the heartbeat too. */
  async #tick(): Promise<void> {
    if (this.#stopped || this.#workers.size === 0) return;
    if (!(await this.#lock.verify())) return;
    if (Date.now() - this.#heartbeatAt < this.#options.ownershipLeaseMs / 3) return;
    this.#heartbeatAt = Date.now();
    try {
      await writeHeartbeat(this.#options.sql, this.#options, [...this.#workers.values()]);
    } catch (error) {
      this.#log.debug("writing the heartbeat failed", { error: toError(error) });
    }
  }

  #onConfigNotice(pipeline: string): void {
    for (const worker of this.#workers.values()) if (worker.name === pipeline) worker.requeue();
    void this.reconcile();
  }

  #wakeOutbox(outbox: string): void {
    for (const worker of this.#workers.values()) if (worker.outbox === outbox) worker.wake();
  }
}

/** The units of ownership of a pipeline: itself, or each of its lanes (config `lanes`, forward pipelines). */
function unitsOf(row: PipelineRow): Unit[] {
  const lanes = row.direction === "forward" ? laneCount(row.config) : 1;
  return Array.from({ length: lanes }, (_, lane) => ({ key: ownershipUnit(row.name, lane, lanes), row, lane, lanes }));
}
