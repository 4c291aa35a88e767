// The operations console, clicked through in headless Chromium against a real relay and PostgreSQL:
// pipelines with their config version, last success and pause/resume; dead letters browsed,
// replayed and discarded; "where is my event?"; an inbox's failed messages replayed. Actions need
// the relay's HTTP token and are logged.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { createHttpApp } from "../../core/http/http.ts";
import { ACTIONS_NEED_TOKEN } from "../../core/http/http_console.ts";
import { RelayMetrics } from "../../core/http/metrics.ts";
import type { Relay } from "../../core/relay.ts";
import { type Browser, CHROMIUM, launchBrowser } from "../support/browser.ts";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { captureLogger, startRelay, waitFor } from "../support/relay.ts";
import { REQUIRE_SERVICES } from "../support/services.ts";

const TOKEN = "console-test-token-0123456789";
const AUTH = { authorization: `Bearer ${TOKEN}` };

let db: TestDatabase;
beforeAll(async () => {
  db = await createTestDatabase();
});
afterAll(() => db.drop());

/** A webhook target that refuses messages marked poison with a 422 until the test accepts them. */
function endpoint() {
  const state = { acceptPoison: false, received: [] as any[] };
  const server = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(request) {
      const body = await request.json();
      if (body.poison && !state.acceptPoison) return new Response("cannot process this order", { status: 422 });
      state.received.push(body);
      return new Response(null, { status: 204 });
    },
  });
  return { state, url: `http://127.0.0.1:${server.port}/`, stop: () => server.stop(true) };
}

describe("console actions over HTTP", () => {
  it("are refused when the relay has no HTTP token: the console is read-only", async () => {
    await db.sql`SELECT tide.outbox_create('readonly')`;
    await db.sql`SELECT tide.relay_set_outbox('readonly', 'readonly', 'stdout', '{}'::jsonb)`;
    const app = createHttpApp({
      sql: db.sql, metrics: new RelayMetrics(), relayGroupId: "default", relayId: "test",
      coordinatorRunning: () => true, owned: () => [],
    });
    const response = await app.request("/api/v1/pipelines/readonly/pause", { method: "POST" });
    expect(response.status).toBe(403);
    expect((await response.json()).error).toBe(ACTIONS_NEED_TOKEN);
    const [{ enabled }] = await db.sql`SELECT enabled FROM tide.relay_pipelines WHERE name = 'readonly'`;
    expect(enabled).toBe(true);
    const page = await (await app.request("/")).text();
    expect(page).toContain("Read-only: start the relay with --http-token");
    expect(page).toMatch(/<button disabled title="needs the relay's --http-token">Pause<\/button>/);
  });

  it("need the token, refuse a form another site posts, and answer API clients in JSON", async () => {
    const { logger, lines } = captureLogger();
    const app = createHttpApp({
      sql: db.sql, metrics: new RelayMetrics(), relayGroupId: "default", relayId: "test",
      coordinatorRunning: () => true, owned: () => [], auth: { token: TOKEN, scope: "api" }, logger,
    });
    expect((await app.request("/api/v1/pipelines/readonly/pause", { method: "POST" })).status).toBe(401);
    const crossSite = await app.request("/api/v1/pipelines/readonly/pause", {
      method: "POST",
      headers: { ...AUTH, "sec-fetch-site": "cross-site", "content-type": "application/x-www-form-urlencoded" },
    });
    expect(crossSite.status).toBe(303);
    const location = new URL(crossSite.headers.get("location")!, "http://relay");
    expect(location.pathname).toBe("/");
    expect(location.searchParams.get("notice")).toBe("refused: a cross-site request cannot act on this relay");
    const otherOrigin = await app.request("http://relay.local/api/v1/pipelines/readonly/pause", {
      method: "POST",
      headers: { ...AUTH, origin: "http://evil.example", host: "relay.local" },
    });
    expect(otherOrigin.status).toBe(403);
    expect((await db.sql`SELECT enabled FROM tide.relay_pipelines WHERE name = 'readonly'`)[0].enabled).toBe(true);

    const paused = await app.request("/api/v1/pipelines/readonly/pause", { method: "POST", headers: AUTH });
    expect(paused.status).toBe(200);
    expect(await paused.json()).toEqual({ ok: true, message: 'pipeline "readonly" paused', pipeline: "readonly" });
    expect((await db.sql`SELECT enabled FROM tide.relay_pipelines WHERE name = 'readonly'`)[0].enabled).toBe(false);
    const logged = lines.map((l) => JSON.parse(l)).find((l) => l.message === "console: pause pipeline");
    expect(logged).toMatchObject({ level: "info", pipeline: "readonly", action: "pause pipeline" });

    const missing = await app.request("/api/v1/dlq/999999/replay", { method: "POST", headers: AUTH });
    expect(missing.status).toBe(404);
    expect((await missing.json()).error).toContain("dead letter 999999 does not exist");
    const badStatus = await app.request("/api/v1/dlq?status=lost", { headers: AUTH });
    expect(badStatus.status).toBe(400);
    expect((await badStatus.json()).error).toBe('status must be one of open, requeued, redelivered, resolved, all (got "lost")');
  });
});

