// The nats sink and source against a real NATS server with JetStream (127.0.0.1:4222): what
// subscribers and streams receive from the sink, and what the source hands out, acks and redelivers.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { connect, headers as natsHeaders, type NatsConnection } from "@nats-io/transport-node";
import { jetstream, jetstreamManager, type JetStreamManager } from "@nats-io/jetstream";
import type { OutboxMessage, PluginContext, PluginDefinition, SourceInstance } from "../../core/plugin.ts";
import { toJson } from "../../plugins/shared.ts";
import { natsSink, natsSource } from "../../plugins/nats/index.ts";
import { requireService } from "../support/services.ts";
import { collectNats, parseConfig, pluginContext } from "../support/plugins.ts";

const context = (overrides: Partial<PluginContext> = {}) => pluginContext("nats-test", overrides);
const parse = parseConfig;

const URL = "nats://127.0.0.1:4222";
const up = await requireService("nats", "127.0.0.1", 4222);

function message(id: number, overrides: Partial<OutboxMessage> = {}): OutboxMessage {
  const fields = {
    id: BigInt(id),
    outbox: "orders",
    topic: null,
    payload: { order_id: id },
    headers: { event_type: "order.created", tenant: "acme", attempt: 2 },
    dedupKey: `orders:${id}`,
    eventType: "order.created",
    op: "insert",
    createdAt: new Date(),
    ...overrides,
  };
  return { ...fields, payloadText: overrides.payloadText ?? toJson(fields.payload) };
}

