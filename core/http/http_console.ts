// The operations console's HTTP side: the dead-letter and trace pages, their JSON API, and the
// actions (pause, resume, replay, discard). Every action goes through core/http/operations.ts, the same
// functions `pg-tide dlq` and `pg-tide trace` call, and is logged with what it did.
//
// Actions change the catalog, so they need the relay's HTTP token: a relay started without
// --http-token serves the console read-only. A browser sends the token as HTTP Basic credentials,
// which it would also attach to a form another site posts here; so a request that a browser marks as
// coming from another site (Sec-Fetch-Site, else Origin) is refused.

import type { Context, Hono } from "hono";
import type { Sql } from "../db.ts";
import { toError } from "../errors.ts";
import type { HttpAuth } from "./http_auth.ts";
import type { Logger } from "../log.ts";
import {
  DEFAULT_DLQ_LIMIT,
  discardDeadLetter,
  DLQ_STATUSES,
  type DlqStatus,
  listDeadLetters,
  replayAllDeadLetters,
  replayDeadLetter,
  replayFailedInbox,
  setPipelineEnabled,
  traceEvent,
} from "./operations.ts";
import { redactText } from "../redact.ts";
import { renderDeadLetterPage, renderTracePage } from "./console_pages.ts";

export interface ConsoleDeps {
  sql: Sql;
  relayId: string;
  relayGroupId: string;
  auth?: HttpAuth;
  logger?: Logger;
}

export const ACTIONS_NEED_TOKEN = "console actions need the relay's HTTP token: start the relay with --http-token";

export function addConsoleRoutes(app: Hono, deps: ConsoleDeps): void {
  const { sql } = deps;
  const actionsEnabled = deps.auth !== undefined;

  app.get("/api/v1/dlq", async (c) => {
    const query = dlqQuery(c);
    if (typeof query === "string") return c.json({ error: query }, 400);
    return await readOr503(c, async () => ({ dead_letters: await listDeadLetters(sql, query) }));
  });

  app.get("/api/v1/trace", async (c) => {
    const key = c.req.query("key")?.trim();
    if (!key) return c.json({ error: 'give the event to look for: ?key=<outbox message id, <outbox>:<id>, or inbox event id>' }, 400);
    return await readOr503(c, async () => ({ key, places: await traceEvent(sql, key) }));
  });

  app.get("/dlq", async (c) => {
    const query = dlqQuery(c);
    const page = { relayId: deps.relayId, relayGroupId: deps.relayGroupId, actionsEnabled, notice: c.req.query("notice") };
    if (typeof query === "string") return c.html(renderDeadLetterPage({ ...page, query: {}, deadLetters: [], error: query }), 400);
    try {
      return c.html(renderDeadLetterPage({ ...page, query, deadLetters: await listDeadLetters(sql, query) }));
    } catch (error) {
      return c.html(renderDeadLetterPage({ ...page, query, deadLetters: [], error: redactText(toError(error).message) }), 503);
    }
  });

  app.get("/trace", async (c) => {
    const key = c.req.query("key")?.trim() ?? "";
    const page = { relayId: deps.relayId, relayGroupId: deps.relayGroupId, key };
    if (!key) return c.html(renderTracePage({ ...page, places: [] }));
    try {
      return c.html(renderTracePage({ ...page, places: await traceEvent(sql, key) }));
    } catch (error) {
      return c.html(renderTracePage({ ...page, places: [], error: redactText(toError(error).message) }), 503);
    }
  });

  const action = (path: string, what: string, run: (c: Context) => Promise<{ message: string; fields: Record<string, unknown> }>) => {
    app.post(path, async (c) => {
      if (!actionsEnabled) return answer(c, 403, ACTIONS_NEED_TOKEN);
      const crossSite = crossSiteProblem(c);
      if (crossSite) return answer(c, 403, crossSite);
      try {
        const { message, fields } = await run(c);
        deps.logger?.info(`console: ${what}`, { ...fields, action: what, from: c.req.header("user-agent")?.slice(0, 80) ?? "" });
        return answer(c, 200, message, fields);
      } catch (error) {
        const message = redactText(toError(error).message);
        deps.logger?.warn(`console: ${what} refused`, { action: what, error: message });
        return answer(c, (error as { code?: string }).code === "P0002" || /does not exist/.test(message) ? 404 : 409, message);
      }
    });
  };

  action("/api/v1/pipelines/:name/pause", "pause pipeline", async (c) => {
    const pipeline = c.req.param("name") ?? "";
    await setPipelineEnabled(sql, pipeline, false);
    return { message: `pipeline "${pipeline}" paused`, fields: { pipeline } };
  });
  action("/api/v1/pipelines/:name/resume", "resume pipeline", async (c) => {
    const pipeline = c.req.param("name") ?? "";
    await setPipelineEnabled(sql, pipeline, true);
    return { message: `pipeline "${pipeline}" resumed`, fields: { pipeline } };
  });
  action("/api/v1/pipelines/:name/dlq/replay", "replay all dead letters", async (c) => {
    const pipeline = c.req.param("name") ?? "";
    const count = await replayAllDeadLetters(sql, pipeline);
    return { message: `${count} dead letter(s) of "${pipeline}" requeued`, fields: { pipeline, count } };
  });
  action("/api/v1/dlq/:id/replay", "replay dead letter", async (c) => {
    const id = idParam(c.req.param("id") ?? "");
    await replayDeadLetter(sql, id);
    return { message: `dead letter ${id} requeued`, fields: { dead_letter: id } };
  });
  action("/api/v1/dlq/:id/discard", "discard dead letter", async (c) => {
    const id = idParam(c.req.param("id") ?? "");
    await discardDeadLetter(sql, id);
    return { message: `dead letter ${id} discarded`, fields: { dead_letter: id } };
  });
  action("/api/v1/inboxes/:name/replay-failed", "replay failed inbox messages", async (c) => {
    const inbox = c.req.param("name") ?? "";
    const count = await replayFailedInbox(sql, inbox);
    return { message: `${count} failed message(s) of inbox "${inbox}" replayed`, fields: { inbox, count } };
  });
}

