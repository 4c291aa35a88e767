// Decides which pipelines this relay runs. Ownership is a session advisory lock keyed by
// (relay_group_id, pipeline) held on a connection of its own, outside the pool: if the relay dies,
// PostgreSQL drops the session and its locks, and another relay's next reconcile takes the pipelines
// over. Reconciles on NOTIFY tide_relay_config, on SIGHUP (via reconcile()) and every few seconds.
//
// Ownership is checked, not assumed. The lock session's backend pid is recorded when it connects;
// every tick (and whenever a worker's acknowledgement is refused as stale) the session is asked for
// its pid and its locks. A different pid means the session died and the client reconnected: the
// locks are gone. On any doubt every worker is fenced at once (aborted, nothing acknowledged after),
// the client is closed, and ownership is taken again from scratch. While the session is good the
// tick refreshes the pipelines' heartbeat; an owner whose heartbeat is older than the lease (frozen)
// has its lock session ended by another relay (tide.relay_fence_stale_owner).

import { connect, type Sql } from "./db.ts";
import { toError } from "./errors.ts";
import { ForwardWorker, type PipelineRow, type WorkerStatus } from "./forward.ts";
import { ReverseWorker } from "./reverse.ts";
import type { Logger } from "./log.ts";
import type { RelayEvents } from "./events.ts";
import type { HttpRoutes } from "./plugin.ts";
import type { PluginRegistry } from "./plugins.ts";
import { TIMED_OUT, within } from "./backoff.ts";
import { failpoint } from "./failpoints.ts";
import { IdleProbe } from "./idle_probe.ts";
import { redactText } from "./redact.ts";
import { laneCount, ownershipUnit } from "./lanes.ts";

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

/** A lock connection that does not answer this fast is treated as lost. */
export const LOCK_CHECK_TIMEOUT_MS = 5_000;
/** How often the lock session is verified (and the heartbeat written): a third of the lease, at most this. */
export const OWNERSHIP_TICK_MS = 1_000;
export const DEFAULT_OWNERSHIP_LEASE_MS = 6_000;
/** How soon a reconcile that failed without a lock session is tried again. */
const RECONNECT_RETRY_MS = 500;