const token = () => `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;

let nc: NatsConnection;
let jsm: JetStreamManager;
const streams: string[] = [];

/** A stream of its own for one test: `TIDE_<token>` storing `<prefix>.>`. */
async function createStream(prefix: string): Promise<string> {
  const name = `TIDE_${prefix.replace(/\W/g, "_")}`;
  await jsm.streams.add({ name, subjects: [`${prefix}.>`] });
  streams.push(name);
  return name;
}

describe.skipIf(!up)("nats", () => {
  beforeAll(async () => {
    nc = await connect({ servers: URL });
    jsm = await jetstreamManager(nc);
  });
  afterAll(async () => {
    for (const name of streams) await jsm.streams.delete(name).catch(() => {});
    await nc.drain();
  });

  describe("sink", () => {
    it("publishes on core NATS when no stream stores the subject, with tide's headers", async () => {
      const prefix = `tide.core.${token()}`;
      const received = collectNats(nc, `${prefix}.>`, 2);
      await nc.flush();
      const sink = natsSink.create(await parse(natsSink, { url: URL, subject_template: `${prefix}.{op}` }), context());
      await sink.connect();
      try {
        expect(await sink.publish([message(1), message(2, { op: "delete" })])).toEqual([]);
      } finally {
        await sink.close();
        await sink.close();
      }
      const [first, second] = await received;
      expect([first!.subject, second!.subject]).toEqual([`${prefix}.insert`, `${prefix}.delete`]);
      expect(first!.json()).toEqual({ order_id: 1 });
      expect(first!.headers?.get("Nats-Msg-Id")).toBe("orders:1");
      expect(first!.headers?.get("Tide-Event-Type")).toBe("order.created");
      expect(first!.headers?.get("tenant")).toBe("acme");
      expect(first!.headers?.get("attempt")).toBe("2");
    });

    it("sends header values that are not strings as JSON text", async () => {
      const subject = `tide.headers.${token()}`;
      const received = collectNats(nc, subject, 1);
      await nc.flush();
      const sink = natsSink.create(await parse(natsSink, { url: URL, subject, mode: "core" }), context());
      await sink.connect();
      try {
        const headers = { event_type: "x", n: 3, flag: true, meta: { a: [1, "b"] }, none: null };
        expect(await sink.publish([message(1, { headers })])).toEqual([]);
      } finally {
        await sink.close();
      }
      const [got] = await received;
      const h = got!.headers!;
      expect([h.get("event_type"), h.get("n"), h.get("flag"), h.get("meta"), h.get("none")]).toEqual(["x", "3", "true", '{"a":[1,"b"]}', "null"]);
    });

    it("publishes through JetStream with Nats-Msg-Id, so a repeated dedup key is stored once", async () => {
      const prefix = `tidejs${token()}`;
      const stream = await createStream(prefix);
      const sink = natsSink.create(await parse(natsSink, { url: URL, subject: `${prefix}.orders`, mode: "jetstream" }), context());
      await sink.connect();
      try {
        expect(await sink.publish([message(1), message(2), message(3)])).toEqual([]);
        expect(await sink.publish([message(2), message(3)])).toEqual([]);
      } finally {
        await sink.close();
      }
      const info = await jsm.streams.info(stream);
      expect(info.state.messages).toBe(3);
      const stored = await jsm.streams.getMessage(stream, { seq: 2 });
      expect(stored!.header.get("Nats-Msg-Id")).toBe("orders:2");
      expect(stored!.json()).toEqual({ order_id: 2 });
    });

    it("in auto mode, uses JetStream for subjects a stream stores and core for the others", async () => {
      const prefix = `tideauto${token()}`;
      const stream = await createStream(prefix);
      const elsewhere = `tide.other.${token()}`;
      const received = collectNats(nc, elsewhere, 1);
      await nc.flush();
      const sink = natsSink.create(await parse(natsSink, { url: URL, subject_template: "{payload.subject}", allow_dots_in: ["payload.subject"] }), context());
      await sink.connect();
      try {
        const failures = await sink.publish([
          message(1, { payload: { subject: `${prefix}.a` } }),
          message(2, { payload: { subject: elsewhere } }),
          message(3, { payload: { subject: "bad subject" } }),
        ]);
        expect(failures.map((f) => [f.id, f.retriable])).toEqual([[3n, false]]);
      } finally {
        await sink.close();
      }
      expect((await received).map((m) => m.headers?.get("Tide-Message-Id"))).toEqual(["2"]);
      expect((await jsm.streams.info(stream)).state.messages).toBe(1);
    });

    it("refuses mode jetstream without a stream: at connect for a fixed subject, per message (retriable, in order) for a template", async () => {
      const subject = `tide.nostream.${token()}`;
      const fixed = natsSink.create(await parse(natsSink, { url: URL, subject, mode: "jetstream" }), context());
      await expect(fixed.connect()).rejects.toThrow(/no JetStream stream covers subject/);
      await fixed.close();
      const templated = natsSink.create(await parse(natsSink, { url: URL, subject_template: `${subject}.{op}`, mode: "jetstream" }), context());
      await templated.connect();
      try {
        const failures = await templated.publish([message(1), message(2)]);
        expect(failures.map((f) => [f.id, f.retriable])).toEqual([[1n, true], [2n, true]]);
        expect(failures[0]!.error.message).toContain("no JetStream stream");
        expect(failures[1]!.error.message).toContain("held back behind message 1");
      } finally {
        await templated.close();
      }
    });

    it("sends a message larger than the server's max_payload to the DLQ and delivers the rest", async () => {
      const subject = `tide.big.${token()}`;
      const received = collectNats(nc, subject, 2);
      await nc.flush();
      const sink = natsSink.create(await parse(natsSink, { url: URL, subject, mode: "core" }), context());
      await sink.connect();
      try {
        const failures = await sink.publish([message(1), message(2, { payload: { blob: "x".repeat(2_000_000) } }), message(3)]);
        expect(failures.map((f) => [f.id, f.retriable])).toEqual([[2n, false]]);
      } finally {
        await sink.close();
      }
      expect((await received).map((m) => m.headers?.get("Tide-Message-Id"))).toEqual(["1", "3"]);
    });

    it("fails connect() naming an unreachable server", async () => {
      const sink = natsSink.create(await parse(natsSink, { url: "nats://127.0.0.1:1", subject: "x" }), context());
      await expect(sink.connect()).rejects.toThrow(/127\.0\.0\.1:1/);
      await sink.close();
    });
  });

  describe("source", () => {
    async function openSource(config: Record<string, unknown>, overrides: Partial<PluginContext> = {}): Promise<SourceInstance> {
      const source = natsSource.create(await parse(natsSource, { url: URL, ...config }), context(overrides));
      await source.connect();
      return source;
    }

    async function publishThree(subject: string) {
      const js = jetstream(nc);
      const h = natsHeaders();
      h.set("Nats-Msg-Id", "payment-1");
      await js.publish(subject, JSON.stringify({ payment_id: "pay-001" }), { headers: h });
      await js.publish(subject, JSON.stringify({ payment_id: "pay-002" }));
      await js.publish(subject, "not json at all");
    }

    it("reads a stream through a durable consumer and acks after being asked to", async () => {
      const prefix = `tidesrc${token()}`;
      await createStream(prefix);
      await publishThree(`${prefix}.confirmed`);
      const source = await openSource({ subject: `${prefix}.confirmed`, durable_name: "payments" });
      try {
        const batch = (await source.read())!;
        expect(batch.messages.map((m) => m.transportId)).toEqual(["nats:seq-1", "nats:seq-2", "nats:seq-3"]);
        expect(batch.messages.map((m) => m.eventId)).toEqual(["payment-1", undefined, undefined]);
        expect(batch.messages.map((m) => JSON.parse(m.payloadText!))).toEqual([{ payment_id: "pay-001" }, { payment_id: "pay-002" }, "not json at all"]);
        expect(batch.messages[0]!.headers).toEqual({ "Nats-Msg-Id": "payment-1" });
        expect(batch.messages[0]!.source).toBe(`nats:${prefix}.confirmed`);
        await batch.ack();
        await jetstream(nc).publish(`${prefix}.confirmed`, JSON.stringify({ payment_id: "pay-004" }));
        const next = (await source.read())!;
        expect(next.messages.map((m) => m.transportId)).toEqual(["nats:seq-4"]);
        await next.ack();
      } finally {
        await source.close();
        await source.close();
      }
      // A new source on the same durable (named through the consumer_group alias) finds nothing left.
      const stop = new AbortController();
      const again = await openSource({ subject: `${prefix}.confirmed`, consumer_group: "payments" }, { signal: stop.signal });
      try {
        setTimeout(() => stop.abort(), 1_500);
        expect(await again.read()).toBeNull();
        const info = await jsm.consumers.info(`TIDE_${prefix}`, "payments");
        expect([info.num_pending, info.num_ack_pending]).toEqual([0, 0]);
      } finally {
        await again.close();
      }
    });

    it("delivers again after a nack, and after ack_wait when never acked", async () => {
      const prefix = `tideredo${token()}`;
      await createStream(prefix);
      await publishThree(`${prefix}.x`);
      const source = await openSource({ subject: `${prefix}.>`, durable_name: "redo", ack_wait_ms: 1_000 });
      try {
        const first = (await source.read())!;
        await first.nack!(new Error("inbox write failed"));
        const second = (await source.read())!;
        expect(second.messages.map((m) => m.transportId).sort()).toEqual(["nats:seq-1", "nats:seq-2", "nats:seq-3"]);
        // Not acked: JetStream delivers them again once ack_wait (1 s) has passed; redeliveries come
        // in no guaranteed order (and may repeat), which the inbox's unique event_id absorbs.
        const redelivered = new Set<string>();
        while (redelivered.size < 3) {
          const third = (await source.read())!;
          for (const m of third.messages) redelivered.add(m.transportId);
          await third.ack();
        }
        expect([...redelivered].sort()).toEqual(["nats:seq-1", "nats:seq-2", "nats:seq-3"]);
      } finally {
        await source.close();
      }
      // Reopened with another ack_wait: the existing durable consumer is updated, not refused.
      const reopened = await openSource({ subject: `${prefix}.>`, durable_name: "redo", ack_wait_ms: 2_000 });
      await reopened.close();
      const info = await jsm.consumers.info(`TIDE_${prefix}`, "redo");
      expect([info.config.ack_wait, info.num_ack_pending]).toEqual([2_000_000_000, 0]);
    });

    it("shares core messages between two sources of one queue group", async () => {
      const subject = `tide.queue.${token()}`;
      const stop = new AbortController();
      const options = { subject, queue_group: "relays", mode: "core" };
      const a = await openSource(options, { signal: stop.signal });
      const b = await openSource(options, { signal: stop.signal });
      const seen: Record<string, string[]> = { a: [], b: [] };
      const drain = async (name: string, source: SourceInstance) => {
        for (let batch = await source.read(); batch; batch = await source.read()) {
          seen[name]!.push(...batch.messages.map((m) => String(JSON.parse(m.payloadText!))));
          await batch.ack();
          if (seen.a!.length + seen.b!.length >= 40) stop.abort();
        }
      };
      const readers = Promise.all([drain("a", a), drain("b", b)]);
      for (let i = 0; i < 40; i += 1) nc.publish(subject, `message ${i}`);
      await nc.flush();
      await readers;
      await Promise.all([a.close(), b.close()]);
      expect(seen.a!.length).toBeGreaterThan(0);
      expect(seen.b!.length).toBeGreaterThan(0);
      expect(new Set([...seen.a!, ...seen.b!]).size).toBe(40);
    });

    it("falls back to core NATS in auto mode, with raw strings for non-JSON bodies and ids from Nats-Msg-Id", async () => {
      const subject = `tide.autocore.${token()}`;
      const source = await openSource({ subject });
      try {
        const h = natsHeaders();
        h.set("Nats-Msg-Id", "orders:9");
        nc.publish(subject, "plain text", { headers: h });
        nc.publish(subject, "[1,2]");
        await nc.flush();
        const got = [];
        while (got.length < 2) got.push(...(await source.read())!.messages);
        expect(got.map((m) => JSON.parse(m.payloadText!))).toEqual(["plain text", [1, 2]]);
        expect(got.map((m) => m.eventId)).toEqual(["orders:9", undefined]);
        expect(got[0]!.transportId).toMatch(/^nats:core-[0-9a-f]{8}-\d+$/);
      } finally {
        await source.close();
      }
    });

    it("takes a CloudEvents id as the event id: the ce-id header, else the id of a structured CloudEvents body", async () => {
      const subject = `tide.cloudevents.${token()}`;
      const source = await openSource({ subject });
      try {
        const h = natsHeaders();
        h.set("ce-id", "ce-binary-1");
        h.set("ce-specversion", "1.0");
        nc.publish(subject, JSON.stringify({ amount: 1 }), { headers: h });
        nc.publish(subject, JSON.stringify({ specversion: "1.0", id: "ce-structured-2", type: "paid", source: "/pay", data: {} }));
        nc.publish(subject, JSON.stringify({ id: "not-a-cloudevent" }));
        await nc.flush();
        const got = [];
        while (got.length < 3) got.push(...(await source.read())!.messages);
        expect(got.map((m) => m.eventId)).toEqual(["ce-binary-1", "ce-structured-2", undefined]);
      } finally {
        await source.close();
      }
    });
  });
});

describe("nats configs", () => {
  async function problems(definition: PluginDefinition, input: unknown): Promise<string[]> {
    const result = await definition.config["~standard"].validate(input);
    return (result.issues ?? []).map((i) => `${(i.path ?? []).map((p) => (typeof p === "object" ? p.key : p)).join(".")}: ${i.message}`);
  }

  it("accepts the seeds' pipeline configs and the examples", async () => {
    expect(await problems(natsSink, { url: "nats://nats:4222", subject_template: "events.orders.{op}" })).toEqual([]);
    expect(await problems(natsSink, { url: "nats://nats:4222", subject: "orders.events" })).toEqual([]);
    expect(await problems(natsSource, { url: "nats://localhost:4222", subject: "payments.confirmed", queue_group: "pg-tide-payments" }))
      .toEqual([]);
    const bus = {
      url: "nats://nats:4222",
      subject: "events.orders.>",
      consumer_group: "shipping-service",
      durable_name: "shipping-service",
      transform: { filter: "payload.event_type == 'order.created'" },
    };
    expect(await problems(natsSource, bus)).toEqual([]);
    expect(await problems(natsSink, natsSink.example)).toEqual([]);
    expect(await problems(natsSource, natsSource.example)).toEqual([]);
    expect(await problems(natsSink, { url: ["nats://a:4222", "b:4222"], subject: "x", user: "u", password: "p" })).toEqual([]);
  });

  it("rejects invalid configs, naming the key", async () => {
    expect(await problems(natsSink, { subject: "x" })).toEqual([expect.stringMatching(/^url: /)]);
    expect(await problems(natsSink, { url: "", subject: "x" })).toEqual([expect.stringMatching(/^url: /)]);
    expect(await problems(natsSink, { url: URL, subject: "orders.*" })).toEqual([expect.stringMatching(/^subject: /)]);
    expect(await problems(natsSink, { url: URL })).toEqual([expect.stringMatching(/^subject: required/)]);
    expect(await problems(natsSink, { url: URL, subject: "a.{op}" })).toEqual([expect.stringMatching(/^subject: has a placeholder/)]);
    expect(await problems(natsSink, { url: URL, subject: "x", mode: "push" })).toEqual([expect.stringMatching(/^mode: /)]);
    expect(await problems(natsSink, { url: URL, subject: "x", token: "t", user: "u" })).toEqual([expect.stringMatching(/^user: /)]);
    expect(await problems(natsSink, { url: URL, subject: "x", password: "p" })).toEqual([expect.stringMatching(/^password: needs/)]);
    expect(await problems(natsSink, { url: URL, subject: "x", brokers: "a:1" })).toEqual([expect.stringMatching(/brokers/)]);
    expect(await problems(natsSource, { url: URL, subject: "a b" })).toEqual([expect.stringMatching(/^subject: /)]);
    expect(await problems(natsSource, { url: URL, subject: "a", durable_name: "a.b" })).toEqual([expect.stringMatching(/^durable_name: /)]);
    expect(await problems(natsSource, { url: URL, subject: "a", durable_name: "x", consumer_group: "y" })).toEqual([
      expect.stringMatching(/^consumer_group: /),
    ]);
    expect(await problems(natsSource, { url: URL, subject: "a", ack_wait_ms: 10 })).toEqual([expect.stringMatching(/^ack_wait_ms: /)]);
    expect(await problems(natsSource, { url: URL, subject: "a", deliver_policy: "last" })).toEqual([
      expect.stringMatching(/^deliver_policy: /),
    ]);
  });

  it("create() does no I/O and reports an unknown placeholder as a config error", async () => {
    const sink = natsSink.create(await parse(natsSink, { url: "nats://127.0.0.1:1", subject: "x" }), context());
    await sink.close();
    const source = natsSource.create(await parse(natsSource, { url: "nats://127.0.0.1:1", subject: "x" }), context());
    await source.close();
    const templated = await parse(natsSink, { url: URL, subject_template: "a.{nope}" });
    expect(() => natsSink.create(templated, context())).toThrow(/nope/);
  });
});
