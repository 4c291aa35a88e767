import { afterAll, afterEach, beforeAll, describe, expect, it } from "bun:test";
import { createHmac } from "node:crypto";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ConfigError, pluginErrors } from "../../core/errors.ts";
import type { OutboxMessage, PluginContext, SinkDefinition } from "../../core/plugin.ts";
import { toJson } from "../../plugins/shared.ts";
import { validatePluginConfig } from "../../core/plugins.ts";
import { renderTemplate } from "../../core/config/template.ts";
import fileSink from "../../plugins/file/index.ts";
import { builtinPlugins } from "../../plugins/registry.ts";
import { defineStdoutSink } from "../../plugins/stdout/index.ts";
import webhookSink, { isPrivateAddress } from "../../plugins/webhook/index.ts";

function message(id: number, overrides: Partial<OutboxMessage> = {}): OutboxMessage {
  const fields = {
    id: BigInt(id),
    outbox: "orders",
    topic: "eu",
    payload: { order_id: `o-${id}`, total: id * 10 },
    headers: { tenant: "acme" },
    dedupKey: `orders:${id}`,
    eventType: "order.created",
    op: "insert",
    createdAt: new Date("2026-01-01T00:00:00Z"),
    ...overrides,
  };
  return { ...fields, payloadText: overrides.payloadText ?? toJson(fields.payload) };
}

function context(signal = new AbortController().signal): PluginContext {
  const quiet = () => {};
  return {
    pipeline: "orders-out",
    logger: { debug: quiet, info: quiet, warn: quiet, error: quiet },
    errors: pluginErrors,
    signal,
    batchSize: 100,
    render: renderTemplate,
  };
}

async function validate(definition: SinkDefinition, input: unknown) {
  return await definition.config["~standard"].validate(input);
}

/** Validates like the loader does, then creates the instance. */
async function open(definition: SinkDefinition, input: unknown, ctx = context()) {
  const result = await validate(definition, input);
  if (result.issues) throw new Error(`invalid config: ${JSON.stringify(result.issues)}`);
  const sink = definition.create(result.value, ctx);
  await sink.connect();
  return sink;
}

describe("built-in plugins", () => {
  it("each has an example config that validates", async () => {
    expect(builtinPlugins.map((p) => p.type)).toEqual(expect.arrayContaining(["stdout", "file", "webhook"]));
    for (const plugin of builtinPlugins) {
      const result = await plugin.config["~standard"].validate(plugin.example);
      expect({ type: plugin.type, issues: result.issues }).toEqual({ type: plugin.type, issues: undefined });
    }
  });
});

describe("stdout sink", () => {
  it("writes one JSON line per message with its metadata", async () => {
    const written: string[] = [];
    const sink = await open(defineStdoutSink({ write: (text) => void written.push(text) }), {});
    expect(await sink.publish([message(1), message(2, { topic: null })])).toEqual([]);
    const lines = written.join("").split("\n");
    expect(lines.pop()).toBe("");
    expect(lines.map((line) => JSON.parse(line))).toEqual([
      { id: "1", outbox: "orders", topic: "eu", event_type: "order.created", op: "insert", dedup_key: "orders:1", headers: { tenant: "acme" }, payload: { order_id: "o-1", total: 10 } },
      { id: "2", outbox: "orders", topic: null, event_type: "order.created", op: "insert", dedup_key: "orders:2", headers: { tenant: "acme" }, payload: { order_id: "o-2", total: 20 } },
    ]);
  });

  it("writes the payload alone in payload format", async () => {
    const written: string[] = [];
    const sink = await open(defineStdoutSink({ write: (text) => void written.push(text) }), { format: "payload" });
    await sink.publish([message(1)]);
    expect(written.join("")).toBe('{"order_id":"o-1","total":10}\n');
  });

  it("fails the whole batch, retriably, when the writer fails", async () => {
    const sink = await open(defineStdoutSink({ write: () => Promise.reject(new Error("EPIPE")) }), {});
    const failure = await sink.publish([message(1)]).catch((error) => error);
    expect(failure).toMatchObject({ retriable: true, message: 'stdout sink "orders-out": write failed: EPIPE' });
  });

  it("rejects an unknown format and unknown keys", async () => {
    const definition = defineStdoutSink();
    expect((await validate(definition, { format: "xml" })).issues?.[0]?.path).toEqual(["format"]);
    expect(JSON.stringify((await validate(definition, { colour: true })).issues)).toContain("colour");
  });
});

