// Decides which pipelines this relay runs. Ownership is a session advisory lock keyed by
// (relay_group_id, pipeline) held on one dedicated connection: if the relay dies, PostgreSQL drops
// the session and its locks, and another relay's next reconcile takes the pipelines over.
// Reconciles on NOTIFY tide_relay_config, on SIGHUP (via reconcile()) and every few seconds.

import type { ReservedSql, Sql } from "./db.ts";
import { toError } from "./errors.ts";
import { ForwardWorker, type PipelineRow, type WorkerStatus } from "./forward.ts";
import { ReverseWorker } from "./reverse.ts";
import type { Logger } from "./log.ts";
import type { RelayEvents } from "./events.ts";
import type { HttpRoutes } from "./plugin.ts";
import type { PluginRegistry } from "./plugins.ts";
import { TIMED_OUT, within } from "./backoff.ts";
import { redactText } from "./redact.ts";

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
  events?: RelayEvents;
}

/** What the coordinator needs of a forward or reverse pipeline worker. */
export interface PipelineWorker {
  readonly name: string;
  readonly outbox: string | null;
  readonly updatedAt: number;
  readonly status: WorkerStatus;
  start(): Promise<void>;
  stop(drainMs?: number): Promise<void>;
  wake(): void;
  requeue(): void;
}

/** A lock connection that does not answer this fast is treated as lost. */
export const LOCK_CHECK_TIMEOUT_MS = 5_000;

export interface OwnedPipeline {
  name: string;
  status: WorkerStatus;
}

export class Coordinator {
  readonly #options: CoordinatorOptions;
  readonly #log: Logger;
  readonly #workers = new Map<string, PipelineWorker>();
  /** Pipelines whose worker failed to start, with the config version that failed. */
  readonly #broken = new Map<string, number>();
  #lockConnection: ReservedSql | undefined;
  #timer: ReturnType<typeof setInterval> | undefined;
  #unlisten: (() => Promise<void>)[] = [];
  #reconciling: Promise<void> | undefined;
  #again = false;
  #stopped = false;
  running = false;

  constructor(options: CoordinatorOptions) {
    this.#options = options;
    this.#log = options.logger.child({ relay: options.relayId });
  }

