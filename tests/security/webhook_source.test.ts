// The webhook source against a sender who captured one signed request: replaying it with a fresh
// id header (Idempotency-Key, webhook-id, ce-id, X-GitHub-Delivery) adds no row, because with a
// signature the event id comes only from what the signature covers; a signed timestamp outside the
// tolerance, or one that is not a number, is refused; an unsigned route must be asked for and is
// announced with a warning; credentials the sender or a proxy adds are not stored. A real relay,
// logged in as a LOGIN role that holds only tide_relay, and real HTTP requests.

import { afterAll, beforeAll, describe, expect, it, setDefaultTimeout } from "bun:test";
import { createHmac } from "node:crypto";
import type { Relay } from "../../core/relay.ts";
import { webhookSource } from "../../plugins/webhook/source.ts";
import { validateConfig } from "../support/plugins.ts";
import { createTestDatabase, loginRole, type TestDatabase } from "../support/postgres.ts";
import { captureLogger, startRelay, waitFor } from "../support/relay.ts";

setDefaultTimeout(60_000);

const HMAC_SECRET = "ingest-hmac-secret";
const STRIPE_SECRET = "whsec_stripe_ingest_test";
const GITHUB_SECRET = "github-ingest-secret";
const SW_KEY = Buffer.from("standard-webhooks-ingest-key-32b");
const SW_SECRET = `whsec_${SW_KEY.toString("base64")}`;
const TOLERANCE_SECONDS = 300;

let db: TestDatabase;
let relay: Relay;
let base: string;
const log = captureLogger();

const now = () => Math.floor(Date.now() / 1000);
const hmacHex = (key: string | Buffer, data: string) => createHmac("sha256", key).update(data).digest("hex");

const routes = new Map<string, Promise<unknown>>();

/** POSTs to /ingest/<path> once its pipeline runs here (GET is then 405, not 404). */
async function post(path: string, body: string, headers: Record<string, string>): Promise<Response> {
  if (!routes.has(path)) {
    routes.set(path, waitFor(`the route /ingest/${path}`, async () => (await fetch(`${base}/ingest/${path}`)).status === 405));
  }
  await routes.get(path);
  return await fetch(`${base}/ingest/${path}`, { method: "POST", headers: { "content-type": "application/json", ...headers }, body });
}

async function rows(inbox: string) {
  return await db.sql.unsafe(`SELECT event_id, payload, headers FROM tide."${inbox}_inbox" ORDER BY id`);
}

/** Signed as the "stamped" source expects: HMAC of "<timestamp>.<body>" in X-Sig. */
function stamped(body: string, t: string): Record<string, string> {
  return { "x-tide-timestamp": t, "x-sig": `sha256=${hmacHex(HMAC_SECRET, `${t}.${body}`)}` };
}

/** The id headers a replayer might add or change, each with a fresh value. */
function freshIdHeaders(n: number): Record<string, string>[] {
  return [
    { "idempotency-key": `replay-${n}` },
    { "webhook-id": `msg_replay_${n}` },
    { "ce-id": `ce-replay-${n}`, "ce-specversion": "1.0" },
    { "x-github-delivery": `00000000-0000-0000-0000-00000000000${n}` },
  ];
}

beforeAll(async () => {
  db = await createTestDatabase();
  const relayRole = await loginRole(db, "tide_relay", "ingest_relay");
  const sources: [string, Record<string, unknown>][] = [
    ["hmac", { scheme: "hmac-sha256", secret: HMAC_SECRET }],
    ["stamped", { scheme: "hmac-sha256", secret: HMAC_SECRET, header: "X-Sig", timestamp_header: "X-Tide-Timestamp", tolerance_seconds: TOLERANCE_SECONDS }],
    ["stripe", { scheme: "stripe", secret: STRIPE_SECRET }],
    ["github", { scheme: "github", secret: GITHUB_SECRET }],
    ["standard", { scheme: "standard-webhooks", secret: SW_SECRET }],
  ];
  for (const [name, signature] of sources) {
    await db.sql`SELECT tide.inbox_create(${`${name}_events`})`;
    await db.sql`SELECT tide.relay_set_inbox(${`${name}-in`}, ${`${name}_events`},
      ${db.sql.json({ source_type: "webhook", path: name, signature } as any)})`;
  }
  await db.sql`SELECT tide.inbox_create('open_events')`;
  await db.sql`SELECT tide.relay_set_inbox('open-in', 'open_events', ${db.sql.json({ source_type: "webhook", path: "open", allow_unsigned: true })})`;
  relay = await startRelay(relayRole.url, { metricsAddr: "127.0.0.1:0", logger: log.logger });
  base = `http://127.0.0.1:${relay.httpPort}`;
});