describe("file sink", () => {
  let dir: string;
  beforeAll(async () => void (dir = await mkdtemp(join(tmpdir(), "tide-file-sink-"))));
  afterAll(() => rm(dir, { recursive: true, force: true }));

  it("creates the parent directories and appends JSONL batch after batch", async () => {
    const path = join(dir, "nested", "deeper", "out.jsonl");
    const sink = await open(fileSink, { path });
    expect(await sink.publish([message(1), message(2)])).toEqual([]);
    expect(await sink.publish([message(3)])).toEqual([]);
    await sink.close();
    await sink.close();
    const lines = (await readFile(path, "utf8")).trimEnd().split("\n").map((line) => JSON.parse(line));
    expect(lines.map((line) => [line.id, line.dedup_key])).toEqual([["1", "orders:1"], ["2", "orders:2"], ["3", "orders:3"]]);
  });

  it("appends to an existing file in payload format without fsync", async () => {
    const path = join(dir, "payloads.jsonl");
    await Bun.write(path, '{"before":true}\n');
    const sink = await open(fileSink, { path, format: "payload", fsync: false });
    await sink.publish([message(7)]);
    expect(await readFile(path, "utf8")).toBe('{"before":true}\n{"order_id":"o-7","total":70}\n');
  });

  it("cuts off half a line left by a crash before appending", async () => {
    const path = join(dir, "torn.jsonl");
    await Bun.write(path, '{"before":true}\n{"half":');
    const sink = await open(fileSink, { path, format: "payload" });
    await sink.publish([message(8)]);
    expect(await readFile(path, "utf8")).toBe('{"before":true}\n{"order_id":"o-8","total":80}\n');
  });

  it("fails the batch retriably when the file cannot be written", async () => {
    const sink = await open(fileSink, { path: dir }); // a directory: open() fails with EISDIR
    const failure = await sink.publish([message(1)]).catch((error) => error);
    expect(failure.retriable).toBe(true);
    expect(failure.message).toContain(`file sink "orders-out": cannot append to ${dir}`);
  });

  it("requires a path", async () => {
    expect((await validate(fileSink, {})).issues?.[0]?.path).toEqual(["path"]);
  });
});

interface Received {
  method: string;
  path: string;
  headers: Headers;
  body: string;
}

