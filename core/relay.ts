// The relay process: connects, checks the schema, registers plugin types in the catalog, runs the
// coordinator, the metrics/status HTTP server, the retention sweep and the lag checkpoint, and shuts
// down cleanly. The sweep and the checkpoint are database-wide chores: every relay schedules them,
// and their SQL functions let one session at a time do the work.

import { hostname } from "node:os";
import { Coordinator, DEFAULT_OWNERSHIP_LEASE_MS } from "./engine/coordinator.ts";
import { loadFailpoints } from "./engine/failpoints.ts";
import { connect, type Sql, verifyConnection } from "./db.ts";
import { TIMED_OUT, within } from "./engine/backoff.ts";
import { ConfigError, toError } from "./errors.ts";
import type { Logger } from "./log.ts";
import { combineEvents, type RelayEvents } from "./engine/events.ts";
import { createHttpApp } from "./http/http.ts";
import type { HttpAuth } from "./http/http_auth.ts";
import type { ManifestPipeline } from "./config/manifest.ts";
import { syncManifestPipelines } from "./config/manifest_sync.ts";
import { RelayMetrics } from "./http/metrics.ts";
import { RouteTable } from "./http/routes.ts";
import { PluginRegistry, registerPluginTypes } from "./plugins.ts";
import { type HttpServer, serve } from "./runtime.ts";
import { SCHEMA_VERSION, schemaVersion } from "./schema.ts";
import { SpanExporter } from "./http/trace_export.ts";
import { WalCaptures } from "./capture/wal_capture.ts";

export interface RelayOptions {
  postgresUrl: string;
  relayGroupId: string;
  logger: Logger;
  /** The plugins pipelines may name: the built-in ones (plugins/registry.ts) and the manifest's drop-ins. */
  registry: PluginRegistry;
  maxPipelines?: number;
  pollIntervalMs?: number;
  reconcileIntervalMs?: number;
  drainTimeoutMs?: number;
  /** An owner whose heartbeat is older than this loses its pipelines to another relay. */
  ownershipLeaseMs?: number;
  retentionIntervalMs?: number;
  /** How often the consumer groups' running lag counts take in newly committed messages. */
  lagCheckpointIntervalMs?: number;
  events?: RelayEvents;
  /** Pipelines declared in a manifest, upserted into the catalog at start. */
  pipelines?: ManifestPipeline[];
  /** host:port for /metrics, /readyz, /api/v1/pipelines and the status page; unset: no server. */
  metricsAddr?: string;
  /** The token the HTTP server asks for (--http-token, --http-token-scope); unset: it asks for none. */
  httpAuth?: HttpAuth;
  /** An OpenTelemetry collector's OTLP/HTTP base URL: one span per delivered batch goes there. */
  otlpEndpoint?: string;
}

export const DEFAULT_POLL_INTERVAL_MS = 250;
export const DEFAULT_RECONCILE_INTERVAL_MS = 2_000;
export const DEFAULT_DRAIN_TIMEOUT_MS = 10_000;
export const DEFAULT_RETENTION_INTERVAL_MS = 60_000;
export const DEFAULT_LAG_CHECKPOINT_INTERVAL_MS = 10_000;
/** Per call of tide.retention_sweep, and calls per sweep: short transactions, never a long lock. */
const SWEEP_BATCH = 5_000;
const SWEEP_ROUNDS = 10;
/** How long a stop waits for a running retention sweep or lag checkpoint. */
const CHORE_STOP_MS = 5_000;
/** How long a stop waits for the database connections to close before it leaves them. */
const CLOSE_GRACE_MS = 1_000;

