// The relay's HTTP server with --http-token: the API, the status page and unsigned ingest routes
// answer 401 with a message that says what to send, and 200 with the token (as a bearer token, or as
// a browser's Basic password); a signed webhook source is authenticated by its signature instead (a
// third party cannot add our token, and the token does not stand in for a signature); the probes and
// /metrics stay open unless --http-token-scope is "all". Real relays logged in as a LOGIN role that
// holds only tide_relay, real HTTP requests.

import { afterAll, beforeAll, describe, expect, it, setDefaultTimeout } from "bun:test";
import { createHmac } from "node:crypto";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Relay } from "../../core/relay.ts";
import { createTestDatabase, loginRole, type TestDatabase } from "../support/postgres.ts";
import { collectLines, spawnRelay, startRelay, waitFor } from "../support/relay.ts";

setDefaultTimeout(60_000);

const TOKEN = "3f9c1e0d7a5b4c2e8f6a1d0c9b7e5a3f";
const SIGNING_SECRET = "ingest-signing-secret";
const suffix = Math.random().toString(36).slice(2, 10);
const PROBES = ["/livez", "/readyz", "/health", "/metrics"];

let db: TestDatabase;
let relayUrl: string;
let relay: Relay;
let base: string;

const bearer = (token = TOKEN) => ({ authorization: `Bearer ${token}` });
const signed = (body: string) => ({ "x-tide-signature": `sha256=${createHmac("sha256", SIGNING_SECRET).update(body).digest("hex")}` });

async function post(path: string, body: string, headers: Record<string, string> = {}): Promise<Response> {
  return await fetch(`${base}${path}`, { method: "POST", headers: { "content-type": "application/json", ...headers }, body });
}

async function inboxRows(inbox: string): Promise<unknown[]> {
  const rows = await db.sql.unsafe(`SELECT payload FROM tide."${inbox}_inbox" ORDER BY id`);
  return rows.map((row) => row.payload);
}

beforeAll(async () => {
  db = await createTestDatabase();
  relayUrl = (await loginRole(db, "tide_relay", "http_relay")).url;
  await db.sql`SELECT tide.outbox_create('orders')`;
  await db.sql`SELECT tide.relay_set_outbox('orders-out', 'orders', 'stdout', '{"format": "json"}'::jsonb)`;
  await db.sql`SELECT tide.inbox_create('unsigned_events')`;
  await db.sql`SELECT tide.inbox_create('signed_events')`;
  await db.sql`SELECT tide.relay_set_inbox('unsigned-in', 'unsigned_events',
    ${db.sql.json({ source_type: "webhook", path: "unsigned", allow_unsigned: true })})`;
  await db.sql`SELECT tide.relay_set_inbox('signed-in', 'signed_events',
    ${db.sql.json({ source_type: "webhook", path: "signed", signature: { scheme: "hmac-sha256", secret: SIGNING_SECRET } })})`;
  relay = await startRelay(relayUrl, { metricsAddr: "127.0.0.1:0", httpAuth: { token: TOKEN, scope: "api" } });
  base = `http://127.0.0.1:${relay.httpPort}`;
  // A route exists once its pipeline runs here: GET is then 405, not 404.
  for (const path of ["unsigned", "signed"]) {
    await waitFor(`the route /ingest/${path}`, async () => (await fetch(`${base}/ingest/${path}`, { headers: bearer() })).status === 405);
  }
});

afterAll(async () => {
  await relay?.stop();
  await db.drop();
});