describe("webhook sink", () => {
  let server: ReturnType<typeof Bun.serve>;
  let received: Received[] = [];
  let respond: (request: Received) => Response | Promise<Response> = () => new Response("ok");
  const base = () => `http://127.0.0.1:${server.port}`;

  beforeAll(() => {
    server = Bun.serve({
      port: 0,
      hostname: "127.0.0.1",
      async fetch(request) {
        const url = new URL(request.url);
        const entry = { method: request.method, path: url.pathname, headers: request.headers, body: await request.text() };
        received.push(entry);
        return respond(entry);
      },
    });
  });
  afterAll(() => server.stop(true));
  afterEach(() => {
    received = [];
    respond = () => new Response("ok");
  });

  it("sends one request per message with the payload as body and identifying headers", async () => {
    const sink = await open(webhookSink, { url: `${base()}/hooks/orders`, headers: { Authorization: "Bearer t0k" } });
    expect(await sink.publish([message(1), message(2)])).toEqual([]);
    expect(received.map((r) => [r.method, r.path, JSON.parse(r.body)])).toEqual([
      ["POST", "/hooks/orders", { order_id: "o-1", total: 10 }],
      ["POST", "/hooks/orders", { order_id: "o-2", total: 20 }],
    ]);
    const headers = received[0]!.headers;
    expect(headers.get("content-type")).toBe("application/json");
    expect(headers.get("idempotency-key")).toBe("orders:1");
    expect(headers.get("x-tide-event-type")).toBe("order.created");
    expect(headers.get("x-tide-outbox")).toBe("orders");
    expect(headers.get("x-tide-message-id")).toBe("1");
    expect(headers.get("authorization")).toBe("Bearer t0k");
  });

  it("sends credentials in the URL as Basic authorization", async () => {
    const sink = await open(webhookSink, { url: `http://hook:p%40ss@127.0.0.1:${server.port}/in` });
    await sink.publish([message(1)]);
    expect(received[0]!.headers.get("authorization")).toBe(`Basic ${btoa("hook:p@ss")}`);
  });

  it("uses PUT when configured and a per-message URL from url_template", async () => {
    const sink = await open(webhookSink, { url_template: `${base()}/events/{event_type}/{payload.order_id}`, method: "PUT" });
    await sink.publish([message(1), message(2, { eventType: "order.paid" })]);
    expect(received.map((r) => `${r.method} ${r.path}`)).toEqual(["PUT /events/order.created/o-1", "PUT /events/order.paid/o-2"]);
  });

  it("signs the body with HMAC-SHA256 in the configured header", async () => {
    const sink = await open(webhookSink, { url: base(), signing: { scheme: "hmac-sha256", secret: "s3cret", header: "X-Signature" } });
    await sink.publish([message(1)]);
    const { body, headers } = received[0]!;
    const expected = createHmac("sha256", "s3cret").update(body).digest("hex");
    expect(headers.get("x-signature")).toBe(`sha256=${expected}`);
  });

  it("signs with HMAC-SHA256 under X-Tide-Signature by default", async () => {
    const sink = await open(webhookSink, { url: base(), signing: { scheme: "hmac-sha256", secret: "s3cret" } });
    await sink.publish([message(1)]);
    const { body, headers } = received[0]!;
    expect(headers.get("x-tide-signature")).toBe(`sha256=${createHmac("sha256", "s3cret").update(body).digest("hex")}`);
  });

  it("with timestamp_header, sends the unix time and signs \"<timestamp>.<body>\" (what the webhook source verifies)", async () => {
    const sink = await open(webhookSink, { url: base(), signing: { scheme: "hmac-sha256", secret: "s3cret", timestamp_header: "X-Tide-Timestamp" } });
    await sink.publish([message(1)]);
    const { body, headers } = received[0]!;
    const timestamp = headers.get("x-tide-timestamp")!;
    expect(timestamp).toMatch(/^\d+$/);
    expect(Math.abs(Number(timestamp) - Date.now() / 1000)).toBeLessThan(3600);
    expect(headers.get("x-tide-signature")).toBe(`sha256=${createHmac("sha256", "s3cret").update(`${timestamp}.${body}`).digest("hex")}`);
  });

  it("signs per Standard Webhooks with a whsec_ secret", async () => {
    const key = Buffer.from("a-32-byte-key-for-standard-hooks");
    const sink = await open(webhookSink, { url: base(), signing: { scheme: "standard-webhooks", secret: `whsec_${key.toString("base64")}` } });
    await sink.publish([message(5)]);
    const { body, headers } = received[0]!;
    const id = headers.get("webhook-id");
    const timestamp = headers.get("webhook-timestamp")!;
    expect(id).toBe("orders:5");
    expect(timestamp).toMatch(/^\d+$/);
    const expected = createHmac("sha256", key).update(`${id}.${timestamp}.${body}`).digest("base64");
    expect(headers.get("webhook-signature")).toBe(`v1,${expected}`);
  });

  it("signs per Standard Webhooks with a raw secret", async () => {
    const sink = await open(webhookSink, { url: base(), signing: { scheme: "standard-webhooks", secret: "plain-secret" } });
    await sink.publish([message(6)]);
    const { body, headers } = received[0]!;
    const signed = `${headers.get("webhook-id")}.${headers.get("webhook-timestamp")}.${body}`;
    expect(headers.get("webhook-signature")).toBe(`v1,${createHmac("sha256", "plain-secret").update(signed).digest("base64")}`);
  });

  it("reports a 500 as a transient failure and does not send later messages", async () => {
    respond = (r) => (r.headers.get("idempotency-key") === "orders:2" ? new Response("db down", { status: 500 }) : new Response("ok"));
    const sink = await open(webhookSink, { url: base() });
    const failures = await sink.publish([message(1), message(2), message(3)]);
    expect(received.map((r) => r.headers.get("idempotency-key"))).toEqual(["orders:1", "orders:2"]);
    expect(failures.map((f) => [f.id, f.retriable])).toEqual([[2n, true], [3n, true]]);
    expect(failures[0]!.error.message).toContain("answered 500: db down");
    expect((failures[0]!.error as { retriable?: boolean }).retriable).toBe(true);
  });

  it("treats 408 and 429 as transient", async () => {
    for (const status of [408, 429]) {
      respond = () => new Response(null, { status });
      const sink = await open(webhookSink, { url: base() });
      expect((await sink.publish([message(1)])).map((f) => f.retriable)).toEqual([true]);
    }
  });

  it("reports a 400 as a permanent failure and carries on with the next messages", async () => {
    respond = (r) => (r.headers.get("idempotency-key") === "orders:1" ? new Response("bad total", { status: 400 }) : new Response("ok"));
    const sink = await open(webhookSink, { url: base() });
    const failures = await sink.publish([message(1), message(2)]);
    expect(received).toHaveLength(2);
    expect(failures.map((f) => [f.id, f.retriable])).toEqual([[1n, false]]);
    expect(failures[0]!.error.message).toContain("answered 400: bad total");
    expect((failures[0]!.error as { retriable?: boolean }).retriable).toBe(false);
  });

  it("does not follow redirects, which would turn the POST into a GET", async () => {
    respond = (r) => (r.path === "/old" ? Response.redirect(`${base()}/new`, 301) : new Response("ok"));
    const sink = await open(webhookSink, { url: `${base()}/old` });
    const failures = await sink.publish([message(1)]);
    expect(received.map((r) => r.path)).toEqual(["/old"]);
    expect(failures.map((f) => f.retriable)).toEqual([false]);
    expect(failures[0]!.error.message).toContain("answered 301");
  });

  it("reports a server slower than timeout_ms as a transient failure", async () => {
    const release = Promise.withResolvers<void>();
    respond = async () => {
      await release.promise;
      return new Response("too late");
    };
    try {
      const sink = await open(webhookSink, { url: base(), timeout_ms: 50 });
      const failures = await sink.publish([message(1)]);
      expect(failures.map((f) => [f.id, f.retriable])).toEqual([[1n, true]]);
      expect(failures[0]!.error.message).toContain("no response within 50 ms");
    } finally {
      release.resolve();
    }
  });

  it("gives up a request in flight when the pipeline stops", async () => {
    const release = Promise.withResolvers<void>();
    const arrived = Promise.withResolvers<void>();
    respond = async () => {
      arrived.resolve();
      await release.promise;
      return new Response("ok");
    };
    const stop = new AbortController();
    try {
      const sink = await open(webhookSink, { url: base() }, context(stop.signal));
      const publishing = sink.publish([message(1), message(2)]);
      await arrived.promise;
      stop.abort();
      expect((await publishing).map((f) => [f.id, f.retriable])).toEqual([[1n, true], [2n, true]]);
    } finally {
      release.resolve();
    }
  });

  it("reports an unreachable server as a transient failure", async () => {
    const closed = Bun.serve({ port: 0, hostname: "127.0.0.1", fetch: () => new Response("") });
    const url = `http://127.0.0.1:${closed.port}/`;
    await closed.stop(true);
    const sink = await open(webhookSink, { url });
    expect((await sink.publish([message(1)])).map((f) => f.retriable)).toEqual([true]);
  });

  it("sends a batch as one JSON array with a batch idempotency key", async () => {
    const sink = await open(webhookSink, { url: base(), mode: "batch" });
    expect(await sink.publish([message(1), message(2, { topic: null }), message(3)])).toEqual([]);
    expect(received).toHaveLength(1);
    expect(received[0]!.headers.get("idempotency-key")).toBe("orders:1..3");
    expect(JSON.parse(received[0]!.body)).toEqual([
      { id: "1", dedup_key: "orders:1", topic: "eu", event_type: "order.created", headers: { tenant: "acme" }, payload: { order_id: "o-1", total: 10 } },
      { id: "2", dedup_key: "orders:2", topic: null, event_type: "order.created", headers: { tenant: "acme" }, payload: { order_id: "o-2", total: 20 } },
      { id: "3", dedup_key: "orders:3", topic: "eu", event_type: "order.created", headers: { tenant: "acme" }, payload: { order_id: "o-3", total: 30 } },
    ]);
  });

  it("rejects the whole batch on a transient failure, so that all of it is retried", async () => {
    const sink = await open(webhookSink, { url: base(), mode: "batch" });
    respond = () => new Response(null, { status: 503 });
    const error = await sink.publish([message(1), message(2)]).catch((e) => e);
    expect(error).toMatchObject({ retriable: true });
    expect(error.message).toContain("answered 503");
  });

  it("fails every message of a batch the target refuses for good, so that the batch goes to the DLQ", async () => {
    const sink = await open(webhookSink, { url: base(), mode: "batch" });
    respond = () => new Response("schema mismatch", { status: 422 });
    const failures = await sink.publish([message(1), message(2)]);
    expect(failures.map((f) => [f.id, f.retriable])).toEqual([[1n, false], [2n, false]]);
    expect(failures[0]!.error.message).toContain("answered 422: schema mismatch");
  });

  it("with ssrf_guard, refuses loopback targets by IP and by name without sending", async () => {
    for (const host of ["127.0.0.1", "localhost"]) {
      const sink = await open(webhookSink, { url: `http://${host}:${server.port}/`, ssrf_guard: true });
      const failures = await sink.publish([message(1)]);
      expect(failures.map((f) => f.retriable)).toEqual([false]);
      expect(failures[0]!.error.message).toContain("refused by ssrf_guard");
    }
    expect(received).toHaveLength(0);
  });

  it("classifies private, loopback and link-local addresses", () => {
    for (const ip of ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "0.0.0.0", "100.64.0.1", "::1", "::", "fd00::1", "fe80::1%eth0", "::ffff:127.0.0.1", "::ffff:a9fe:a9fe"]) {
      expect({ ip, private: isPrivateAddress(ip) }).toEqual({ ip, private: true });
    }
    for (const ip of ["93.184.216.34", "172.32.0.1", "8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8"]) {
      expect({ ip, private: isPrivateAddress(ip) }).toEqual({ ip, private: false });
    }
  });

  it("classifies an IPv6 address by the IPv4 address it carries (mapped, translated, NAT64, compatible)", () => {
    for (const ip of ["::ffff:10.0.0.1", "::ffff:7f00:1", "::ffff:0:a00:1", "64:ff9b::a00:1", "64:ff9b::127.0.0.1", "::7f00:1", "64:ff9b:1::8.8.8.8"]) {
      expect({ ip, private: isPrivateAddress(ip) }).toEqual({ ip, private: true });
    }
    for (const ip of ["64:ff9b::808:808", "::ffff:0:8.8.8.8", "64:ff9b::1.1.1.1"]) {
      expect({ ip, private: isPrivateAddress(ip) }).toEqual({ ip, private: false });
    }
  });

  it("refuses broadcast, reserved, site-local and multicast ranges, and what is not an address", () => {
    for (const ip of ["255.255.255.255", "240.0.0.1", "224.0.0.251", "192.0.2.10", "198.18.0.1", "fec0::1", "ff02::1", "127.1", "not-an-ip", ""]) {
      expect({ ip, private: isPrivateAddress(ip) }).toEqual({ ip, private: true });
    }
    for (const ip of ["1.1.1.1", "2001:4860:4860::8888"]) {
      expect({ ip, private: isPrivateAddress(ip) }).toEqual({ ip, private: false });
    }
  });

  it("rejects an unknown url_template placeholder when the sink is created", async () => {
    const result = await validate(webhookSink, { url_template: "http://x/{nope}" });
    if (result.issues) throw new Error("expected the config itself to validate");
    expect(() => webhookSink.create(result.value, context())).toThrow("unknown placeholder {nope}");
  });

  it("reaches the user as a ConfigError naming the pipeline and the key", async () => {
    const attempt = validatePluginConfig(webhookSink, { timeout_ms: 0, retries: 3 }, 'pipeline "orders-out"');
    await expect(attempt).rejects.toBeInstanceOf(ConfigError);
    const message = await attempt.catch((error: Error) => error.message);
    expect(message).toStartWith('pipeline "orders-out": webhook sink config is invalid:');
    expect(message).toContain("'timeout_ms':");
    expect(message).toContain("retries");
  });

  it("rejects invalid configs with messages that name the key", async () => {
    const issues = async (input: unknown) => (await validate(webhookSink, input)).issues ?? [];
    const first = async (input: unknown) => {
      const [issue] = await issues(input);
      return { path: issue?.path?.map(String), message: issue?.message };
    };
    expect(await first({})).toEqual({ path: ["url"], message: "required unless 'url_template' is set" });
    expect(await first({ url: "ftp://example.com" })).toEqual({ path: ["url"], message: "must be an http(s) URL" });
    expect((await first({ url: "https://x", method: "DELETE" })).path).toEqual(["method"]);
    expect((await first({ url: "https://x", timeout_ms: -1 })).path).toEqual(["timeout_ms"]);
    expect((await first({ url: "https://x", url_template: "https://x/{id}" })).path).toEqual(["url_template"]);
    expect((await first({ url_template: "https://x/{id}", mode: "batch" })).path).toEqual(["url_template"]);
    expect((await first({ url: "https://x", signing: { scheme: "md5", secret: "s" } })).path).toEqual(["signing", "scheme"]);
    expect(await first({ url: "https://x", signing: { scheme: "standard-webhooks", secret: "whsec_!!" } })).toEqual({
      path: ["signing", "secret"],
      message: 'a "whsec_" secret must be followed by base64',
    });
    expect(JSON.stringify(await issues({ url: "https://x", retries: 3 }))).toContain("retries");
    expect(JSON.stringify(await issues({ url: "https://x", headers: { "Bad Name": "v" } }))).toContain("Bad Name");
  });
});