afterAll(async () => {
  await relay?.stop();
  await db.drop();
});

describe("a captured signed request, replayed", () => {
  it("with a fresh id header adds no row (plain hmac-sha256: the signed body is the id)", async () => {
    const body = JSON.stringify({ transfer: "t-1", amount: 100 });
    const signature = { "x-tide-signature": `sha256=${hmacHex(HMAC_SECRET, body)}` };
    expect((await post("hmac", body, signature)).status).toBe(200);
    for (const [n, fresh] of freshIdHeaders(1).entries()) {
      expect((await post("hmac", body, { ...signature, ...fresh })).status).toBe(200);
      expect(await rows("hmac_events"), `replay ${n}`).toHaveLength(1);
    }
  });

  it("with a fresh id header adds no row (Stripe: the signed event id is the id)", async () => {
    const body = JSON.stringify({ id: "evt_replayed", object: "event", type: "charge.succeeded" });
    const t = now();
    const signature = { "stripe-signature": `t=${t},v1=${hmacHex(STRIPE_SECRET, `${t}.${body}`)}` };
    expect((await post("stripe", body, signature)).status).toBe(200);
    for (const fresh of freshIdHeaders(2)) expect((await post("stripe", body, { ...signature, ...fresh })).status).toBe(200);
    expect((await rows("stripe_events")).map((r) => r.event_id)).toEqual(["evt_replayed"]);
  });

  it("with a fresh X-GitHub-Delivery or other id header adds no row (GitHub signs only the body)", async () => {
    const body = JSON.stringify({ action: "created", sponsorship: { id: 7 } });
    const signature = {
      "x-hub-signature-256": `sha256=${hmacHex(GITHUB_SECRET, body)}`,
      "x-github-delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
    };
    expect((await post("github", body, signature)).status).toBe(200);
    for (const fresh of freshIdHeaders(3)) expect((await post("github", body, { ...signature, ...fresh })).status).toBe(200);
    expect(await rows("github_events")).toHaveLength(1);
  });

  it("with a fresh Idempotency-Key or ce-id adds no row, and a changed webhook-id breaks the signature (Standard Webhooks)", async () => {
    const body = JSON.stringify({ type: "invoice.paid" });
    const t = String(now());
    const signed = {
      "webhook-id": "msg_original",
      "webhook-timestamp": t,
      "webhook-signature": `v1,${createHmac("sha256", SW_KEY).update(`msg_original.${t}.${body}`).digest("base64")}`,
    };
    expect((await post("standard", body, signed)).status).toBe(200);
    expect((await post("standard", body, { ...signed, "idempotency-key": "replay-4" })).status).toBe(200);
    expect((await post("standard", body, { ...signed, "ce-id": "ce-replay-4" })).status).toBe(200);
    expect((await post("standard", body, { ...signed, "webhook-id": "msg_replay_4" })).status).toBe(401);
    expect((await rows("standard_events")).map((r) => r.event_id)).toEqual(["msg_original"]);
  });
});

describe("signed timestamps", () => {
  it("hmac-sha256 with timestamp_header: accepts a fresh signed timestamp, refuses one outside the tolerance or not signed", async () => {
    const body = JSON.stringify({ reading: 1 });
    expect((await post("stamped", body, stamped(body, String(now())))).status).toBe(200);

    const old = await post("stamped", body, stamped(body, String(now() - TOLERANCE_SECONDS - 60)));
    expect(old.status).toBe(401);
    expect(await old.text()).toContain("X-Tide-Timestamp is outside the tolerance of 300 s");
    const future = await post("stamped", body, stamped(body, String(now() + TOLERANCE_SECONDS + 60)));
    expect(future.status).toBe(401);
    // The body's signature alone (as without timestamp_header) does not cover the timestamp.
    const unsignedStamp = { "x-tide-timestamp": String(now()), "x-sig": `sha256=${hmacHex(HMAC_SECRET, body)}` };
    expect((await post("stamped", body, unsignedStamp)).status).toBe(401);
    expect((await post("stamped", body, { "x-sig": `sha256=${hmacHex(HMAC_SECRET, body)}` })).status).toBe(401);
    expect(await rows("stamped_events")).toHaveLength(1);
  });

  it("refuses a timestamp that is not a number, though the signature over it is valid", async () => {
    const body = JSON.stringify({ id: "evt_nan", object: "event" });
    const stripe = await post("stripe", body, { "stripe-signature": `t=soon,v1=${hmacHex(STRIPE_SECRET, `soon.${body}`)}` });
    expect(stripe.status).toBe(401);
    expect(await stripe.text()).toContain('must be unix seconds (got "soon")');

    const swBody = JSON.stringify({ type: "nan" });
    const swSignature = createHmac("sha256", SW_KEY).update(`msg_nan.NaN.${swBody}`).digest("base64");
    const standard = await post("standard", swBody, { "webhook-id": "msg_nan", "webhook-timestamp": "NaN", "webhook-signature": `v1,${swSignature}` });
    expect(standard.status).toBe(401);

    const stamp = await post("stamped", body, stamped(body, "later"));
    expect(stamp.status).toBe(401);
    expect((await rows("stripe_events")).map((r) => r.event_id)).not.toContain("evt_nan");
    expect((await rows("standard_events")).map((r) => r.event_id)).not.toContain("msg_nan");
  });
});