  owned(): OwnedPipeline[] {
    return [...this.#workers.values()].map((w) => ({ name: w.name, status: w.status }));
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
    this.running = true;
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
    await this.#reconciling;
    await Promise.all([...this.#workers.keys()].map((name) => this.#release(name)));
    await Promise.all(this.#unlisten.map((unlisten) => unlisten().catch(() => {})));
    this.#lockConnection?.release();
    this.#lockConnection = undefined;
  }

  async #reconcileOnce(): Promise<void> {
    if (this.#stopped) return;
    const { sql, relayGroupId } = this.#options;
    const locks = await this.#locks();
    const rows = await sql<PipelineRow[]>`
      SELECT * FROM tide.relay_pipelines WHERE enabled ORDER BY name`;
    const wanted = new Map(rows.map((row) => [row.name, row]));

    for (const [name, worker] of this.#workers) {
      const row = wanted.get(name);
      if (!row || new Date(row.updated_at).getTime() !== worker.updatedAt) {
        this.#log.info(row ? "pipeline config changed; restarting it" : "pipeline disabled or deleted; stopping it");
        await this.#release(name);
      }
    }
    for (const row of rows) {
      if (this.#stopped || this.#workers.has(row.name)) continue;
      if (this.#workers.size >= this.#options.maxPipelines) break;
      if (this.#broken.get(row.name) === new Date(row.updated_at).getTime()) continue;
      const [{ locked }] = await locks<{ locked: boolean }[]>`
        SELECT pg_try_advisory_lock(hashtext(${relayGroupId}), hashtext(${row.name})) AS locked`;
      if (!locked) continue;
      await this.#startWorker(row, locks);
    }
    await this.#heartbeat();
  }

  async #startWorker(row: PipelineRow, locks: ReservedSql): Promise<void> {
    const worker: PipelineWorker = row.direction === "forward"
      ? new ForwardWorker(row, this.#options)
      : new ReverseWorker(row, this.#options);
    try {
      await worker.start();
    } catch (error) {
      // A pipeline with a bad config never stops the others; it is retried once its config changes.
      const err = toError(error);
      this.#broken.set(row.name, new Date(row.updated_at).getTime());
      this.#log.error("pipeline cannot start", { pipeline: row.name, error: err });
      await this.#options.sql`
        INSERT INTO tide.relay_pipeline_state (pipeline, relay_group_id, owner_id, healthy, last_error, last_error_at)
        VALUES (${row.name}, ${this.#options.relayGroupId}, NULL, false, ${redactText(err.message)}, now())
        ON CONFLICT (pipeline, relay_group_id) DO UPDATE
           SET owner_id = NULL, healthy = false, last_error = excluded.last_error, last_error_at = now()`;
      await locks`SELECT pg_advisory_unlock(hashtext(${this.#options.relayGroupId}), hashtext(${row.name}))`;
      return;
    }
    this.#broken.delete(row.name);
    this.#workers.set(row.name, worker);
    this.#log.info("pipeline started", {
      pipeline: row.name,
      direction: row.direction,
      [row.direction === "forward" ? "sink" : "source"]: row.plugin_type,
      [row.direction === "forward" ? "outbox" : "inbox"]: row.outbox_name ?? row.inbox_name,
    });
    await this.#options.sql`
      INSERT INTO tide.relay_pipeline_state (pipeline, relay_group_id, owner_id, acquired_at, heartbeat_at, healthy)
      VALUES (${row.name}, ${this.#options.relayGroupId}, ${this.#options.relayId}, now(), now(), true)
      ON CONFLICT (pipeline, relay_group_id) DO UPDATE
         SET owner_id = excluded.owner_id, acquired_at = now(), heartbeat_at = now(), healthy = true,
             retry_attempt = 0`;
  }

  async #release(name: string): Promise<void> {
    const worker = this.#workers.get(name);
    this.#workers.delete(name);
    await worker?.stop(this.#options.drainTimeoutMs);
    try {
      const locks = this.#lockConnection;
      if (locks) await locks`SELECT pg_advisory_unlock(hashtext(${this.#options.relayGroupId}), hashtext(${name}))`;
      await this.#options.sql`
        UPDATE tide.relay_pipeline_state SET owner_id = NULL
         WHERE pipeline = ${name} AND relay_group_id = ${this.#options.relayGroupId} AND owner_id = ${this.#options.relayId}`;
    } catch (error) {
      // A closed connection took its session, and so the lock, with it: nothing is left to release.
      const closed = /CONNECTION_(CLOSED|ENDED|DESTROYED)/.test(String((error as { code?: string }).code));
      const log = closed ? this.#log.debug.bind(this.#log) : this.#log.warn.bind(this.#log);
      log("releasing pipeline ownership failed", { pipeline: name, error: toError(error) });
    }
  }

  /** The lock connection; if it broke, every lock is gone, so every worker stops before relocking. */
  async #locks(): Promise<ReservedSql> {
    if (this.#lockConnection) {
      try {
        if ((await within(this.#lockConnection`SELECT 1`, LOCK_CHECK_TIMEOUT_MS)) === TIMED_OUT) {
          throw new Error("the ownership connection did not answer");
        }
        return this.#lockConnection;
      } catch (error) {
        this.#log.error("lost the ownership connection; stopping all pipelines", { error: toError(error) });
        const names = [...this.#workers.keys()];
        const workers = names.map((name) => this.#workers.get(name)!);
        this.#workers.clear();
        await Promise.all(workers.map((w) => w.stop(this.#options.drainTimeoutMs)));
        this.#lockConnection.release();
        this.#lockConnection = undefined;
      }
    }
    this.#lockConnection = await this.#options.sql.reserve();
    return this.#lockConnection;
  }

  async #heartbeat(): Promise<void> {
    const owned = [...this.#workers.values()];
    if (owned.length === 0) return;
    const rows = owned.map((w) => ({
      pipeline: w.name,
      healthy: w.status.healthy,
      // The catalog is read by tide_reader dashboards: no secret goes into it.
      last_error: w.status.lastError === null ? null : redactText(w.status.lastError),
      last_error_at: w.status.lastErrorAt?.toISOString() ?? null,
      retry_attempt: w.status.attempt,
      circuit: w.status.circuit,
    }));
    await this.#options.sql`
      UPDATE tide.relay_pipeline_state s
         SET heartbeat_at = now(), healthy = r.healthy, last_error = r.last_error,
             last_error_at = r.last_error_at::timestamptz, retry_attempt = r.retry_attempt, circuit = r.circuit
        FROM jsonb_to_recordset(${this.#options.sql.json(rows)}::jsonb)
             AS r(pipeline text, healthy boolean, last_error text, last_error_at text, retry_attempt int, circuit text)
       WHERE s.pipeline = r.pipeline AND s.relay_group_id = ${this.#options.relayGroupId}`;
  }

  #onConfigNotice(pipeline: string): void {
    this.#workers.get(pipeline)?.requeue();
    void this.reconcile();
  }

  #wakeOutbox(outbox: string): void {
    for (const worker of this.#workers.values()) if (worker.outbox === outbox) worker.wake();
  }
}
