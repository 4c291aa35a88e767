// What operators see: Prometheus metrics that count what happened, readiness that follows
// PostgreSQL, a status API and page, and secrets that never appear in any of them.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { existsSync } from "node:fs";
import { mkdtemp, stat } from "node:fs/promises";
import { connect as tcpConnect, createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createHttpApp } from "../../core/http/http.ts";
import { HISTORY_STEP_MS, RelayMetrics } from "../../core/http/metrics.ts";
import type { Relay } from "../../core/relay.ts";
import { REFRESH_SECONDS } from "../../core/http/status_page.ts";
import { CIRCUIT_THRESHOLD } from "../../core/engine/worker_status.ts";
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
    const queryToken = "QueryTok77-q";
    const { logger, lines } = captureLogger();
    const relay = await startRelay(db.url, { metricsAddr: "127.0.0.1:0", logger });
    try {
      await db.sql`SELECT tide.outbox_create('secretive')`;
      // An unreachable target, so that errors (which quote the URL) are logged.
      await db.sql`SELECT tide.relay_set_outbox('secretive', 'secretive', 'webhook', ${db.sql.json({
        url: `http://relay:${password}@127.0.0.1:1/hook?token=${queryToken}&page=2`,
        headers: { Authorization: `Bearer ${token}` },
        signing: { scheme: "hmac-sha256", secret: token },
        timeout_ms: 200,
      })})`;
      await db.sql`SELECT tide.outbox_publish('secretive', '{"n": 1}'::jsonb)`;
      await waitFor("a logged delivery failure", () => lines.some((l) => l.includes("secretive") && l.includes("failed")));
      const base = `http://127.0.0.1:${relay.httpPort}`;
      const pgTideStatus = async (...args: string[]) =>
        await new Response(Bun.spawn([process.execPath, "main.ts", "status", "--postgres-url", db.url, ...args], {
          cwd: `${import.meta.dir}/../..`, stdout: "pipe",
        }).stdout).text();
      const config = (await db.sql`SELECT tide.relay_get_config('secretive') AS c`)[0].c;
      expect(config.config.url).toBe("http://relay:***@127.0.0.1:1/hook?token=***&page=2");
      const seen = [
        lines.join("\n"),
        await (await fetch(`${base}/api/v1/pipelines`)).text(),
        await (await fetch(`${base}/metrics`)).text(),
        await (await fetch(`${base}/`)).text(),
        JSON.stringify(config),
        JSON.stringify(await db.sql`SELECT * FROM tide.relay_list_configs()`),
        JSON.stringify(await db.sql`SELECT * FROM tide.pipeline_status`, (_, v) => (typeof v === "bigint" ? String(v) : v)),
        await pgTideStatus("--output", "json"),
        await pgTideStatus(),
      ];
      expect(seen[1]).toContain("secretive"); // the surfaces really show the pipeline
      expect(seen[8]).toContain("secretive");
      for (const text of seen) {
        expect(text).not.toContain(password);
        expect(text).not.toContain(token);
        expect(text).not.toContain(queryToken);
      }
    } finally {
      await relay.stop();
    }
  }, 60_000);
});

/** The rows of `pg-tide status`'s table, cut at the header's column starts. */
function statusTable(text: string): Map<string, Record<string, string>> {
  const [header, ...lines] = text.trimEnd().split("\n");
  const columns = [...header!.matchAll(/\S+(?: \S+)*/g)].map((m) => ({ name: m[0], at: m.index! }));
  const rows = lines.map((line) =>
    Object.fromEntries(columns.map((c, i) => [c.name, line.slice(c.at, columns[i + 1]?.at ?? line.length).trim()]))
  );
  return new Map(rows.map((row) => [row.PIPELINE!, row]));
}