describe("unsigned sources", () => {
  it("are refused at validation unless allow_unsigned is set, with a message saying so", async () => {
    const result = await validateConfig(webhookSource, { path: "open" });
    expect(result.issues).toHaveLength(1);
    expect(result.issues![0]!.path).toEqual(["signature"]);
    expect(result.issues![0]!.message).toContain('set "allow_unsigned": true');
    expect((await validateConfig(webhookSource, { path: "open", allow_unsigned: true })).issues).toBeUndefined();
  });

  it("are refused by a running relay, which names allow_unsigned in the pipeline's error and serves no route", async () => {
    await db.sql`SELECT tide.inbox_create('bare_events')`;
    await db.sql`SELECT tide.relay_set_inbox('bare-in', 'bare_events', ${db.sql.json({ source_type: "webhook", path: "bare" })})`;
    const state = await waitFor("bare-in's error", async () => {
      const [row] = await db.sql`SELECT last_error FROM tide.pipeline_status WHERE pipeline = 'bare-in' AND last_error IS NOT NULL`;
      return row;
    });
    expect(state.last_error).toContain("allow_unsigned");
    expect((await fetch(`${base}/ingest/bare`, { method: "POST", body: "{}" })).status).toBe(404);
  });

  it("log a warning when they start, naming the pipeline and the route", async () => {
    await post("open", "{}", { "idempotency-key": "warning-0001" });
    const warning = await waitFor("the allow_unsigned warning", () =>
      log.lines.map((line) => JSON.parse(line)).find((line) => line.level === "warn" && line.message.includes("allow_unsigned")));
    expect(warning.message).toContain('webhook source "open-in"');
    expect(warning.message).toContain("/ingest/open");
  });
});

describe("stored headers", () => {
  it("keep what the sender said, but no credential the sender or a proxy added", async () => {
    const credentials = {
      authorization: "Bearer sender-token",
      "proxy-authorization": "Basic cHJveHk6c2VjcmV0",
      "x-api-key": "ak_live_51Hx",
      "api-key": "ak_other",
      cookie: "session=abc",
      "x-auth-token": "tok_123",
      "x-amz-security-token": "FQoGZXIvYXdz",
      "x-shopify-hmac-sha256": "c2lnbmF0dXJl",
    };
    const body = JSON.stringify({ order: "headers-1" });
    const signature = { "x-tide-signature": `sha256=${hmacHex(HMAC_SECRET, body)}` };
    const response = await post("hmac", body, { ...credentials, ...signature, "x-request-id": "req-1", "user-agent": "sender/1.0" });
    expect(response.status).toBe(200);
    const row = (await rows("hmac_events")).find((r) => r.payload.order === "headers-1")!;
    expect(row.headers).toMatchObject({ "x-request-id": "req-1", "user-agent": "sender/1.0" });
    for (const name of Object.keys(credentials)) expect(row.headers[name], name).toBeUndefined();
  });

  it("keep no signature of a signed source, under its configured header name or a known one", async () => {
    const body = JSON.stringify({ reading: 2 });
    const t = String(now());
    const response = await post("stamped", body, { ...stamped(body, t), "x-hub-signature-256": "sha256=00" });
    expect(response.status).toBe(200);
    const stored = (await rows("stamped_events")).find((r) => r.payload.reading === 2)!;
    expect(stored.headers["x-sig"]).toBeUndefined();
    expect(stored.headers["x-hub-signature-256"]).toBeUndefined();
    expect(stored.headers["x-tide-timestamp"]).toBe(t);
  });
});
