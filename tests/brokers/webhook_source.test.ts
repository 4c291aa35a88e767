// The webhook source (plugins/webhook/source.ts) on a running relay: POST /ingest/<path> on the
// relay's HTTP server, signed the way Stripe, GitHub, Standard Webhooks or a plain HMAC sender signs,
// is answered 200 only once the row is committed in the inbox; a bad signature is 401, an oversize
// body 413, and a repeated event is one row. Signatures are computed here with node:crypto, as the
// senders compute them. No broker involved. (Replays, unsigned sources and stored headers are
// specified in tests/security/webhook_source.test.ts.)

import { afterAll, beforeAll, describe, expect, it, setDefaultTimeout } from "bun:test";
import { createHash, createHmac } from "node:crypto";
import type { Relay } from "../../core/relay.ts";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { startRelay, waitFor } from "../support/relay.ts";

setDefaultTimeout(30_000);

const STRIPE_SECRET = "whsec_stripe_test_5f3c1e0d9a";
const GITHUB_SECRET = "github-hook-secret";
// Standard Webhooks: whsec_ + base64 of the key bytes.
const SW_KEY = Buffer.from("standard-webhooks-key-32-bytes!!");
const SW_SECRET = `whsec_${SW_KEY.toString("base64")}`;
const HMAC_SECRET = "plain-hmac-secret";
const SMALL_LIMIT = 512;

let db: TestDatabase;
let relay: Relay;
let base: string;

const now = () => Math.floor(Date.now() / 1000);
const hmacHex = (key: string | Buffer, data: string) => createHmac("sha256", key).update(data).digest("hex");

function stripeSignature(body: string, t = now(), secret = STRIPE_SECRET): string {
  return `t=${t},v1=${hmacHex(secret, `${t}.${body}`)}`;
}

function standardWebhookHeaders(id: string, body: string, t = now()): Record<string, string> {
  const signature = createHmac("sha256", SW_KEY).update(`${id}.${t}.${body}`).digest("base64");
  return { "webhook-id": id, "webhook-timestamp": String(t), "webhook-signature": `v1,${signature}` };
}

async function post(path: string, body: string | ReadableStream, headers: Record<string, string> = {}): Promise<Response> {
  return await fetch(`${base}/ingest/${path}`, {
    method: "POST",
    headers: { "content-type": "application/json", ...headers },
    body,
  });
}

async function rows(inbox: string) {
  return await db.sql.unsafe(`SELECT event_id, source, payload, headers FROM tide."${inbox}_inbox" ORDER BY id`);
}

function stripeEvent(id: string, amount = 2000): string {
  return JSON.stringify({ id, object: "event", type: "payment_intent.succeeded", data: { object: { id: `pi_${id}`, amount } } });
}

