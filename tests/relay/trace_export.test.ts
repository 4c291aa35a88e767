// The span exporter against a real HTTP receiver: what it sends (OTLP/HTTP JSON, links to each
// message's traceparent, malformed ones left out), and that it stays off the delivery path: a
// failing collector is logged once until it recovers, and a full queue drops spans instead of growing.

import { afterAll, beforeAll, describe, expect, it, setDefaultTimeout } from "bun:test";
import { outboxMessage } from "../../core/message.ts";
import { MAX_QUEUED_SPANS, parseTraceContext, SpanExporter } from "../../core/http/trace_export.ts";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createTestDatabase, freePort } from "../support/postgres.ts";
import { captureLogger, readJsonl, startRelay, waitFor } from "../support/relay.ts";

const TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

setDefaultTimeout(30_000);

let server: ReturnType<typeof Bun.serve>;
let status = 200;
const bodies: any[] = [];

function message(id: number, headers: Record<string, unknown>) {
  return outboxMessage({ id: BigInt(id), outbox: "orders", topic: null, payload: "{}", headers, createdAt: new Date() });
}

function exporter() {
  const { logger, lines } = captureLogger();
  const spans = new SpanExporter({ endpoint: `http://127.0.0.1:${server.port}/`, logger, relayId: "test:1", relayGroupId: "default" });
  return { spans, lines: () => lines.map((line) => JSON.parse(line)) };
}

beforeAll(() => {
  server = Bun.serve({
    port: 0,
    async fetch(request) {
      if (new URL(request.url).pathname === "/v1/traces") bodies.push(await request.json());
      return new Response("{}", { status });
    },
  });
});
afterAll(() => server.stop(true));

describe("trace context", () => {
  it("reads a W3C traceparent and refuses what is not one", () => {
    expect(parseTraceContext({ traceparent: TRACE, tracestate: "a=1" })).toEqual({
      traceId: "0af7651916cd43dd8448eb211c80319c",
      spanId: "b7ad6b7169203331",
      traceState: "a=1",
    });
    for (const bad of [undefined, 42, "", "garbage", TRACE.replace(/^00/, "ff"), `${TRACE}-extra`,
      "00-00000000000000000000000000000000-b7ad6b7169203331-01", "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01"]) {
      expect(parseTraceContext({ traceparent: bad })).toBeUndefined();
    }
    // A later version may add fields after the flags.
    expect(parseTraceContext({ traceparent: `${TRACE.replace(/^00/, "01")}-extra` })?.traceId).toBe("0af7651916cd43dd8448eb211c80319c");
  });
});

describe("span exporter", () => {
  it("sends one OTLP span per delivered batch, linked to the messages that carry a trace context", async () => {
    bodies.length = 0;
    const { spans } = exporter();
    spans.events.delivered!("orders-kafka", [message(1, { traceparent: TRACE }), message(2, {}), message(3, { traceparent: "bad" })], Date.now() - 5);
    await spans.flush();
    expect(bodies).toHaveLength(1);
    const [resource] = bodies[0].resourceSpans;
    expect(resource.resource.attributes).toContainEqual({ key: "service.name", value: { stringValue: "pg-tide" } });
    const [span] = resource.scopeSpans[0].spans;
    expect(span.name).toBe("send orders-kafka");
    expect(span.attributes).toContainEqual({ key: "messaging.batch.message_count", value: { intValue: "3" } });
    expect(span.links).toEqual([
      { traceId: "0af7651916cd43dd8448eb211c80319c", spanId: "b7ad6b7169203331", attributes: [{ key: "tide.dedup_key", value: { stringValue: "orders:1" } }] },
    ]);
    expect(BigInt(span.endTimeUnixNano) - BigInt(span.startTimeUnixNano)).toBeGreaterThanOrEqual(5_000_000n);
  });

  it("logs a failing collector once, drops those spans, and says when exports work again", async () => {
    const { spans, lines } = exporter();
    status = 503;
    try {
      for (let i = 0; i < 3; i++) {
        spans.events.delivered!("p", [message(i, { traceparent: TRACE })]);
        await spans.flush();
      }
      expect(lines().filter((l) => l.message.startsWith("trace export failed"))).toHaveLength(1);
      expect(lines()[0].endpoint).toBe(`http://127.0.0.1:${server.port}/v1/traces`);
    } finally {
      status = 200;
    }
    bodies.length = 0;
    spans.events.delivered!("p", [message(9, {})]);
    await spans.flush();
    expect(bodies).toHaveLength(1); // only the new span: the failed ones were dropped
    expect(lines().filter((l) => l.message.startsWith("trace export failed"))).toHaveLength(1);
    expect(lines().some((l) => l.message.startsWith("trace export: spans are being exported again"))).toBe(true);
  });

  it("bounds its queue: beyond it, spans are dropped with one warning, and recording never waits", async () => {
    const { spans, lines } = exporter();
    // No flush runs in between: delivered() only queues (and starts a send now and then, without waiting for it).
    for (let i = 0; i < MAX_QUEUED_SPANS * 2; i++) spans.events.delivered!("p", [message(i, {})]);
    expect(lines().filter((l) => l.message.startsWith("trace export: the span queue is full"))).toHaveLength(1);
    await spans.stop();
  });
});