/** The status page's table as header → cell text, one map per pipeline. */
function pageTable(html: string): Map<string, Record<string, string>> {
  const text = (cell: string) => cell.replace(/<[^>]+>/g, "").trim();
  const header = [...html.matchAll(/<th[^>]*>([\s\S]*?)<\/th>/g)].map((m) => text(m[1]!));
  const rows = [...html.matchAll(/<tr data-pipeline="[^"]*"><td>[\s\S]*?<\/tr>/g)].map((row) =>
    Object.fromEntries([...row[0].matchAll(/<td[^>]*>([\s\S]*?)<\/td>/g)].map((m, i) => [header[i], text(m[1]!)]))
  );
  return new Map(rows.map((row) => [row.Pipeline!, row]));
}

describe("pipeline status", () => {
  // One relay with four pipelines in a database of their own:
  //   status-file   delivers DELIVERED messages to a file;
  //   status-flaky  gets two 503s, then delivers (two failed attempts, no dead letter);
  //   status-hook   gets a 400 (one dead letter), then 503s forever (failing, circuit open);
  //   status-in     receives two webhooks that wait in its inbox.
  const DELIVERED = 12;
  let own: TestDatabase;
  let relay: Relay;
  let hook: ReturnType<typeof Bun.serve>;
  let base: string;
  let lastFileId: number;
  let rejectedId: number;
  const requests = new Map<string, number>();

  const api = async () => {
    const body = await (await fetch(`${base}/api/v1/pipelines`)).json();
    return new Map<string, any>(body.pipelines.map((p: any) => [p.name, p]));
  };
  const metrics = async () => parseMetrics(await (await fetch(`${base}/metrics`)).text());
  const pgTideStatus = async (...args: string[]) => {
    const child = Bun.spawn([process.execPath, "main.ts", "status", "--postgres-url", own.url, ...args], {
      cwd: `${import.meta.dir}/../..`, stdout: "pipe", stderr: "pipe",
    });
    const [stdout, code] = await Promise.all([new Response(child.stdout).text(), child.exited]);
    expect(code).toBe(0);
    return stdout;
  };

  beforeAll(async () => {
    own = await createTestDatabase();
    hook = Bun.serve({
      hostname: "127.0.0.1",
      port: 0,
      async fetch(request) {
        const kind = /"kind":\s*"(\w+)"/.exec(await request.text())?.[1] ?? "?";
        const seen = (requests.get(kind) ?? 0) + 1;
        requests.set(kind, seen);
        if (kind === "reject") return new Response("no such customer", { status: 400 });
        if (kind === "down" || (kind === "flaky" && seen <= 2)) return new Response("try later", { status: 503 });
        return new Response("ok");
      },
    });
    const webhook = { url: `http://127.0.0.1:${hook.port}/hook`, timeout_ms: 2000, retry: { initial_backoff_ms: 10, max_backoff_ms: 20 } };
    for (const outbox of ["status_file", "status_flaky", "status_hook"]) await own.sql`SELECT tide.outbox_create(${outbox})`;
    await own.sql`SELECT tide.inbox_create('status_in')`;
    for (let i = 0; i < DELIVERED; i++) {
      [{ id: lastFileId }] = (await own.sql`SELECT tide.outbox_publish('status_file', ${own.sql.json({ i })})::int AS id`) as any;
    }
    await own.sql`SELECT tide.outbox_publish('status_flaky', '{"kind": "flaky"}'::jsonb)`;
    [{ id: rejectedId }] = (await own.sql`SELECT tide.outbox_publish('status_hook', '{"kind": "reject"}'::jsonb)::int AS id`) as any;
    await own.sql`SELECT tide.relay_set_outbox('status-file', 'status_file', 'file', ${own.sql.json({ path: join(dir, "status.jsonl") })})`;
    await own.sql`SELECT tide.relay_set_outbox('status-flaky', 'status_flaky', 'webhook', ${own.sql.json(webhook)})`;
    await own.sql`SELECT tide.relay_set_outbox('status-hook', 'status_hook', 'webhook', ${own.sql.json(webhook)})`;
    await own.sql`SELECT tide.relay_set_inbox('status-in', 'status_in', '{"source_type": "webhook", "path": "status", "allow_unsigned": true}'::jsonb)`;
    relay = await startRelay(own.url, { metricsAddr: "127.0.0.1:0" });
    base = `http://127.0.0.1:${relay.httpPort}`;
    await waitFor("the ingest route", async () => (await fetch(`${base}/ingest/status`)).status === 405);
    for (const n of [1, 2]) {
      const response = await fetch(`${base}/ingest/status`, { method: "POST", headers: { "idempotency-key": `in-${n}` }, body: `{"n": ${n}}` });
      expect(response.status).toBe(200);
    }
    // The 400 is dead-lettered before anything else reaches status-hook, which then fails for good.
    await waitFor("the dead letter", async () => (await metrics()).get('pg_tide_relay_dlq_entries_written_total{pipeline="status-hook"}') === 1);
    await own.sql`SELECT tide.outbox_publish('status_hook', '{"kind": "down"}'::jsonb)`;
    await waitFor("status-flaky delivered", async () => (await api()).get("status-flaky").committed_offset > 0);
    await waitFor("status-hook's circuit to open", async () => (await api()).get("status-hook").retry_attempt >= CIRCUIT_THRESHOLD);
  }, 60_000);
  afterAll(async () => {
    await relay?.stop();
    hook?.stop(true);
    await own?.drop();
  });

  it("serves each pipeline's route, owner, position, lag, errors, circuit, DLQ depth and throughput", async () => {
    const pipelines = await api();
    const file = pipelines.get("status-file");
    expect(file).toMatchObject({
      direction: "forward", outbox: "status_file", inbox: null, plugin_type: "file", enabled: true,
      owner: relay.relayId, owner_alive: true, owned_here: true, healthy: true, retry_attempt: 0, circuit: "closed",
      committed_offset: lastFileId, delivered_total: DELIVERED, lag: 0, inbox_pending: null, last_error: null, dlq_depth: 0,
    });
    // Messages per second over the last minute: all DELIVERED went out in the first 10 s step
    // (sampled or still open).
    expect(file.throughput_per_second).toBe(Math.round((DELIVERED / (10 * Math.max(1, file.history.length))) * 100) / 100);

    const hookStatus = pipelines.get("status-hook");
    expect(hookStatus).toMatchObject({
      direction: "forward", outbox: "status_hook", plugin_type: "webhook", owner: relay.relayId, owned_here: true,
      healthy: false, committed_offset: rejectedId, delivered_total: 1, lag: 1, dlq_depth: 1, throughput_per_second: 0,
    });
    expect(hookStatus.retry_attempt).toBeGreaterThanOrEqual(CIRCUIT_THRESHOLD);
    expect(["open", "half-open"]).toContain(hookStatus.circuit);
    await waitFor("the heartbeat to record the error", async () => (await api()).get("status-hook").last_error);
    expect((await api()).get("status-hook").last_error).toBe(`webhook sink "status-hook": POST http://127.0.0.1:${hook.port}/hook answered 503: try later`);

    expect(pipelines.get("status-flaky")).toMatchObject({ healthy: true, retry_attempt: 0, circuit: "closed", lag: 0, dlq_depth: 0 });
    expect(pipelines.get("status-in")).toMatchObject({
      direction: "reverse", inbox: "status_in", outbox: null, plugin_type: "webhook", owner: relay.relayId, healthy: true,
      committed_offset: null, lag: null, inbox_pending: 2, dlq_depth: 0,
    });
  });

  it("counts failed attempts and dead letters in the metrics", async () => {
    const values = await metrics();
    expect(requests.get("flaky")).toBe(3);
    expect(values.get('pg_tide_relay_publish_errors_total{pipeline="status-flaky",direction="forward"}')).toBe(2);
    expect(values.get('pg_tide_relay_messages_published_total{pipeline="status-flaky",direction="forward"}')).toBe(1);
    expect(values.get('pg_tide_relay_dlq_entries_written_total{pipeline="status-flaky"}')).toBeUndefined();
    expect(values.get('pg_tide_relay_dlq_entries_written_total{pipeline="status-hook"}')).toBe(1);
    expect(values.get('pg_tide_relay_publish_errors_total{pipeline="status-hook",direction="forward"}')).toBeGreaterThanOrEqual(CIRCUIT_THRESHOLD);
    expect(values.get('pg_tide_relay_pipeline_healthy{pipeline="status-hook"}')).toBe(0);
    expect(values.get('pg_tide_relay_consumer_lag{pipeline="status-hook"}')).toBe(1);
    expect(values.get('pg_tide_relay_messages_consumed_total{pipeline="status-in",direction="reverse"}')).toBe(2);
  });

  it("shows the pipelines with position and lag, charts of the last minutes, and refreshes itself", async () => {
    // The charts plot the history, sampled every HISTORY_STEP_MS.
    await waitFor("a history sample", async () => (await api()).get("status-file").history.length > 0, HISTORY_STEP_MS * 3);
    const html = await (await fetch(`${base}/`)).text();
    expect(html).toContain(`<meta http-equiv="refresh" content="${REFRESH_SECONDS}">`);
    const rows = pageTable(html);
    expect(rows.get("status-file")).toMatchObject({
      Direction: "forward", "From → to": "outbox status_file → file", State: "healthy", Owner: relay.relayId,
      Position: String(lastFileId), Lag: "0", DLQ: "0", "Last error": "", Config: "v1",
    });
    expect(rows.get("status-file")!["Last success"]).toMatch(/^\d+ s ago$/);
    expect(rows.get("status-hook")).toMatchObject({ Position: String(rejectedId), Lag: "1", DLQ: "1" });
    expect(rows.get("status-hook")!.State).toMatch(/^failing \(attempt \d+\), circuit (open|half-open)$/);
    expect(rows.get("status-hook")!["Last error"]).toContain("answered 503");
    expect(rows.get("status-in")).toMatchObject({ Direction: "reverse", "From → to": "webhook → inbox status_in", Position: "", Lag: "2 pending" });

    const figure = (name: string) => html.match(new RegExp(`<figure><figcaption>${name}</figcaption>[\\s\\S]*?</figure>`))?.[0] ?? "";
    // All DELIVERED messages went out in one 10 s step: DELIVERED / 10 per second at the peak.
    expect(figure("status-file")).toMatch(/<svg [^>]*aria-label="messages\/s over time \(UTC\)">[\s\S]*<polyline [^>]*points="[\d., ]+"/);
    // The time axis is labelled with UTC clock times.
    expect(figure("status-file")).toMatch(/<text class="x-tick"[^>]*>\d\d:\d\d:\d\d<\/text>/);
    expect(figure("status-file")).toContain(`(max ${DELIVERED / 10})`);
    expect(figure("status-file")).toContain('aria-label="lag (messages) over time (UTC)"');
    expect(figure("status-in")).toContain('aria-label="messages/s over time (UTC)"');
    expect(figure("status-in")).not.toContain('aria-label="lag'); // a reverse pipeline has no outbox lag
  }, 60_000);

  it("prints the same in pg-tide status, as a table and as JSON", async () => {
    await waitFor("the heartbeat to record the failure", async () =>
      (await own.sql`SELECT retry_attempt FROM tide.relay_pipeline_state WHERE pipeline = 'status-hook'`)[0]?.retry_attempt >= CIRCUIT_THRESHOLD
    );
    const table = statusTable(await pgTideStatus());
    expect(table.get("status-file")).toEqual({
      PIPELINE: "status-file", DIRECTION: "forward", FROM: "status_file", TO: "file", STATE: "healthy", OWNER: relay.relayId,
      POSITION: String(lastFileId), LAG: "0", DLQ: "0", "LAST ERROR": "", CONFIG: "v1",
      "LAST SUCCESS": expect.stringMatching(/^\d{4}-\d\d-\d\dT/),
    });
    expect(table.get("status-hook")).toMatchObject({ POSITION: String(rejectedId), LAG: "1", DLQ: "1" });
    expect(table.get("status-hook")!.STATE).toMatch(/^failing \(attempt \d+, circuit (open|half-open)\)$/);
    expect(table.get("status-hook")!["LAST ERROR"]).toStartWith('webhook sink "status-hook": POST http://127.0.0.1:');
    expect(table.get("status-in")).toMatchObject({ DIRECTION: "reverse", FROM: "webhook", TO: "status_in", POSITION: "", LAG: "2 pending", DLQ: "0" });

    const json = JSON.parse(await pgTideStatus("--output", "json"));
    const byName = new Map<string, any>(json.pipelines.map((p: any) => [p.name, p]));
    expect(byName.get("status-file")).toMatchObject({
      direction: "forward", owner: relay.relayId, owner_alive: true, healthy: true, committed_offset: lastFileId,
      delivered_total: DELIVERED, lag: 0, dlq_depth: 0, last_error: null,
    });
    expect(byName.get("status-hook")).toMatchObject({
      healthy: false, committed_offset: rejectedId, lag: 1, dlq_depth: 1,
      last_error: `webhook sink "status-hook": POST http://127.0.0.1:${hook.port}/hook answered 503: try later`,
    });
    expect(byName.get("status-hook").retry_attempt).toBeGreaterThanOrEqual(CIRCUIT_THRESHOLD);
    expect(byName.get("status-in")).toMatchObject({ direction: "reverse", inbox: "status_in", lag: null, inbox_pending: 2 });
  });
});