export class Relay {
  readonly relayId = `${hostname()}:${process.pid}`;
  readonly sql: Sql;
  readonly coordinator: Coordinator;
  readonly metrics = new RelayMetrics();
  readonly registry: PluginRegistry;
  readonly routes = new RouteTable();
  readonly #options: RelayOptions;
  #retentionTimer: ReturnType<typeof setInterval> | undefined;
  #lagCheckpointTimer: ReturnType<typeof setInterval> | undefined;
  /** The chores running now, by name: a tick never starts a second one beside one still running; stop waits for them. */
  readonly #chores = new Map<string, Promise<void>>();
  #server: HttpServer | undefined;
  readonly #spans: SpanExporter | undefined;
  /** Readers of the tables captured from the WAL (tide.capture_table(..., p_mode => 'wal')). */
  readonly walCaptures: WalCaptures;

  constructor(options: RelayOptions) {
    this.#options = options;
    this.registry = options.registry;
    const ownershipLeaseMs = options.ownershipLeaseMs ?? DEFAULT_OWNERSHIP_LEASE_MS;
    this.#spans = options.otlpEndpoint
      ? new SpanExporter({ endpoint: options.otlpEndpoint, logger: options.logger, relayId: this.relayId, relayGroupId: options.relayGroupId })
      : undefined;
    this.sql = connect(options.postgresUrl, {
      max: 10,
      applicationName: `pg-tide relay ${options.relayGroupId}`,
      // A frozen relay's open transaction ends with its lease, so it cannot block the next owner.
      idleInTransactionTimeoutMs: ownershipLeaseMs,
    });
    this.coordinator = new Coordinator({
      sql: this.sql,
      postgresUrl: options.postgresUrl,
      http: options.metricsAddr ? this.routes : undefined,
      registry: this.registry,
      logger: options.logger,
      relayGroupId: options.relayGroupId,
      relayId: this.relayId,
      maxPipelines: options.maxPipelines ?? 1000,
      pollIntervalMs: options.pollIntervalMs ?? DEFAULT_POLL_INTERVAL_MS,
      reconcileIntervalMs: options.reconcileIntervalMs ?? DEFAULT_RECONCILE_INTERVAL_MS,
      drainTimeoutMs: options.drainTimeoutMs ?? DEFAULT_DRAIN_TIMEOUT_MS,
      ownershipLeaseMs,
      events: combineEvents(this.metrics.events, this.#spans?.events, options.events),
    });
    this.walCaptures = new WalCaptures({
      sql: this.sql,
      postgresUrl: options.postgresUrl,
      logger: options.logger,
      registry: this.metrics.registry,
      reconcileIntervalMs: options.reconcileIntervalMs ?? DEFAULT_RECONCILE_INTERVAL_MS,
    });
  }

  /** Start-up errors (no database, no schema, schema too new) end the process; later ones do not. */
  async start(): Promise<void> {
    const { logger } = this.#options;
    loadFailpoints(); // a bad TIDE_FAILPOINTS stops the relay here, not at the first batch
    if (this.#options.metricsAddr) this.#serve(this.#options.metricsAddr);
    await verifyConnection(this.sql, this.#options.postgresUrl);
    const version = await schemaVersion(this.sql);
    if (version === 0) {
      throw new ConfigError("the tide schema is not installed in this database; run: pg-tide install --postgres-url URL");
    }
    if (version > SCHEMA_VERSION) {
      throw new ConfigError(`database schema tide is at version ${version}, newer than this pg-tide understands (${SCHEMA_VERSION})`);
    }
    if (version < SCHEMA_VERSION) {
      throw new ConfigError(`database schema tide is at version ${version}; run pg-tide install to upgrade it to ${SCHEMA_VERSION}`);
    }
    await this.#registerPluginTypes();
    this.#spans?.start();
    if (this.#options.pipelines?.length) await syncManifestPipelines(this.sql, this.#options.pipelines, logger);
    await this.coordinator.start();
    this.walCaptures.start();
    this.metrics.attach({
      lag: () => this.#ownedLag(),
      // A pipeline with lanes is healthy while every lane owned here is.
      health: () => {
        const health = new Map<string, boolean>();
        for (const p of this.coordinator.owned()) health.set(p.name, (health.get(p.name) ?? true) && p.status.healthy);
        return health;
      },
      held: () => this.#ownedHeld(),
      ownedCount: () => this.coordinator.owned().length,
    });
    this.#retentionTimer = setInterval(() => void this.#chore("retention sweep", () => this.#sweep()),
      this.#options.retentionIntervalMs ?? DEFAULT_RETENTION_INTERVAL_MS);
    this.#lagCheckpointTimer = setInterval(() => void this.#chore("lag checkpoint", () => this.#checkpointLag()),
      this.#options.lagCheckpointIntervalMs ?? DEFAULT_LAG_CHECKPOINT_INTERVAL_MS);
    logger.info("relay started", { relay_group_id: this.#options.relayGroupId, relay: this.relayId });
  }

  /** The port the HTTP server listens on (useful with port 0). */
  get httpPort(): number | undefined {
    return this.#server?.port;
  }

  async stop(): Promise<void> {
    clearInterval(this.#retentionTimer);
    clearInterval(this.#lagCheckpointTimer);
    this.metrics.detach();
    await this.walCaptures.stop();
    await this.coordinator.stop();
    await this.#spans?.stop();
    await this.#server?.stop();
    await within(Promise.all(this.#chores.values()), CHORE_STOP_MS);
    // Nothing of ours runs now. A connection the database dropped can still hold end() up: postgres.js
    // keeps the failed query on it and waits for it until the timeout (porsager/postgres#1097), so a
    // stop after the database went away would take the whole timeout. Give live connections a moment
    // to close; leave the rest to the timeout (in-process) or to the exit (the CLI).
    if ((await within(this.sql.end({ timeout: 5 }), CLOSE_GRACE_MS)) === TIMED_OUT) {
      this.#options.logger.warn(`database connections did not close within ${CLOSE_GRACE_MS} ms (the database dropped them, or a query still runs); not waiting for them`);
    }
    this.#options.logger.info("relay stopped");
  }

  /** Drop-in plugin types must be in the catalog before pipelines can name them; each type's required keys come from its schema. */
  async #registerPluginTypes(): Promise<void> {
    for (const { kind, type, plugin, file, version } of this.registry.dropIns()) {
      this.#options.logger.info(`loaded plugin "${plugin}": ${kind} "${type}"${version ? ` ${version}` : ""} from ${file}`, { plugin, kind, type, file, version });
    }
    for (const { kind, type, plugin } of this.registry.replaced()) {
      this.#options.logger.warn(`plugin "${plugin}" replaces the built-in ${kind} "${type}" (override = true in the manifest)`);
    }
    await registerPluginTypes(this.sql, this.registry.all());
  }

  #serve(address: string): void {
    const match = /^(.*):(\d+)$/.exec(address);
    if (!match) throw new ConfigError(`--metrics-addr must be host:port (got "${address}")`);
    const app = createHttpApp({
      sql: this.sql,
      metrics: this.metrics,
      relayGroupId: this.#options.relayGroupId,
      relayId: this.relayId,
      coordinatorRunning: () => this.coordinator.running,
      owned: () => this.coordinator.owned(),
      routes: this.routes,
      auth: this.#options.httpAuth,
      logger: this.#options.logger,
    });
    try {
      this.#server = serve(app.fetch, match[1].replace(/^\[|\]$/g, "") || "0.0.0.0", Number(match[2]));
    } catch (error) {
      throw new ConfigError(
        `cannot serve metrics and the status page on ${address}: ${toError(error).message}; choose another address with ` +
          `--metrics-addr HOST:PORT (PG_TIDE_METRICS_ADDR, [relay] metrics_addr), 127.0.0.1:0 for any free port`,
        { cause: error },
      );
    }
    const host = match[1] || "0.0.0.0";
    this.#options.logger.info("serving metrics and status", {
      address: `${host}:${this.#server.port}`,
      // Not "http_token": the logger masks fields named like a secret.
      access: this.#options.httpAuth ? `token required (scope ${this.#options.httpAuth.scope})` : "open, no token",
    });
    if (!this.#options.httpAuth && !/^(127\.|localhost$|\[?::1\]?$)/.test(host)) {
      this.#options.logger.warn(
        "the HTTP server asks for no token: anyone who reaches this address can read the pipelines' status and post " +
          "to unsigned /ingest/ routes; set --http-token (or PG_TIDE_HTTP_TOKEN), or bind to 127.0.0.1",
        { address: `${host}:${this.#server.port}` },
      );
    }
  }

  async #ownedLag(): Promise<Map<string, number>> {
    const owned = this.coordinator.owned();
    if (owned.length === 0) return new Map();
    // A pipeline with lanes lags as much as its most behind lane owned here.
    const rows = await this.sql<{ name: string; lag: bigint | null }[]>`
      SELECT p.name, max(tide.consumer_group_lag(p.outbox_name, tide.lane_group(p.consumer_group, o.lane, tide.pipeline_lanes(p.config)),
                                                 ${this.#options.relayGroupId})) AS lag
        FROM unnest(${this.sql.array(owned.map((p) => p.name))}::text[], ${this.sql.array(owned.map((p) => p.lane))}::int[]) AS o(name, lane)
        JOIN tide.relay_pipelines p ON p.name = o.name
       GROUP BY p.name`;
    return new Map(rows.filter((row) => row.lag !== null).map((row) => [row.name, Number(row.lag)]));
  }

  async #ownedHeld(): Promise<Map<string, number>> {
    const owned = this.coordinator.owned();
    if (owned.length === 0) return new Map();
    const rows = await this.sql<{ name: string; held: number }[]>`
      SELECT o.name, count(h.message_id)::int AS held
        FROM unnest(${this.sql.array(owned.map((p) => p.name))}::text[], ${this.sql.array(owned.map((p) => p.lane))}::int[]) AS o(name, lane)
        LEFT JOIN tide.relay_held h ON h.pipeline = o.name AND h.lane = o.lane AND h.relay_group_id = ${this.#options.relayGroupId}
       GROUP BY o.name`;
    return new Map(rows.map((row) => [row.name, row.held]));
  }

  async #chore(name: string, run: () => Promise<void>): Promise<void> {
    if (this.#chores.has(name)) return;
    const chore = run().catch((error) => this.#options.logger.warn(`${name} failed`, { error: toError(error) }));
    this.#chores.set(name, chore);
    try {
      await chore;
    } finally {
      this.#chores.delete(name);
    }
  }

  /**
   * Bounded batches, so a large backlog of expired rows never holds a long lock; tide.retention_sweep
   * returns no row while another relay is sweeping, and this one leaves the work to it.
   */
  async #sweep(): Promise<void> {
    let outbox = 0;
    let inbox = 0;
    for (let round = 0; round < SWEEP_ROUNDS; round++) {
      const rows = await this.sql<{ outbox_deleted: bigint; inbox_deleted: bigint }[]>`
        SELECT outbox_deleted, inbox_deleted FROM tide.retention_sweep(${SWEEP_BATCH})`;
      if (rows.length === 0) {
        this.#options.logger.debug("retention sweep skipped: another relay is sweeping");
        break;
      }
      outbox += Number(rows[0].outbox_deleted);
      inbox += Number(rows[0].inbox_deleted);
      if (Number(rows[0].outbox_deleted) < SWEEP_BATCH && Number(rows[0].inbox_deleted) < SWEEP_BATCH) break;
    }
    if (outbox + inbox > 0) this.#options.logger.info("retention sweep", { deleted: outbox + inbox, outbox, inbox });
  }

  /** Keeps tide.consumer_group_lag cheap: it then counts only what was committed since this ran. */
  async #checkpointLag(): Promise<void> {
    await this.sql`SELECT tide.consumer_lag_checkpoint()`;
  }
}