/** The dedicated lock session: its own client, and the backend pid that holds the locks. */
interface OwnershipSession {
  sql: Sql;
  pid: number;
}

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
  #session: OwnershipSession | undefined;
  /** The verification in progress, shared by everyone asking at the same moment. */
  #verifying: Promise<boolean> | undefined;
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
    return (this.#workers.has(name) || this.#draining.has(name)) && (await this.#verify());
  }

  /**
   * A worker has reason to doubt ownership (its acknowledgement was refused: the position moved under
   * it; or the database failed it): check the lock session now rather than at the next tick.
   */
  doubtOwnership(): void {
    void this.#verify();
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
          if (!this.#session && !this.#stopped) setTimeout(() => void this.reconcile(), RECONNECT_RETRY_MS).unref?.();
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
    const owned = this.#session !== undefined;
    await this.#closeSession();
    // The other relays of the group take the units over now rather than at their next reconcile.
    if (owned) await within(this.#options.sql`SELECT pg_notify('tide_relay_config', '')`.catch(() => {}), 1_000);
  }

  async #reconcileOnce(): Promise<void> {
    if (this.#stopped) return;
    const { sql, relayGroupId } = this.#options;
    const locks = await this.#ownership();
    const rows = await sql<PipelineRow[]>`
      SELECT * FROM tide.relay_pipelines WHERE enabled ORDER BY name`;
    const units = rows.flatMap(unitsOf);
    const wanted = new Map(units.map((unit) => [unit.key, unit]));
    await this.#fenceFrozenOwners(wanted);

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
      await this.#options.sql`
        INSERT INTO tide.relay_pipeline_state (pipeline, relay_group_id, lane, owner_id, healthy, last_error, last_error_at)
        VALUES (${row.name}, ${this.#options.relayGroupId}, ${lane}, NULL, false, ${redactText(err.message)}, now())
        ON CONFLICT (pipeline, relay_group_id, lane) DO UPDATE
           SET owner_id = NULL, healthy = false, last_error = excluded.last_error, last_error_at = now()`;
      await locks`SELECT pg_advisory_unlock(hashtext(${this.#options.relayGroupId}), hashtext(${key}))`;
      return;
    }
    if (this.#session?.sql !== locks) {
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
      INSERT INTO tide.relay_pipeline_state (pipeline, relay_group_id, lane, owner_id, acquired_at, heartbeat_at, healthy, config_version)
      VALUES (${row.name}, ${this.#options.relayGroupId}, ${lane}, ${this.#options.relayId}, now(), now(), true, ${row.config_version})
      ON CONFLICT (pipeline, relay_group_id, lane) DO UPDATE
         SET owner_id = excluded.owner_id, acquired_at = now(), heartbeat_at = now(), healthy = true,
             retry_attempt = 0, config_version = excluded.config_version`;
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
      const session = this.#session;
      if (unlock && session) {
        const unlocked = session.sql`SELECT pg_advisory_unlock(hashtext(${this.#options.relayGroupId}), hashtext(${key}))`;
        if ((await within(unlocked, LOCK_CHECK_TIMEOUT_MS)) === TIMED_OUT) throw new Error("the ownership connection did not answer");
      }
      await this.#options.sql`
        UPDATE tide.relay_pipeline_state SET owner_id = NULL
         WHERE pipeline = ${name} AND lane = ${lane} AND relay_group_id = ${this.#options.relayGroupId}
           AND owner_id = ${this.#options.relayId}`;
    } catch (error) {
      // A closed connection took its session, and so the lock, with it: nothing is left to release.
      const closed = /CONNECTION_(CLOSED|ENDED|DESTROYED)/.test(String((error as { code?: string }).code));
      const log = closed ? this.#log.debug.bind(this.#log) : this.#log.warn.bind(this.#log);
      log("releasing pipeline ownership failed", { pipeline: name, lane, error: toError(error) });
    }
  }

  /** The verified lock session, or a new one (with no locks) when there was none or it was lost. */
  async #ownership(): Promise<Sql> {
    if (this.#session && (await this.#verify())) return this.#session.sql;
    if (this.#session) await this.#lose("the ownership session could not be verified");
    if (!this.#options.postgresUrl) throw new Error("the coordinator needs postgresUrl for its ownership session");
    const sql = connect(this.#options.postgresUrl, {
      max: 1,
      keepAlive: true,
      applicationName: ownershipApplicationName(this.#options.relayGroupId),
    });
    try {
      const [{ pid }] = await sql<{ pid: number }[]>`SELECT pg_backend_pid() AS pid`;
      this.#session = { sql, pid };
    } catch (error) {
      await sql.end({ timeout: 0 }).catch(() => {});
      throw error;
    }
    return sql;
  }

  /**
   * Asks the lock session for its pid and for the locks of every owned pipeline. False, after
   * fencing every worker, when the session is another one (it died and the client reconnected), a
   * lock is missing, or the session does not answer in time.
   */
  #verify(): Promise<boolean> {
    this.#verifying ??= (async () => {
      const session = this.#session;
      if (!session) {
        if (this.#workers.size === 0) return true;
        await this.#lose("no ownership session");
        return false;
      }
      const names = [...this.#workers.keys()];
      let problem: string | undefined;
      try {
        const answer = await within(session.sql<{ pid: number; missing: string[] }[]>`
          SELECT pg_backend_pid() AS pid,
                 array(SELECT n FROM unnest(${names}::text[]) n
                        WHERE NOT EXISTS (
                          SELECT 1 FROM pg_locks l
                           WHERE l.pid = pg_backend_pid() AND l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                             AND l.classid::integer = hashtext(${this.#options.relayGroupId})
                             AND l.objid::integer = hashtext(n))) AS missing`, LOCK_CHECK_TIMEOUT_MS);
        if (answer === TIMED_OUT) problem = `the ownership session did not answer within ${LOCK_CHECK_TIMEOUT_MS} ms`;
        else if (answer[0].pid !== session.pid) problem = `the ownership session ended (backend ${session.pid}); its locks are gone`;
        else if (answer[0].missing.length > 0) problem = `the locks of ${answer[0].missing.join(", ")} are no longer held`;
      } catch (error) {
        problem = `the ownership session failed: ${toError(error).message}`;
      }
      if (problem === undefined) return true;
      if (this.#session === session) await this.#lose(problem);
      return false;
    })().finally(() => (this.#verifying = undefined));
    return this.#verifying;
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
    await this.#closeSession();
    await failpoint("coordinator.reacquiring");
    await Promise.all(workers.map((w) => w.stop(0)));
    if (!this.#stopped) void this.reconcile();
  }

  async #closeSession(): Promise<void> {
    const session = this.#session;
    this.#session = undefined;
    await session?.sql.end({ timeout: 0 }).catch(() => {});
  }

  /** Every tick: verify the lock session; every third of the lease, refresh the heartbeat too. */
  async #tick(): Promise<void> {
    if (this.#stopped || this.#workers.size === 0) return;
    if (!(await this.#verify())) return;
    if (Date.now() - this.#heartbeatAt < this.#options.ownershipLeaseMs / 3) return;
    this.#heartbeatAt = Date.now();
    try {
      await this.#heartbeat();
    } catch (error) {
      this.#log.debug("writing the heartbeat failed", { error: toError(error) });
    }
  }

  /**
   * A pipeline this relay wants but whose owner's heartbeat is older than the lease: that owner is
   * frozen (or cut off). Ending its lock session releases the pipeline for the next reconcile; its
   * late acknowledgements are refused by consumer_commit.
   */
  async #fenceFrozenOwners(wanted: Map<string, Unit>): Promise<void> {
    // Not limited to the fair share: the frozen relay's session counts as a live relay until it ends.
    if (this.#workers.size >= this.#options.maxPipelines) return;
    const { sql, relayGroupId, relayId, ownershipLeaseMs } = this.#options;
    const stale = await sql<{ pipeline: string; lane: number }[]>`
      SELECT pipeline, lane FROM tide.relay_pipeline_state
       WHERE relay_group_id = ${relayGroupId} AND owner_id IS NOT NULL AND owner_id <> ${relayId}
         AND coalesce(heartbeat_at, acquired_at) < now() - make_interval(secs => ${ownershipLeaseMs / 1000})`;
    for (const { pipeline, lane } of stale) {
      const key = wanted.has(pipeline) ? pipeline : `${pipeline}#${lane}`;
      if (!wanted.has(key) || this.#workers.has(key)) continue;
      try {
        const [{ pid }] = await sql<{ pid: number | null }[]>`
          SELECT tide.relay_fence_stale_owner(${pipeline}, ${lane}::integer, ${relayGroupId}, ${ownershipLeaseMs}::integer) AS pid`;
        if (pid !== null) {
          this.#log.warn("ended the lock session of an owner whose heartbeat is older than the lease", {
            pipeline,
            lane,
            backend_pid: pid,
            lease_ms: ownershipLeaseMs,
          });
        }
      } catch (error) {
        this.#log.warn("cannot end a frozen owner's lock session", { pipeline, lane, error: toError(error) });
      }
    }
  }

  async #heartbeat(): Promise<void> {
    const owned = [...this.#workers.values()];
    if (owned.length === 0) return;
    const rows = owned.map((w) => ({
      pipeline: w.name,
      lane: w.lane ?? 0,
      healthy: w.status.healthy,
      // The catalog is read by tide_reader dashboards: no secret goes into it.
      last_error: w.status.lastError === null ? null : redactText(w.status.lastError),
      last_error_at: w.status.lastErrorAt?.toISOString() ?? null,
      last_success_at: w.status.lastSuccessAt?.toISOString() ?? null,
      retry_attempt: w.status.attempt,
      circuit: w.status.circuit,
    }));
    await this.#options.sql`
      UPDATE tide.relay_pipeline_state s
         SET heartbeat_at = now(), healthy = r.healthy, last_error = r.last_error,
             last_error_at = r.last_error_at::timestamptz, retry_attempt = r.retry_attempt, circuit = r.circuit,
             last_success_at = coalesce(r.last_success_at::timestamptz, s.last_success_at)
        FROM jsonb_to_recordset(${this.#options.sql.json(rows)}::jsonb)
             AS r(pipeline text, lane int, healthy boolean, last_error text, last_error_at text, retry_attempt int, circuit text,
                  last_success_at text)
       WHERE s.pipeline = r.pipeline AND s.lane = r.lane AND s.relay_group_id = ${this.#options.relayGroupId}
         AND s.owner_id = ${this.#options.relayId}`;
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

/** The application_name of a relay's lock session: how relays of a relay group count each other. */
function ownershipApplicationName(relayGroupId: string): string {
  return `pg-tide ownership ${relayGroupId}`;
}