describe("a fatal start-up error", () => {
  const password = "pw-fatal-9";
  const unreachable = `postgres://relay:${password}@127.0.0.1:1/app`;
  const CANNOT_CONNECT = "cannot connect to PostgreSQL at postgres://relay:***@127.0.0.1:1/app";
  const run = async (args: string[], env: Record<string, string> = {}) => {
    const child = Bun.spawn([process.execPath, "main.ts", "run", "--metrics-addr", "off", ...args], {
      cwd: `${import.meta.dir}/../..`, env: { ...process.env, ...env }, stdout: "pipe", stderr: "pipe",
    });
    const [stderr, code] = await Promise.all([new Response(child.stderr).text(), child.exited]);
    return { lines: stderr.trimEnd().split("\n"), code };
  };
  const expectJsonError = ({ lines, code }: { lines: string[]; code: number }) => {
    expect(code).toBe(1);
    const records = lines.map((line) => JSON.parse(line)); // every line is a JSON object
    expect(records.filter((r) => r.level === "error")).toEqual([{
      level: "error",
      time: expect.any(String),
      message: `pg-tide: ${CANNOT_CONNECT}: connect ECONNREFUSED 127.0.0.1:1`,
      error: `${CANNOT_CONNECT}: connect ECONNREFUSED 127.0.0.1:1`,
      error_code: "connection",
      exit_code: 1,
    }]);
    expect(lines.join("\n")).not.toContain(password);
  };

  it("is one JSON log object when the relay logs JSON (flag, environment or manifest)", async () => {
    expectJsonError(await run(["--log-format", "json", "--postgres-url", unreachable]));
    expectJsonError(await run(["--postgres-url", unreachable], { PG_TIDE_LOG_FORMAT: "json" }));
    const manifest = join(dir, "json-logs.toml");
    await Bun.write(manifest, '[relay]\nlog_format = "json"\n');
    expectJsonError(await run(["--config", manifest, "--postgres-url", unreachable]));
  }, 60_000);

  it("stays one plain line in text mode", async () => {
    const { lines, code } = await run(["--postgres-url", unreachable]);
    expect(code).toBe(1);
    expect(lines).toEqual([`pg-tide: ${CANNOT_CONNECT}: connect ECONNREFUSED 127.0.0.1:1`]);
  });
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
