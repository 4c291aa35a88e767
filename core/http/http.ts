// The relay's HTTP surface (Hono): /metrics, /livez, /readyz and /health, /api/v1/pipelines, the
// operations console at / (with /dlq, /trace and their actions, core/http/http_console.ts), and the ingest routes of webhook sources, behind the optional HTTP token
// (core/http/http_auth.ts). Built as a plain Hono app so tests call app.request() without a port.

import { Hono } from "hono";
import type { Sql } from "../db.ts";
import { toError } from "../errors.ts";
import { type HttpAuth, requireToken } from "./http_auth.ts";
import { addConsoleRoutes } from "./http_console.ts";
import type { Logger } from "../log.ts";
import type { InboxCounts, RelayMetrics } from "./metrics.ts";
import { INGEST_PREFIX, type RouteTable } from "./routes.ts";
import { redactText } from "../redact.ts";
import {
  errorIsPast, pipelineStatus, type PipelineStatus, type UnreadConsumerGroup, unreadConsumerGroups, walSlotStatus, type WalSlotStatus,
} from "./status.ts";
import { renderStatusPage } from "./status_page.ts";

export interface HttpDeps {
  sql: Sql;
  metrics: RelayMetrics;
  relayGroupId: string;
  relayId: string;
  /** True while the coordinator runs (false before start and while stopping). */
  coordinatorRunning(): boolean;
  /** In-memory state of the pipelines this relay owns. */
  owned(): {
    name: string;
    /** The lane owned, for a pipeline with lanes (0 otherwise). */
    lane?: number;
    status: {
      healthy: boolean;
      attempt: number;
      lastError: string | null;
      lastErrorAt?: Date | null;
      lastSuccessAt?: Date | null;
      circuit: string;
    };
  }[];
  /** Plugin routes under /ingest/ (webhook sources owned by this relay). */
  routes?: RouteTable;
  /** The token requests must present (--http-token); unset: every route is open. */
  auth?: HttpAuth;
  /** Where console actions are recorded. */
  logger?: Logger;
}

export interface ApiPipeline extends PipelineStatus {
  owned_here: boolean;
  throughput_per_second: number;
  history: { at: string; messages: number; lag: number | null }[];
}

export const READY_TIMEOUT_MS = 2_000;

export function createHttpApp(deps: HttpDeps): Hono {
  const app = new Hono();
  deps.metrics.observeInboxes(() => inboxCounts(deps.sql));

  if (deps.auth) app.use("*", requireToken(deps.auth, deps.routes));

  app.get("/livez", (c) => c.text("ok\n"));

  app.all(`${INGEST_PREFIX}*`, async (c) => {
    const route = deps.routes?.find(new URL(c.req.url).pathname);
    if (!route) return c.text("no pipeline on this relay receives at this path\n", 404);
    return await route.handler(c.req.raw);
  });

  const ready = async (c: any) => {
    const problem = await readinessProblem(deps);
    return problem ? c.text(`not ready: ${problem}\n`, 503) : c.text("ready\n");
  };
  app.get("/readyz", ready);
  app.get("/health", ready);

  app.get("/metrics", async (c) => {
    const text = await deps.metrics.text();
    return c.body(text, 200, { "Content-Type": deps.metrics.contentType });
  });

  app.get("/api/v1/pipelines", async (c) => {
    try {
      return c.json({ relay: deps.relayId, relay_group_id: deps.relayGroupId, pipelines: await apiPipelines(deps) });
    } catch (error) {
      return c.json({ error: redactText(toError(error).message) }, 503);
    }
  });

  addConsoleRoutes(app, deps);

  app.get("/", async (c) => {
    let pipelines: ApiPipeline[] = [];
    let inboxes: InboxCounts[] = [];
    let unreadGroups: UnreadConsumerGroup[] = [];
    let walSlots: WalSlotStatus[] = [];
    let error: string | undefined;
    try {
      [pipelines, inboxes, unreadGroups, walSlots] = await Promise.all([
        apiPipelines(deps), inboxCounts(deps.sql), unreadConsumerGroups(deps.sql), walSlotStatus(deps.sql),
      ]);
    } catch (caught) {
      error = redactText(toError(caught).message);
    }
    return c.html(renderStatusPage({
      relayId: deps.relayId,
      relayGroupId: deps.relayGroupId,
      pipelines,
      inboxes,
      unreadGroups,
      walSlots,
      error,
      actionsEnabled: deps.auth !== undefined,
      notice: c.req.query("notice"),
    }));
  });

  return app;
}

async function apiPipelines(deps: HttpDeps): Promise<ApiPipeline[]> {
  const rows = await pipelineStatus(deps.sql, deps.relayGroupId);
  const owned = new Map(deps.owned().map((p) => [`${p.name}#${p.lane ?? 0}`, p.status]));
  return rows.map((row) => {
    const mine = owned.get(`${row.name}#${row.lane}`);
    const healthy = mine ? mine.healthy : row.healthy;
    return {
      ...row,
      // The owner's in-memory state is fresher than the last heartbeat.
      healthy,
      error_is_past: errorIsPast(healthy),
      last_success_at: mine?.lastSuccessAt ?? row.last_success_at,
      last_error_at: mine?.lastError ? mine.lastErrorAt ?? row.last_error_at : row.last_error_at,
      retry_attempt: mine ? mine.attempt : row.retry_attempt,
      circuit: mine ? mine.circuit : row.circuit,
      last_error: mine?.lastError ? redactText(mine.lastError) : row.last_error === null ? null : redactText(row.last_error),
      owned_here: mine !== undefined,
      throughput_per_second: Math.round(deps.metrics.throughput(row.name) * 100) / 100,
      history: deps.metrics.history(row.name).map((p) => ({ at: new Date(p.at).toISOString(), messages: p.messages, lag: p.lag })),
    };
  });
}

/** Every inbox of the database, from the tide.inbox_stats view (for the metrics and the status page). */
export async function inboxCounts(sql: Sql): Promise<InboxCounts[]> {
  const rows = await sql`
    SELECT inbox, pending, claimed, failed, dead_lettered, oldest_pending_at FROM tide.inbox_stats ORDER BY inbox`;
  return rows.map((row) => ({
    inbox: row.inbox,
    pending: Number(row.pending),
    claimed: Number(row.claimed),
    failed: Number(row.failed),
    dead_lettered: Number(row.dead_lettered),
    oldest_pending_at: row.oldest_pending_at,
  }));
}

async function readinessProblem(deps: HttpDeps): Promise<string | undefined> {
  if (!deps.coordinatorRunning()) return "the coordinator is not running";
  try {
    await Promise.race([
      deps.sql`SELECT 1`,
      new Promise((_, reject) => setTimeout(() => reject(new Error("no answer within 2 s")), READY_TIMEOUT_MS)),
    ]);
  } catch (error) {
    return `PostgreSQL is unreachable (${redactText(toError(error).message)})`;
  }
  return undefined;
}
