// What operators see: Prometheus metrics that count what happened, readiness that follows
// PostgreSQL, a status API and page, and secrets that never appear in any of them.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { existsSync } from "node:fs";
import { mkdtemp, stat } from "node:fs/promises";
import { connect as tcpConnect, createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createHttpApp } from "../../core/http.ts";
import { RelayMetrics } from "../../core/metrics.ts";
import type { Relay } from "../../core/relay.ts";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { captureLogger, startRelay, waitFor } from "../support/relay.ts";
import { REQUIRE_SERVICES } from "../support/services.ts";

let db: TestDatabase;
let dir: string;
beforeAll(async () => {
  db = await createTestDatabase();
  dir = await mkdtemp(join(tmpdir(), "tide-obs-"));
});
afterAll(() => db.drop());

/** Parses Prometheus text into "name{labels}" → value. */
function parseMetrics(text: string): Map<string, number> {
  const values = new Map<string, number>();
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const at = line.lastIndexOf(" ");
    values.set(line.slice(0, at), Number(line.slice(at + 1)));
  }
  return values;
}

/** A TCP proxy in front of PostgreSQL that the test can cut and restore. */
async function postgresProxy(target: URL): Promise<{ url: string; cut(): void; restore(): void; close(): void }> {
  const sockets = new Set<Socket>();
  let open = true;
  const server: Server = createServer((client) => {
    if (!open) return client.destroy();
    const upstream = tcpConnect(Number(target.port || 5432), target.hostname);
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on("close", () => sockets.delete(s));
      s.on("error", () => {});
    }
    client.pipe(upstream).pipe(client);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const url = new URL(target.toString());
  url.hostname = "127.0.0.1";
  url.port = String((server.address() as { port: number }).port);
  return {
    url: url.toString(),
    cut() {
      open = false;
      for (const s of sockets) s.destroy();
    },
    restore() {
      open = true;
    },
    close() {
      for (const s of sockets) s.destroy();
      server.close();
    },
  };
}

describe("metrics", () => {
  it("counts every delivered message and observes each one's latency", async () => {
    const relay = await startRelay(db.url, { metricsAddr: "127.0.0.1:0" });
    try {
      await db.sql`SELECT tide.outbox_create('metered')`;
      await db.sql`SELECT tide.relay_set_outbox('metered', 'metered', 'file', ${db.sql.json({ path: join(dir, "m.jsonl") })})`;
      for (let i = 0; i < 25; i++) await db.sql`SELECT tide.outbox_publish('metered', ${db.sql.json({ i })})`;
      await waitFor("delivery", async () => (await db.sql`SELECT lag FROM tide.consumer_lag WHERE group_name = 'metered'`)[0].lag === 0n);
      const response = await fetch(`http://127.0.0.1:${relay.httpPort}/metrics`);
      expect(response.headers.get("content-type")).toContain("text/plain");
      const metrics = parseMetrics(await response.text());
      expect(metrics.get('pg_tide_relay_messages_published_total{pipeline="metered",direction="forward"}')).toBe(25);
      expect(metrics.get('pg_tide_relay_delivery_latency_seconds_count{pipeline="metered"}')).toBe(25);
      expect(metrics.get('pg_tide_relay_pipeline_healthy{pipeline="metered"}')).toBe(1);
      expect(metrics.get('pg_tide_relay_consumer_lag{pipeline="metered"}')).toBe(0);
      expect(metrics.get("pg_tide_relay_owned_pipelines")).toBeGreaterThanOrEqual(1);
      for (const name of ["publish_errors_total", "dlq_entries_written_total", "dedup_skipped_total", "messages_consumed_total"]) {
        expect(await (await fetch(`http://127.0.0.1:${relay.httpPort}/metrics`)).text()).toContain(`# TYPE pg_tide_relay_${name}`);
      }
    } finally {
      await relay.stop();
    }
  });
});

describe("readiness", () => {
  it("is 200 while PostgreSQL answers, 503 while it does not, and 200 again after", async () => {
    const proxy = await postgresProxy(new URL(db.url));
    const relay = await startRelay(proxy.url, { metricsAddr: "127.0.0.1:0" });
    const readyz = async () => {
      const response = await fetch(`http://127.0.0.1:${relay.httpPort}/readyz`);
      return { status: response.status, body: await response.text() };
    };
    try {
      expect((await readyz()).status).toBe(200);
      expect((await fetch(`http://127.0.0.1:${relay.httpPort}/health`)).status).toBe(200);
      proxy.cut();
      const down = await waitFor("readyz to turn 503", async () => {
        const r = await readyz();
        return r.status === 503 && r;
      });
      expect(down.body).toContain("PostgreSQL is unreachable");
      expect((await fetch(`http://127.0.0.1:${relay.httpPort}/livez`)).status).toBe(200);
      proxy.restore();
      await waitFor("readyz to recover", async () => (await readyz()).status === 200);
    } finally {
      proxy.restore();
      await relay.stop();
      proxy.close();
    }
  }, 60_000);

  it("is 503 before the coordinator runs (no port needed)", async () => {
    const app = createHttpApp({
      sql: db.sql, metrics: new RelayMetrics(), relayGroupId: "default", relayId: "test",
      coordinatorRunning: () => false, owned: () => [],
    });
    const response = await app.request("/readyz");
    expect(response.status).toBe(503);
    expect(await response.text()).toContain("coordinator is not running");
    expect((await app.request("/livez")).status).toBe(200);
  });
});

describe("secrets", () => {
  it("never shows a password or token in logs, the API, metrics, status or relay_get_config", async () => {
    const password = "pa55-word-xyz";
    const token = "tok-abc-123456";
    const { logger, lines } = captureLogger();
    const relay = await startRelay(db.url, { metricsAddr: "127.0.0.1:0", logger });
    try {
      await db.sql`SELECT tide.outbox_create('secretive')`;
      // An unreachable target, so that errors (which quote the URL) are logged.
      await db.sql`SELECT tide.relay_set_outbox('secretive', 'secretive', 'webhook', ${db.sql.json({
        url: `http://relay:${password}@127.0.0.1:1/hook`,
        headers: { Authorization: `Bearer ${token}` },
        signing: { scheme: "hmac-sha256", secret: token },
        timeout_ms: 200,
      })})`;
      await db.sql`SELECT tide.outbox_publish('secretive', '{"n": 1}'::jsonb)`;
      await waitFor("a logged delivery failure", () => lines.some((l) => l.includes("secretive") && l.includes("failed")));
      const base = `http://127.0.0.1:${relay.httpPort}`;
      const seen = [
        lines.join("\n"),
        await (await fetch(`${base}/api/v1/pipelines`)).text(),
        await (await fetch(`${base}/metrics`)).text(),
        await (await fetch(`${base}/`)).text(),
        JSON.stringify((await db.sql`SELECT tide.relay_get_config('secretive') AS c`)[0].c),
        JSON.stringify(await db.sql`SELECT * FROM tide.relay_list_configs()`),
        JSON.stringify(await db.sql`SELECT * FROM tide.pipeline_status`, (_, v) => (typeof v === "bigint" ? String(v) : v)),
        await new Response(Bun.spawn([process.execPath, "main.ts", "status", "--postgres-url", db.url, "--output", "json"], {
          cwd: `${import.meta.dir}/../..`, stdout: "pipe",
        }).stdout).text(),
      ];
      expect(seen[1]).toContain("secretive"); // the surfaces really show the pipeline
      for (const text of seen) {
        expect(text).not.toContain(password);
        expect(text).not.toContain(token);
      }
    } finally {
      await relay.stop();
    }
  }, 60_000);
});