function dlqQuery(c: Context): { pipeline?: string; status: DlqStatus; limit: number } | string {
  const status = (c.req.query("status") || "open") as DlqStatus;
  if (!DLQ_STATUSES.includes(status)) return `status must be one of ${DLQ_STATUSES.join(", ")} (got "${status}")`;
  const limitText = c.req.query("limit") || String(DEFAULT_DLQ_LIMIT);
  const limit = Number(limitText);
  if (!Number.isInteger(limit) || limit < 1 || limit > 10_000) return `limit must be an integer from 1 to 10000 (got "${limitText}")`;
  return { pipeline: c.req.query("pipeline") || undefined, status, limit };
}

function idParam(text: string): number {
  if (!/^[0-9]{1,15}$/.test(text)) throw Object.assign(new Error(`a dead letter id is a number (got "${text.slice(0, 40)}")`), { code: "P0002" });
  return Number(text);
}

async function readOr503(c: Context, read: () => Promise<object>): Promise<Response> {
  try {
    return c.json(await read());
  } catch (error) {
    return c.json({ error: redactText(toError(error).message) }, 503);
  }
}

/**
 * A form posted from the console gets a redirect back (with the outcome as a notice); an API client
 * gets JSON.
 */
function answer(c: Context, status: 200 | 403 | 404 | 409, message: string, fields: Record<string, unknown> = {}): Response {
  const form = /application\/x-www-form-urlencoded|multipart\/form-data/.test(c.req.header("content-type") ?? "");
  if (form) {
    const back = c.req.query("return") ?? "/";
    // Only a path on this relay: never an open redirect.
    const target = /^\/(?![/\\])/.test(back) ? back : "/";
    const url = new URL(target, "http://relay");
    url.searchParams.set("notice", status === 200 ? message : `refused: ${message}`);
    return c.redirect(url.pathname + url.search, 303);
  }
  return status === 200 ? c.json({ ok: true, message, ...fields }) : c.json({ error: message }, status);
}

function crossSiteProblem(c: Context): string | undefined {
  const site = c.req.header("sec-fetch-site");
  if (site !== undefined) {
    return site === "same-origin" || site === "none" ? undefined : `a ${site} request cannot act on this relay`;
  }
  const origin = c.req.header("origin");
  if (origin === undefined || origin === "null") return origin === "null" ? "a request from an opaque origin cannot act on this relay" : undefined;
  try {
    if (new URL(origin).host === c.req.header("host")) return undefined;
  } catch {
    // an unparsable Origin is refused below
  }
  return `a request from ${origin.slice(0, 80)} cannot act on this relay`;
}