describe("webhook source", () => {
  beforeAll(async () => {
    db = await createTestDatabase();
    relay = await startRelay(db.url, { metricsAddr: "127.0.0.1:0" });
    base = `http://127.0.0.1:${relay.httpPort}`;
    await db.sql`SELECT tide.inbox_create('payments')`;
    await db.sql`SELECT tide.inbox_create('github_events')`;
    await db.sql`SELECT tide.inbox_create('sw_events')`;
    await db.sql`SELECT tide.inbox_create('hmac_events')`;
    await db.sql`SELECT tide.inbox_create('open_events')`;
    await db.sql`SELECT tide.relay_set_inbox('stripe-in', 'payments',
      ${db.sql.json({ source_type: "webhook", path: "stripe", signature: { scheme: "stripe", secret: STRIPE_SECRET } })})`;
    await db.sql`SELECT tide.relay_set_inbox('github-in', 'github_events',
      ${db.sql.json({ source_type: "webhook", path: "github", signature: { scheme: "github", secret: GITHUB_SECRET } })})`;
    await db.sql`SELECT tide.relay_set_inbox('sw-in', 'sw_events',
      ${db.sql.json({ source_type: "webhook", path: "hooks/standard", signature: { scheme: "standard-webhooks", secret: SW_SECRET } })})`;
    await db.sql`SELECT tide.relay_set_inbox('hmac-in', 'hmac_events',
      ${db.sql.json({ source_type: "webhook", path: "plain", max_body_bytes: SMALL_LIMIT, signature: { scheme: "hmac-sha256", secret: HMAC_SECRET } })})`;
    await db.sql`SELECT tide.relay_set_inbox('open-in', 'open_events',
      ${db.sql.json({ source_type: "webhook", path: "open", allow_unsigned: true })})`;
    // A route exists once its pipeline runs on this relay: GET is then 405, not 404.
    for (const path of ["stripe", "github", "hooks/standard", "plain", "open"]) {
      await waitFor(`the route /ingest/${path}`, async () => (await fetch(`${base}/ingest/${path}`)).status === 405);
    }
  });
  afterAll(async () => {
    await relay?.stop();
    await db?.drop();
  });

  describe("stripe", () => {
    it("answers 200 once the event is in the inbox, with the Stripe event id as event_id", async () => {
      const body = stripeEvent("evt_1OaB2c");
      const response = await post("stripe", body, { "stripe-signature": stripeSignature(body) });
      expect(response.status).toBe(200);
      expect(await response.json()).toEqual({ status: "accepted", event_id: "evt_1OaB2c" });
      // No waiting: the answer came after the commit.
      const [row] = await rows("payments");
      expect(row.event_id).toBe("evt_1OaB2c");
      expect(row.source).toBe("webhook:/ingest/stripe");
      expect(row.payload).toEqual(JSON.parse(body));
      expect(row.headers["content-type"]).toBe("application/json");
      expect(row.headers["stripe-signature"]).toBeUndefined(); // signatures are not stored
    });

    it("refuses a wrong signature, a wrong secret and a stale timestamp with 401, storing nothing", async () => {
      const body = stripeEvent("evt_forged");
      const good = stripeSignature(body);
      const tampered = good.replace(/v1=(.)/, (_m, c: string) => `v1=${c === "0" ? "1" : "0"}`);
      for (const signature of [tampered, stripeSignature(body, now(), "whsec_not_the_secret"), stripeSignature(body, now() - 3600), "garbage"]) {
        const response = await post("stripe", body, { "stripe-signature": signature });
        expect(response.status).toBe(401);
      }
      expect((await post("stripe", body)).status).toBe(401); // no signature at all
      // A valid signature over another body does not cover this one.
      expect((await post("stripe", body, { "stripe-signature": stripeSignature(stripeEvent("evt_other")) })).status).toBe(401);
      expect((await rows("payments")).map((r) => r.event_id)).not.toContain("evt_forged");
    });

    it("stores the same event posted twice (a sender's retry) once", async () => {
      const body = stripeEvent("evt_retried");
      const first = await post("stripe", body, { "stripe-signature": stripeSignature(body) });
      const second = await post("stripe", body, { "stripe-signature": stripeSignature(body) });
      expect([first.status, second.status]).toEqual([200, 200]);
      const stored = (await rows("payments")).filter((r) => r.event_id === "evt_retried");
      expect(stored).toHaveLength(1);
    });

    it("refuses a body over max_body_bytes (default 1 MiB) with 413", async () => {
      const body = JSON.stringify({ id: "evt_huge", pad: "x".repeat(1_048_576) });
      const response = await post("stripe", body, { "stripe-signature": stripeSignature(body) });
      expect(response.status).toBe(413);
      expect((await rows("payments")).map((r) => r.event_id)).not.toContain("evt_huge");
    });
  });

  describe("github", () => {
    it("verifies X-Hub-Signature-256 and keys the row by the signed body, once per delivery", async () => {
      const body = JSON.stringify({ action: "opened", number: 42, repository: { full_name: "acme/shop" } });
      const headers = {
        "x-github-event": "pull_request",
        "x-github-delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
        "x-hub-signature-256": `sha256=${hmacHex(GITHUB_SECRET, body)}`,
      };
      expect((await post("github", body, headers)).status).toBe(200);
      expect((await post("github", body, headers)).status).toBe(200); // redelivered from GitHub's UI
      const stored = await rows("github_events");
      // X-GitHub-Delivery is not signed: it is kept as a header, not used as the event id.
      const hash = createHash("sha256").update(body).digest("hex").slice(0, 32);
      expect(stored.map((r) => [r.event_id, r.payload.number, r.headers["x-github-event"], r.headers["x-github-delivery"]])).toEqual([
        [`github_events:webhook:${hash}`, 42, "pull_request", "72d3162e-cc78-11e3-81ab-4c9367dc0958"],
      ]);
      expect(stored[0]!.headers["x-hub-signature-256"]).toBeUndefined();

      const wrong = { ...headers, "x-github-delivery": "other", "x-hub-signature-256": `sha256=${hmacHex("not-the-secret", body)}` };
      expect((await post("github", body, wrong)).status).toBe(401);
      expect((await post("github", body, { ...headers, "x-hub-signature-256": hmacHex(GITHUB_SECRET, body) })).status).toBe(401);
      expect(await rows("github_events")).toHaveLength(1);
    });
  });

  describe("standard webhooks", () => {
    it("verifies webhook-signature with the whsec_ key and keys the row by webhook-id", async () => {
      const body = JSON.stringify({ type: "invoice.paid", data: { invoice: "in_001" } });
      const headers = standardWebhookHeaders("msg_2b8QnV", body);
      expect((await post("hooks/standard", body, headers)).status).toBe(200);
      expect((await post("hooks/standard", body, standardWebhookHeaders("msg_2b8QnV", body))).status).toBe(200);
      const stored = await rows("sw_events");
      expect(stored.map((r) => [r.event_id, r.source, r.payload.type])).toEqual([["msg_2b8QnV", "webhook:/ingest/hooks/standard", "invoice.paid"]]);

      // Signed with the secret's text instead of its decoded bytes, for another id, or too old: refused.
      const textKey = createHmac("sha256", SW_SECRET).update(`msg_x.${now()}.${body}`).digest("base64");
      const refused = [
        { "webhook-id": "msg_x", "webhook-timestamp": String(now()), "webhook-signature": `v1,${textKey}` },
        { ...standardWebhookHeaders("msg_y", body), "webhook-id": "msg_z" },
        standardWebhookHeaders("msg_old", body, now() - 3600),
        { "webhook-id": "msg_none", "webhook-timestamp": String(now()) },
      ];
      for (const h of refused) expect((await post("hooks/standard", body, h)).status).toBe(401);
      expect(await rows("sw_events")).toHaveLength(1);
    });
  });

  describe("plain hmac-sha256", () => {
    it("verifies X-Tide-Signature; without an id, the same body maps to one row", async () => {
      const body = JSON.stringify({ sensor: "t-1", celsius: 21.5 });
      const headers = { "x-tide-signature": `sha256=${hmacHex(HMAC_SECRET, body)}` };
      expect((await post("plain", body, headers)).status).toBe(200);
      expect((await post("plain", body, headers)).status).toBe(200);
      const hash = createHash("sha256").update(body).digest("hex").slice(0, 32);
      expect((await rows("hmac_events")).map((r) => r.event_id)).toEqual([`hmac_events:webhook:${hash}`]);
      expect((await post("plain", body, { "x-tide-signature": `sha256=${hmacHex("nope", body)}` })).status).toBe(401);
    });

    it("uses the id of a structured CloudEvents body as the event_id", async () => {
      const structured = JSON.stringify({ specversion: "1.0", id: "ce-structured-0001", type: "reading", source: "/t-3", data: { celsius: 18 } });
      const response = await post("plain", structured, {
        "content-type": "application/cloudevents+json",
        "x-tide-signature": `sha256=${hmacHex(HMAC_SECRET, structured)}`,
      });
      expect(await response.json()).toEqual({ status: "accepted", event_id: "ce-structured-0001" });
      expect((await rows("hmac_events")).map((r) => r.event_id)).toContain("ce-structured-0001");
    });

    it("stores a body that is not JSON as a JSON string", async () => {
      const body = "temperature=21.5&unit=C";
      const response = await post("plain", body, {
        "content-type": "application/x-www-form-urlencoded",
        "x-tide-signature": `sha256=${hmacHex(HMAC_SECRET, body)}`,
      });
      expect(response.status).toBe(200);
      const [row] = await db.sql`SELECT jsonb_typeof(payload) AS type, payload FROM tide."hmac_events_inbox" WHERE event_id = ${bodyEventId("hmac_events", body)}`;
      expect(row).toEqual({ type: "string", payload: body });
    });

    it("verifies the signature over the bytes as sent, also when they are not UTF-8", async () => {
      // "café=1" in ISO-8859-1: é is the single byte 0xE9. The sender signs those bytes.
      const bytes = Buffer.from("caf\xe9=1", "latin1");
      const signature = `sha256=${createHmac("sha256", HMAC_SECRET).update(bytes).digest("hex")}`;
      const response = await fetch(`${base}/ingest/plain`, {
        method: "POST",
        headers: { "content-type": "application/x-www-form-urlencoded; charset=iso-8859-1", "x-tide-signature": signature },
        body: bytes,
      });
      expect(response.status).toBe(200);
      expect(await db.sql`SELECT 1 FROM tide."hmac_events_inbox" WHERE event_id = ${bodyEventId("hmac_events", bytes)}`).toHaveLength(1);
    });

    it("verifies the signature over the bytes as sent, also when a UTF-8 body starts with a byte order mark", async () => {
      const bytes = Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from('{"sensor": "bom-1"}')]);
      const signature = `sha256=${createHmac("sha256", HMAC_SECRET).update(bytes).digest("hex")}`;
      const response = await fetch(`${base}/ingest/plain`, {
        method: "POST",
        headers: { "content-type": "application/json; charset=utf-8", "x-tide-signature": signature },
        body: bytes,
      });
      expect(response.status).toBe(200);
    });

    it("answers a body PostgreSQL cannot store (U+0000) without a 5xx that invites endless retries", async () => {
      const poison = '{"note": "a\\u0000b"}';
      const sign = (body: string) => ({ "x-tide-signature": `sha256=${hmacHex(HMAC_SECRET, body)}` });
      const response = await post("plain", poison, sign(poison));
      expect(response.status).toBeLessThan(500);
      const next = JSON.stringify({ sensor: "t-3" });
      expect((await post("plain", next, sign(next))).status).toBe(200);
    });

    it("refuses a body over max_body_bytes with 413, with or without a Content-Length", async () => {
      const body = JSON.stringify({ pad: "y".repeat(SMALL_LIMIT) });
      const headers = { "x-tide-signature": `sha256=${hmacHex(HMAC_SECRET, body)}` };
      expect((await post("plain", body, headers)).status).toBe(413);
      // Streamed (chunked): the limit is enforced while reading.
      const chunks = [body.slice(0, 200), body.slice(200)];
      const stream = new ReadableStream<Uint8Array>({
        start(controller) {
          for (const chunk of chunks) controller.enqueue(new TextEncoder().encode(chunk));
          controller.close();
        },
      });
      expect((await post("plain", stream, headers)).status).toBe(413);
      const [{ n }] = await db.sql`SELECT count(*)::int AS n FROM tide."hmac_events_inbox" WHERE payload ? 'pad'`;
      expect(n).toBe(0);
    });
  });

  describe("unsigned (allow_unsigned)", () => {
    it("keys the row by the sender's id: Idempotency-Key, a ce-id header, or a CloudEvents body's id", async () => {
      const first = JSON.stringify({ sensor: "u-1" });
      expect((await post("open", first, { "idempotency-key": "reading-u-1-0001" })).status).toBe(200);
      expect((await post("open", first, { "idempotency-key": "reading-u-1-0001" })).status).toBe(200);
      const binary = JSON.stringify({ sensor: "u-2" });
      expect((await post("open", binary, { "ce-id": "ce-binary-0001", "ce-specversion": "1.0" })).status).toBe(200);
      const structured = JSON.stringify({ specversion: "1.0", id: "ce-structured-0002", type: "reading", source: "/u-3" });
      expect((await post("open", structured, { "content-type": "application/cloudevents+json" })).status).toBe(200);
      expect((await rows("open_events")).map((r) => r.event_id)).toEqual(["reading-u-1-0001", "ce-binary-0001", "ce-structured-0002"]);
    });
  });
});

/** The event id of a signed request without a signed id: its body's hash. */
function bodyEventId(inbox: string, body: string | Uint8Array): string {
  return `${inbox}:webhook:${createHash("sha256").update(body).digest("hex").slice(0, 32)}`;
}