describe("the HTTP token", () => {
  it("guards the API: 401 saying what to send without it or with a wrong one, 200 with it", async () => {
    const missing = await fetch(`${base}/api/v1/pipelines`);
    expect(missing.status).toBe(401);
    expect(missing.headers.get("www-authenticate")).toBe('Bearer realm="pg-tide"');
    expect((await missing.json()).error).toContain('send the header "Authorization: Bearer <token>"');

    const wrong = await fetch(`${base}/api/v1/pipelines`, { headers: bearer("0".repeat(32)) });
    expect(wrong.status).toBe(401);
    expect((await wrong.json()).error).toContain("the token does not match this relay's --http-token");

    const scheme = await fetch(`${base}/api/v1/pipelines`, { headers: { authorization: `Token ${TOKEN}` } });
    expect(scheme.status).toBe(401);
    expect((await scheme.json()).error).toContain('must be "Bearer <token>"');

    const ok = await fetch(`${base}/api/v1/pipelines`, { headers: bearer() });
    expect(ok.status).toBe(200);
    const names = (await ok.json()).pipelines.map((p: { name: string }) => p.name);
    expect(names).toEqual(expect.arrayContaining(["orders-out", "unsigned-in", "signed-in"]));
  });

  it("guards the status page, which a browser opens with the token as its Basic password", async () => {
    const missing = await fetch(`${base}/`);
    expect(missing.status).toBe(401);
    // A Basic challenge makes a browser ask for a user name and password.
    expect(missing.headers.get("www-authenticate")).toContain("Basic");
    expect(await missing.text()).toContain("Authorization: Bearer <token>");

    const browser = await fetch(`${base}/`, { headers: { authorization: `Basic ${btoa(`ops:${TOKEN}`)}` } });
    expect(browser.status).toBe(200);
    expect(await browser.text()).toContain("orders-out");
    expect((await fetch(`${base}/`, { headers: { authorization: `Basic ${btoa("ops:guess")}` } })).status).toBe(401);
    expect((await fetch(`${base}/`, { headers: bearer() })).status).toBe(200);
  });

  it("guards paths that do not exist, so that no route is left open by mistake", async () => {
    expect((await fetch(`${base}/api/v2/anything`)).status).toBe(401);
    expect((await fetch(`${base}/ingest/nobody-here`, { method: "POST", body: "{}" })).status).toBe(401);
    expect((await fetch(`${base}/api/v2/anything`, { headers: bearer() })).status).toBe(404);
  });

  it("guards an unsigned webhook source's ingest route: nothing reaches the inbox without the token", async () => {
    const refused = await post("/ingest/unsigned", JSON.stringify({ n: 1 }));
    expect(refused.status).toBe(401);
    expect(await refused.text()).toContain("Authorization: Bearer <token>");
    const accepted = await post("/ingest/unsigned", JSON.stringify({ n: 2 }), bearer());
    expect(accepted.status).toBe(200);
    expect(await inboxRows("unsigned_events")).toEqual([{ n: 2 }]);
  });

  it("lets a signed webhook source's route check the signature instead, and never takes the token for one", async () => {
    const body = JSON.stringify({ paid: 1 });
    // A third party signs but cannot send our token.
    expect((await post("/ingest/signed", body, signed(body))).status).toBe(200);
    const unsigned = await post("/ingest/signed", JSON.stringify({ paid: 2 }), bearer());
    expect(unsigned.status).toBe(401);
    expect(await unsigned.text()).toContain("invalid signature");
    expect(await inboxRows("signed_events")).toEqual([{ paid: 1 }]);
  });

  it("leaves /livez, /readyz, /health and /metrics open by default, for probes and Prometheus", async () => {
    for (const path of PROBES) expect([path, (await fetch(`${base}${path}`)).status]).toEqual([path, 200]);
  });

  it("guards the probes and /metrics too with --http-token-scope all", async () => {
    const strict = await startRelay(relayUrl, {
      relayGroupId: "strict",
      metricsAddr: "127.0.0.1:0",
      httpAuth: { token: TOKEN, scope: "all" },
      drainTimeoutMs: 1_000,
    });
    try {
      const at = `http://127.0.0.1:${strict.httpPort}`;
      for (const path of PROBES) {
        const response = await fetch(`${at}${path}`);
        expect([path, response.status]).toEqual([path, 401]);
        expect(await response.text()).toContain("Authorization: Bearer <token>");
        expect([path, (await fetch(`${at}${path}`, { headers: bearer() })).status]).toEqual([path, 200]);
      }
    } finally {
      await strict.stop();
    }
  });
});

describe("pg-tide run with a token", () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "tide-http-"));
  });
  afterAll(() => rm(dir, { recursive: true, force: true }));

  /** Starts `pg-tide run` logging JSON and returns the address its HTTP server listens on. */
  async function running(extra: string[], env: Record<string, string> = {}) {
    const child = spawnRelay(relayUrl, ["--log-format", "json", "--relay-group-id", `cli_${suffix}`, "--drain-timeout", "1", ...extra], env);
    const logs = collectLines(child.stderr);
    const line = await waitFor("the relay to serve HTTP", () => logs.lines.find((l) => l.includes("serving metrics and status")));
    return { child, base: `http://${JSON.parse(line).address}` };
  }

  async function stop(child: ReturnType<typeof spawnRelay>) {
    child.kill("SIGTERM");
    expect(await child.exited).toBe(0);
  }

  it("takes the token from PG_TIDE_HTTP_TOKEN", async () => {
    const { child, base } = await running([], { PG_TIDE_HTTP_TOKEN: TOKEN });
    try {
      expect((await fetch(`${base}/api/v1/pipelines`)).status).toBe(401);
      expect((await fetch(`${base}/api/v1/pipelines`, { headers: bearer() })).status).toBe(200);
      expect((await fetch(`${base}/livez`)).status).toBe(200);
    } finally {
      await stop(child);
    }
  });

  it("takes the token and the scope from the manifest's [relay]", async () => {
    const path = join(dir, "token.toml");
    await writeFile(path, `[relay]\nhttp_token = "\${env:ORDERS_RELAY_TOKEN}"\nhttp_token_scope = "all"\n`);
    const { child, base } = await running(["--config", path], { ORDERS_RELAY_TOKEN: TOKEN });
    try {
      expect((await fetch(`${base}/metrics`)).status).toBe(401);
      expect((await fetch(`${base}/metrics`, { headers: bearer() })).status).toBe(200);
    } finally {
      await stop(child);
    }
  });

  it("refuses a weak token, naming where it came from without quoting it", async () => {
    const weak = "hunter2hunter2";
    const cases: [string[], Record<string, string>, string][] = [
      [["--http-token", weak], {}, "--http-token must be at least 16 characters (got 14)"],
      [[], { PG_TIDE_HTTP_TOKEN: weak }, "PG_TIDE_HTTP_TOKEN must be at least 16 characters (got 14)"],
      [["--http-token", "with space in it, long enough"], {}, "--http-token may hold only letters, digits"],
      [["--http-token-scope", "all"], {}, '--http-token-scope "all" needs a token: set --http-token'],
    ];
    const toml = join(dir, "weak.toml");
    await writeFile(toml, `[relay]\nhttp_token = "${weak}"\n`);
    cases.push([["--config", toml], {}, "relay.http_token: must be at least 16 characters (got 14)"]);
    for (const [args, env, message] of cases) {
      const child = spawnRelay(relayUrl, args, env);
      const [stderr, code] = await Promise.all([new Response(child.stderr).text(), child.exited]);
      expect([args, code]).toEqual([args, 2]);
      expect(stderr).toContain(message);
      expect(stderr).not.toContain(weak);
    }
  });
});