const CHROMIUM = ["/usr/bin/chromium", "/usr/bin/chromium-browser"].find((path) => existsSync(path));
if (!CHROMIUM && REQUIRE_SERVICES) throw new Error("chromium is not installed (TIDE_REQUIRE_SERVICES=1)");
if (!CHROMIUM) console.warn("skipping the status page browser test: chromium is not installed");

describe.skipIf(!CHROMIUM)("status page", () => {
  let relay: Relay;
  beforeAll(async () => {
    relay = await startRelay(db.url, { metricsAddr: "127.0.0.1:0" });
    await db.sql`SELECT tide.outbox_create('shown')`;
    await db.sql`SELECT tide.relay_set_outbox('shown-to-file', 'shown', 'file', ${db.sql.json({ path: join(dir, "s.jsonl") })})`;
    await waitFor("the pipeline to be owned", () => relay.coordinator.owned().some((p) => p.name === "shown-to-file"));
  });
  afterAll(() => relay.stop());

  it("renders in headless Chromium and lists the pipelines", async () => {
    const url = `http://127.0.0.1:${relay.httpPort}/`;
    const flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", `--user-data-dir=${join(dir, "chromium")}`];
    // Asynchronous spawns: the relay serving the page runs in this very process.
    const dom = Bun.spawn([CHROMIUM!, ...flags, "--dump-dom", url], { stdout: "pipe", stderr: "ignore" });
    const html = await new Response(dom.stdout).text();
    await dom.exited;
    expect(html).toContain("shown-to-file");
    expect(html).toContain("outbox shown");
    expect(html).toContain("healthy");
    const png = join(dir, "status.png");
    await Bun.spawn([CHROMIUM!, ...flags, "--window-size=1200,700", `--screenshot=${png}`, url], { stdout: "ignore", stderr: "ignore" }).exited;
    expect((await stat(png)).size).toBeGreaterThan(1000);
  }, 120_000);
});