describe("a relay with an OTLP endpoint", () => {
  it("refuses an --otlp-endpoint (or PG_TIDE_OTLP_ENDPOINT) that is not an http(s) URL, naming where it came from", async () => {
    const env = Object.fromEntries(Object.entries(process.env).filter(([name]) => !name.startsWith("PG_TIDE_")));
    const run = async (args: string[], extra: Record<string, string> = {}) => {
      const child = Bun.spawn([process.execPath, "main.ts", "run", "--postgres-url", "postgres://127.0.0.1:1/none", ...args], {
        cwd: `${import.meta.dir}/../..`, env: { ...env, ...extra }, stdout: "pipe", stderr: "pipe",
      });
      const [stderr, code] = await Promise.all([new Response(child.stderr).text(), child.exited]);
      return { stderr, code };
    };
    const flag = await run(["--otlp-endpoint", "localhost:4318"]);
    expect(flag.code).not.toBe(0);
    expect(flag.stderr).toContain('--otlp-endpoint must be an http(s) URL (got "localhost:4318")');
    const variable = await run([], { PG_TIDE_OTLP_ENDPOINT: "collector" });
    expect(variable.code).not.toBe(0);
    expect(variable.stderr).toContain("PG_TIDE_OTLP_ENDPOINT");
  });

  it("delivers as usual while the collector is down, and logs the failed export once", async () => {
    const db = await createTestDatabase();
    const dir = await mkdtemp(join(tmpdir(), "tide-otlp-"));
    const { logger, lines } = captureLogger();
    const relay = await startRelay(db.url, { logger, otlpEndpoint: `http://127.0.0.1:${await freePort()}` });
    try {
      await db.sql`SELECT tide.outbox_create('traced')`;
      await db.sql`SELECT tide.relay_set_outbox('to-file', 'traced', 'file', ${db.sql.json({ path: join(dir, "out.jsonl"), format: "payload" })},
                                                p_batch_size := 1)`;
      for (let n = 1; n <= 5; n++) await db.sql`SELECT tide.outbox_publish('traced', ${db.sql.json({ n })}, ${db.sql.json({ traceparent: TRACE })})`;
      expect(await waitFor("all five lines", async () => (await readJsonl(join(dir, "out.jsonl"))).length === 5)).toBe(true);
      await waitFor("the failed export to be logged", () => lines.some((line) => line.includes("trace export failed")));
    } finally {
      await relay.stop();
      await db.drop();
      await rm(dir, { recursive: true, force: true });
    }
    expect(lines.filter((line) => line.includes("trace export failed"))).toHaveLength(1);
  });
});