if (!CHROMIUM && REQUIRE_SERVICES) throw new Error("chromium is not installed (TIDE_REQUIRE_SERVICES=1)");
if (!CHROMIUM) console.warn("skipping the console browser tests: chromium is not installed");

describe.skipIf(!CHROMIUM)("the console in Chromium", () => {
  let relay: Relay;
  let browser: Browser;
  let base: string;
  const hook = endpoint();
  const log = captureLogger();
  beforeAll(async () => {
    relay = await startRelay(db.url, { metricsAddr: "127.0.0.1:0", httpAuth: { token: TOKEN, scope: "api" }, logger: log.logger });
    base = `http://127.0.0.1:${relay.httpPort}`;
    browser = await launchBrowser();
    await browser.setHeaders(AUTH);
    await db.sql`SELECT tide.outbox_create('orders')`;
    await db.sql`SELECT tide.relay_set_outbox('orders-hook', 'orders', 'webhook', ${db.sql.json({ url: hook.url })})`;
    expect((await db.sql`SELECT tide.relay_wait_applied('orders-hook', '20 seconds') AS ok`)[0].ok).toBe(true);
  });
  afterAll(async () => {
    await browser?.close();
    await relay?.stop();
    hook.stop();
  });

  const text = (selector: string) => browser.evaluate<string>(`document.querySelector(${JSON.stringify(selector)})?.innerText ?? ""`);

  it("shows each pipeline's state, owner, config version and last success, with time axes on its charts", async () => {
    await db.sql`SELECT tide.outbox_publish('orders', '{"n": 1}'::jsonb)`;
    await waitFor("the delivery", () => hook.state.received.length === 1);
    await browser.open(`${base}/`);
    const row = await text('tr[data-pipeline="orders-hook"]');
    expect(row).toContain("healthy");
    expect(row).toContain(relay.relayId);
    expect(row).toContain("v1");
    expect(row).toMatch(/\d+ s ago/); // last success
    // The throughput chart appears with the first 10-second sample; its time axis is labelled in UTC.
    const ticks = await waitFor("a chart with a time axis", async () => {
      await browser.open(`${base}/`);
      const labels = await browser.evaluate<string[]>(`[...document.querySelectorAll("svg .x-tick")].map((t) => t.textContent)`);
      return labels.length > 0 && labels;
    }, 40_000);
    for (const tick of ticks) expect(tick).toMatch(/^\d\d:\d\d:\d\d$/);
    expect(await browser.evaluate<string>(`document.querySelector("svg")?.getAttribute("aria-label")`)).toBe("messages/s over time (UTC)");
  }, 60_000);

  it("pauses and resumes a pipeline, logging each action", async () => {
    await browser.open(`${base}/`);
    await browser.clickAndWait('tr[data-pipeline="orders-hook"] form[action*="/pause"] button');
    expect(await text(".notice")).toBe('pipeline "orders-hook" paused');
    expect((await db.sql`SELECT enabled FROM tide.relay_pipelines WHERE name = 'orders-hook'`)[0].enabled).toBe(false);
    expect((await db.sql`SELECT tide.relay_wait_applied('orders-hook', '20 seconds') AS ok`)[0].ok).toBe(true);
    await browser.open(`${base}/`);
    expect(await text('tr[data-pipeline="orders-hook"]')).toContain("disabled");

    await browser.clickAndWait('tr[data-pipeline="orders-hook"] form[action*="/resume"] button');
    expect(await text(".notice")).toBe('pipeline "orders-hook" resumed');
    expect((await db.sql`SELECT enabled FROM tide.relay_pipelines WHERE name = 'orders-hook'`)[0].enabled).toBe(true);
    const actions = log.lines.map((l) => JSON.parse(l)).filter((l) => l.message?.startsWith("console: "));
    expect(actions.map((l) => [l.message, l.pipeline])).toEqual([
      ["console: pause pipeline", "orders-hook"],
      ["console: resume pipeline", "orders-hook"],
    ]);
  });

  it("browses dead letters with payload, headers, error and attempts; discards one and replays another", async () => {
    hook.state.acceptPoison = false;
    // Payload text kept exactly: key order and spacing as published.
    await db.sql`SELECT tide.outbox_publish('orders', 'orders.created', '{"poison": true, "n": 2}'::jsonb, '{"x-tenant": "acme"}'::jsonb)`;
    await db.sql`SELECT tide.outbox_publish('orders', '{"poison": true, "n": 3}'::jsonb)`;
    const dead = await waitFor("two dead letters", async () => {
      const rows = await db.sql`SELECT id, message_id FROM tide.relay_dlq WHERE pipeline = 'orders-hook' AND status = 'open' ORDER BY id`;
      return rows.length === 2 && rows;
    });
    await browser.open(`${base}/`);
    expect(await text('tr[data-pipeline="orders-hook"] td:nth-child(10)')).toBe("2");
    await browser.clickAndWait('tr[data-pipeline="orders-hook"] td:nth-child(10) a');
    expect(await browser.evaluate<string>("location.pathname + location.search")).toBe("/dlq?pipeline=orders-hook");

    const first = `tr[data-dead-letter="${dead[0].id}"]`;
    const [{ payload: stored }] = await db.sql`SELECT payload::text AS payload FROM tide.outbox_messages WHERE id = ${dead[0].message_id}`;
    expect(await browser.evaluate<string>(`document.querySelector('${first} pre.payload').textContent`)).toBe(stored);
    expect(JSON.parse(await browser.evaluate<string>(`document.querySelector('${first} pre.headers').textContent`))).toMatchObject({ "x-tenant": "acme" });
    const row = await text(first);
    expect(row).toContain(`orders:${dead[0].message_id}`);
    expect(row).toContain("orders.created");
    expect(row).toContain("422");
    expect(row).toMatch(/\t1\t/); // attempts

    await browser.clickAndWait(`${first} form[action$="/discard?return=%2Fdlq%3Fpipeline%3Dorders-hook%26status%3Dopen"] button`);
    expect(await text(".notice")).toBe(`dead letter ${dead[0].id} discarded`);
    expect((await db.sql`SELECT status FROM tide.relay_dlq WHERE id = ${dead[0].id}`)[0].status).toBe("resolved");
    expect(await browser.evaluate<number>(`document.querySelectorAll("tr[data-dead-letter]").length`)).toBe(1);

    hook.state.acceptPoison = true;
    await browser.clickAndWait(`tr[data-dead-letter="${dead[1].id}"] form[action*="/replay"] button`);
    expect(await text(".notice")).toBe(`dead letter ${dead[1].id} requeued`);
    await waitFor("the replayed message", () => hook.state.received.some((b) => b.n === 3));
    await waitFor("the dead letter marked redelivered", async () =>
      (await db.sql`SELECT status FROM tide.relay_dlq WHERE id = ${dead[1].id}`)[0].status === "redelivered");
    expect(hook.state.received.some((b) => b.n === 2)).toBe(false); // the discarded one stays undelivered
  }, 60_000);

  it("replays every open dead letter of a pipeline at once", async () => {
    hook.state.acceptPoison = false;
    for (const n of [4, 5]) await db.sql`SELECT tide.outbox_publish('orders', ${db.sql.json({ poison: true, n })})`;
    await waitFor("two more dead letters", async () =>
      (await db.sql`SELECT count(*)::int AS c FROM tide.relay_dlq WHERE pipeline = 'orders-hook' AND status = 'open'`)[0].c === 2);
    hook.state.acceptPoison = true;
    await browser.open(`${base}/dlq?pipeline=orders-hook`);
    await browser.clickAndWait('form[action^="/api/v1/pipelines/orders-hook/dlq/replay"] button');
    expect(await text(".notice")).toBe('2 dead letter(s) of "orders-hook" requeued');
    await waitFor("both replayed", () => [4, 5].every((n) => hook.state.received.some((b) => b.n === n)));
  }, 60_000);

  it("finds an event: per consumer group for an outbox message, processed or failed for an inbox event", async () => {
    // A second pipeline on the same outbox, into an inbox, and paused: its group has not delivered.
    await db.sql`SELECT tide.inbox_create('orders_in')`;
    await db.sql`SELECT tide.relay_set_outbox('orders-copy', 'orders', 'inbox', ${db.sql.json({ inbox: "orders_in" })})`;
    await waitFor("the copy to catch up", async () =>
      (await db.sql`SELECT count(*)::int AS c FROM tide.outbox_pending WHERE outbox_name = 'orders'`)[0].c === 0 ||
      (await db.sql`SELECT tide.consumer_group_lag('orders', 'orders-copy') AS lag`)[0].lag === 0n);
    await db.sql`SELECT tide.relay_disable('orders-copy')`;
    expect((await db.sql`SELECT tide.relay_wait_applied('orders-copy', '20 seconds') AS ok`)[0].ok).toBe(true);
    const [{ id }] = await db.sql`SELECT max(id) AS id FROM tide.outbox_messages WHERE outbox = 'orders'`;
    const [{ outbox_publish: fresh }] = await db.sql`SELECT tide.outbox_publish('orders', '{"n": 6}'::jsonb)`;
    await waitFor("the fresh message's delivery", () => hook.state.received.some((b) => b.n === 6));

    await browser.open(`${base}/`);
    await browser.evaluate(`document.querySelector('nav input[name="key"]').value = "orders:${fresh}"`);
    await browser.clickAndWait("nav form button");
    const states = () => browser.evaluate<string[][]>(
      `[...document.querySelectorAll("#trace tbody tr")].map((r) => [r.dataset.kind, r.children[2].innerText, r.dataset.state])`,
    );
    expect(await states()).toEqual([["outbox", "orders-copy", "pending"], ["outbox", "orders-hook", "delivered"]]);

    // An earlier message reached the inbox through the copy; the application failed it once.
    await db.sql`SELECT tide.inbox_mark_failed('orders_in', ${`orders:${id}`}, 'the order service timed out')`;
    await browser.open(`${base}/trace?key=${encodeURIComponent(`orders:${id}`)}`);
    const rows = await states();
    expect(rows).toContainEqual(["inbox", `orders:${id}`, "failed"]);
    expect(rows).toContainEqual(["outbox", "orders-copy", "delivered"]);
    expect(await text('#trace tr[data-kind="inbox"]')).toContain("the order service timed out");

    await browser.open(`${base}/trace?key=orders%3A99999999`);
    expect(await states()).toEqual([["outbox", "", "not found"]]);
  }, 60_000);

  it("shows an inbox's failed messages and replays them", async () => {
    await browser.open(`${base}/`);
    expect(await text('tr[data-inbox="orders_in"] td:nth-child(4)')).toBe("1");
    await browser.clickAndWait('tr[data-inbox="orders_in"] form button');
    expect(await text(".notice")).toBe('1 failed message(s) of inbox "orders_in" replayed');
    expect(await text('tr[data-inbox="orders_in"] td:nth-child(4)')).toBe("0");
    const [counts] = await db.sql`SELECT failed FROM tide.inbox_stats WHERE inbox = 'orders_in'`;
    expect(Number(counts.failed)).toBe(0);
  });
});
