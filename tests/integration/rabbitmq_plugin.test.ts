// The rabbitmq sink and source against a real RabbitMQ (127.0.0.1:5672, guest/guest): what queues
// receive from the sink (confirmed, persistent, mandatory), what the source hands out, acknowledges
// and redelivers, errors that name the server and never the secret, and a cut connection through a
// proxy that both resume from by themselves.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import amqp, { type Channel, type ChannelModel, type GetMessage } from "amqplib";
import type { OutboxMessage, PluginContext, PluginDefinition, SourceInstance } from "../../core/plugin.ts";
import { rabbitmqSink, rabbitmqSource } from "../../plugins/rabbitmq/index.ts";
import { toJson } from "../../plugins/shared.ts";
import { parseConfig, pluginContext } from "../support/plugins.ts";
import { waitFor } from "../support/relay.ts";
import { RABBITMQ, requireService } from "../support/services.ts";
import { TcpProxy } from "../support/tcp_proxy.ts";

const context = (overrides: Partial<PluginContext> = {}) => pluginContext("rabbitmq-test", overrides);
const parse = parseConfig;
const URL = RABBITMQ.url;
const up = await requireService(RABBITMQ.name, RABBITMQ.host, RABBITMQ.port);

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
    createdAt: new Date("2030-01-02T03:04:05Z"),
    ...overrides,
  };
  return { ...fields, payloadText: overrides.payloadText ?? toJson(fields.payload) };
}

const token = () => `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;

let connection: ChannelModel;
let channel: Channel;
const cleanup: (() => Promise<unknown>)[] = [];

/** A topic exchange with a queue bound to `pattern`, both deleted after the suite. */
async function exchangeWithQueue(pattern = "#"): Promise<{ exchange: string; queue: string }> {
  const exchange = `tide-test-${token()}`;
  const queue = `${exchange}-q`;
  await channel.assertExchange(exchange, "topic", { durable: false });
  await channel.assertQueue(queue, { durable: false });
  await channel.bindQueue(queue, exchange, pattern);
  cleanup.push(() => channel.deleteQueue(queue), () => channel.deleteExchange(exchange));
  return { exchange, queue };
}

/** A queue of its own (no exchange: the default exchange routes to it by name). */
async function queueOf(): Promise<string> {
  const queue = `tide-test-${token()}`;
  await channel.assertQueue(queue, { durable: false });
  cleanup.push(() => channel.deleteQueue(queue));
  return queue;
}

/** Takes `count` messages off a queue (acknowledged), waiting for them to arrive. */
async function take(queue: string, count: number): Promise<GetMessage[]> {
  const got: GetMessage[] = [];
  await waitFor(`${count} messages on ${queue} (have ${got.length})`, async () => {
    const m = await channel.get(queue, { noAck: true });
    if (m) got.push(m);
    return got.length >= count;
  }, 10_000);
  return got;
}

describe.skipIf(!up)("rabbitmq", () => {
  beforeAll(async () => {
    connection = await amqp.connect(URL);
    channel = await connection.createChannel();
  });
  afterAll(async () => {
    for (const step of cleanup.reverse()) await step().catch(() => {});
    await connection?.close();
  });

  describe("sink", () => {
    it("publishes confirmed, persistent messages: JSON body as is, message-id = dedup key, headers as AMQP headers", async () => {
      const { exchange, queue } = await exchangeWithQueue("orders.*");
      const sink = rabbitmqSink.create(await parse(rabbitmqSink, { url: URL, exchange, routing_key_template: "orders.{op}" }), context());
      await sink.connect();
      try {
        const exact = message(2, { payloadText: '{"total": 1.50, "big": 12345678901234567890}' });
        expect(await sink.publish([message(1), exact])).toEqual([]);
      } finally {
        await sink.close();
        await sink.close();
      }
      const [first, second] = await take(queue, 2);
      expect(first!.fields.routingKey).toBe("orders.insert");
      expect(first!.content.toString()).toBe('{"order_id":1}');
      expect(second!.content.toString()).toBe('{"total": 1.50, "big": 12345678901234567890}');
      expect(first!.properties).toMatchObject({
        messageId: "orders:1",
        type: "order.created",
        contentType: "application/json",
        deliveryMode: 2,
        timestamp: Date.parse("2030-01-02T03:04:05Z") / 1000,
      });
      expect(first!.properties.headers).toMatchObject({
        tenant: "acme",
        attempt: "2",
        "tide-event-type": "order.created",
        "tide-outbox": "orders",
        "tide-message-id": "1",
      });
    });

    it("publishes to the default exchange by queue name", async () => {
      const queue = await queueOf();
      const sink = rabbitmqSink.create(await parse(rabbitmqSink, { url: URL, routing_key: queue }), context());
      await sink.connect();
      try {
        expect(await sink.publish([message(1), message(2)])).toEqual([]);
      } finally {
        await sink.close();
      }
      expect((await take(queue, 2)).map((m) => m.properties.messageId)).toEqual(["orders:1", "orders:2"]);
    });

    it("sends a message whose headers AMQP cannot carry (over 64 KiB) to the DLQ and delivers the rest", async () => {
      const queue = await queueOf();
      const sink = rabbitmqSink.create(await parse(rabbitmqSink, { url: URL, routing_key: queue }), context());
      await sink.connect();
      try {
        const failures = await sink.publish([message(1), message(2, { headers: { note: "x".repeat(70_000) } }), message(3)]);
        expect(failures.map((f) => [f.id, f.retriable])).toEqual([[2n, false]]);
        expect(failures[0]!.error.message).toContain("cannot be sent");
      } finally {
        await sink.close();
      }
      expect((await take(queue, 2)).map((m) => m.properties.messageId)).toEqual(["orders:1", "orders:3"]);
    });

    it("refuses a routing key value with '.' for good, naming it, unless allow_dots_in names its placeholder", async () => {
      const { exchange, queue } = await exchangeWithQueue("orders.#");
      const strict = rabbitmqSink.create(await parse(rabbitmqSink, { url: URL, exchange, routing_key_template: "orders.{payload.region}" }), context());
      await strict.connect();
      try {
        const failures = await strict.publish([message(1, { payload: { region: "eu" } }), message(2, { payload: { region: "eu.secret" } })]);
        expect(failures.map((f) => [f.id, f.retriable])).toEqual([[2n, false]]);
        expect(failures[0]!.error.message).toContain(`{payload.region} is "eu.secret"`);
        expect(failures[0]!.error.message).toContain("allow_dots_in");
      } finally {
        await strict.close();
      }
      const config = { url: URL, exchange, routing_key_template: "orders.{payload.region}", allow_dots_in: ["payload.region"] };
      const lenient = rabbitmqSink.create(await parse(rabbitmqSink, config), context());
      await lenient.connect();
      try {
        expect(await lenient.publish([message(3, { payload: { region: "eu.west" } })])).toEqual([]);
      } finally {
        await lenient.close();
      }
      expect((await take(queue, 2)).map((m) => m.fields.routingKey)).toEqual(["orders.eu", "orders.eu.west"]);
    });

    it("fails a message no queue receives (mandatory) as refused and retriable, holding back the ones after it", async () => {
      const { exchange, queue } = await exchangeWithQueue("orders.bound");
      const sink = rabbitmqSink.create(await parse(rabbitmqSink, { url: URL, exchange, routing_key_template: "orders.{payload.to}" }), context());
      await sink.connect();
      try {
        const batch = [message(1, { payload: { to: "bound" } }), message(2, { payload: { to: "nowhere" } }), message(3, { payload: { to: "bound" } })];
        const failures = await sink.publish(batch);
        expect(failures.map((f) => [f.id, f.retriable, f.refused ?? false, f.heldBack ?? false])).toEqual([
          [2n, true, true, false],
          [3n, true, false, true],
        ]);
        expect(failures[0]!.error.message).toContain("no queue is bound to receive it");
        expect(failures[0]!.error.message).toContain("NO_ROUTE");
        // Once a binding routes it, the retry goes through.
        await channel.bindQueue(queue, exchange, "orders.nowhere");
        expect(await sink.publish(batch.slice(1))).toEqual([]);
      } finally {
        await sink.close();
      }
      expect((await take(queue, 4)).map((m) => m.properties.messageId)).toEqual(["orders:1", "orders:3", "orders:2", "orders:3"]);
    });

    it("holds back messages for an exchange that does not exist yet, and delivers them once it is declared", async () => {
      const queue = await queueOf();
      const missing = `tide-test-${token()}`;
      const config = { url: URL, exchange_template: "{payload.exchange}", routing_key: queue };
      const sink = rabbitmqSink.create(await parse(rabbitmqSink, config), context());
      await sink.connect();
      try {
        const batch = [message(1, { payload: { exchange: "amq.direct" } }), message(2, { payload: { exchange: missing } }), message(3, { payload: { exchange: "amq.direct" } })];
        const failures = await sink.publish(batch);
        // "amq.direct" is RabbitMQ's own: a value may not lead there (the template does not start with "amq.").
        expect(failures.map((f) => [f.id, f.retriable, f.heldBack ?? false])).toEqual([[1n, false, false], [2n, true, false], [3n, true, true]]);
        expect(failures[0]!.error.message).toContain(`exchanges starting with "amq."`);
        expect(failures[1]!.error.message).toContain(`no exchange "${missing}"`);
        await channel.assertExchange(missing, "direct", { durable: false });
        cleanup.push(() => channel.deleteExchange(missing));
        await channel.bindQueue(queue, missing, queue);
        expect(await sink.publish([batch[1]!])).toEqual([]);
      } finally {
        await sink.close();
      }
      expect((await take(queue, 1)).map((m) => m.properties.messageId)).toEqual(["orders:2"]);
    });

    it("fails connect() for a missing fixed exchange, naming it", async () => {
      const sink = rabbitmqSink.create(await parse(rabbitmqSink, { url: URL, exchange: `tide-missing-${token()}`, routing_key: "x" }), context());
      await expect(sink.connect()).rejects.toThrow(/'exchange': no exchange "tide-missing-\w+" on amqp:\/\/127\.0\.0\.1:5672; declare it/);
      await sink.close();
    });

    it("throws while the connection is cut (nothing lost), and delivers again by itself once it is back", async () => {
      const queue = await queueOf();
      const proxy = await TcpProxy.start(RABBITMQ.host, RABBITMQ.port);
      const sink = rabbitmqSink.create(await parse(rabbitmqSink, { url: `amqp://127.0.0.1:${proxy.port}`, routing_key: queue }), context());
      try {
        await sink.connect();
        expect(await sink.publish([message(1)])).toEqual([]);
        await proxy.cut();
        await expect(sink.publish([message(2)])).rejects.toThrow(`amqp://127.0.0.1:${proxy.port}`);
        await proxy.restore();
        expect(await waitFor("a publish after the connection is back", () => sink.publish([message(2)]).then((f) => f.length === 0, () => false)))
          .toBe(true);
      } finally {
        await sink.close();
        await proxy.stop();
      }
      expect((await take(queue, 2)).map((m) => m.properties.messageId)).toEqual(["orders:1", "orders:2"]);
    });

    it("names the server and the refused username on a bad login, on one line and without the password", async () => {
      const secret = `wrong-${token()}`;
      const sink = rabbitmqSink.create(await parse(rabbitmqSink, { url: URL, username: "guest", password: secret, routing_key: "x" }), context());
      const error = await sink.connect().then(() => undefined, (e: Error) => e);
      await sink.close();
      expect(error?.message).toBe(
        `rabbitmq sink "rabbitmq-test": cannot connect to RabbitMQ amqp://127.0.0.1:5672: ` +
          `the server refused 'username' "guest" with its 'password' (ACCESS_REFUSED)`,
      );
      const inUrl = rabbitmqSink.create(await parse(rabbitmqSink, { url: `amqp://guest:${secret}@127.0.0.1:5672`, routing_key: "x" }), context());
      const urlError = await inUrl.connect().then(() => undefined, (e: Error) => e);
      await inUrl.close();
      expect(urlError?.message).toContain("the server refused the credentials in 'url'");
      expect(urlError?.message).not.toContain(secret);
    });

    it("fails connect() naming an unreachable server", async () => {
      const sink = rabbitmqSink.create(await parse(rabbitmqSink, { url: "amqp://127.0.0.1:1", routing_key: "x" }), context());
      await expect(sink.connect()).rejects.toThrow(/cannot connect to RabbitMQ amqp:\/\/127\.0\.0\.1:1: .*ECONNREFUSED/);
      await sink.close();
    });
  });

  describe("source", () => {
    async function openSource(config: Record<string, unknown>, overrides: Partial<PluginContext> = {}): Promise<SourceInstance> {
      const source = rabbitmqSource.create(await parse(rabbitmqSource, { url: URL, ...config }), context(overrides));
      await source.connect();
      return source;
    }

    function send(queue: string, body: string, properties: Record<string, unknown> = {}): void {
      channel.sendToQueue(queue, Buffer.from(body), properties);
    }

    it("hands out at most one batch of unacknowledged messages (prefetch = batch size) and acks after being asked to", async () => {
      const queue = await queueOf();
      for (let i = 1; i <= 5; i++) send(queue, JSON.stringify({ n: i }), { messageId: `m-${i}` });
      const source = await openSource({ queue }, { batchSize: 2 });
      try {
        const first = (await source.read())!;
        expect(first.messages.map((m) => m.eventId)).toEqual(["m-1", "m-2"]);
        // Nothing beyond the batch is delivered before its ack: the broker holds the other three.
        expect((await channel.checkQueue(queue)).messageCount).toBe(3);
        await first.ack();
        const second = (await source.read())!;
        expect(second.messages.map((m) => m.eventId)).toEqual(["m-3", "m-4"]);
        await second.ack();
        const third = (await source.read())!;
        expect(third.messages.map((m) => m.eventId)).toEqual(["m-5"]);
        await third.ack();
      } finally {
        await source.close();
        await source.close();
      }
      const info = await channel.checkQueue(queue);
      expect([info.messageCount, info.consumerCount]).toEqual([0, 0]);
    });

    it("carries the body as it came, the message-id or a CloudEvents id as event id, and the AMQP headers", async () => {
      const queue = await queueOf();
      send(queue, '{"amount": 1.50}', { messageId: "pay-1", headers: { tenant: "acme", n: 3 } });
      send(queue, "not json at all", { headers: { "ce-id": "ce-binary-2" } });
      send(queue, JSON.stringify({ specversion: "1.0", id: "ce-structured-3", type: "paid", source: "/pay" }));
      send(queue, "{}");
      const source = await openSource({ queue });
      try {
        const got = [];
        while (got.length < 4) {
          const batch = (await source.read())!;
          got.push(...batch.messages);
          await batch.ack();
        }
        expect(got.map((m) => m.payloadText)).toEqual([
          '{"amount": 1.50}', '"not json at all"', JSON.stringify({ specversion: "1.0", id: "ce-structured-3", type: "paid", source: "/pay" }), "{}",
        ]);
        expect(got.map((m) => m.eventId)).toEqual(["pay-1", "ce-binary-2", "ce-structured-3", undefined]);
        expect(got[0]!.headers).toEqual({ tenant: "acme", n: 3 });
        expect(got[0]!.source).toBe(`rabbitmq:${queue}`);
        expect(got[3]!.transportId).toMatch(/^rabbitmq:[0-9a-f]{8}-\d+$/);
      } finally {
        await source.close();
      }
    });

    it("returns a nacked batch to the queue, and the broker redelivers what was never acked when the source goes away", async () => {
      const queue = await queueOf();
      send(queue, '{"n":1}', { messageId: "a" });
      send(queue, '{"n":2}', { messageId: "b" });
      const source = await openSource({ queue });
      try {
        const first = (await source.read())!;
        await first.nack!(new Error("inbox write failed"));
        const again = (await source.read())!;
        expect(again.messages.map((m) => m.eventId)).toEqual(["a", "b"]);
      } finally {
        await source.close(); // without an ack
      }
      const reopened = await openSource({ queue });
      try {
        const batch = (await reopened.read())!;
        expect(batch.messages.map((m) => m.eventId)).toEqual(["a", "b"]);
        await batch.ack();
      } finally {
        await reopened.close();
      }
      expect((await channel.checkQueue(queue)).messageCount).toBe(0);
    });

    it("resolves read() with null once the pipeline stops", async () => {
      const queue = await queueOf();
      const stop = new AbortController();
      const source = await openSource({ queue }, { signal: stop.signal });
      try {
        const reading = source.read();
        stop.abort();
        expect(await reading).toBeNull();
      } finally {
        await source.close();
      }
    });

    it("refuses a queue that does not exist, naming it", async () => {
      const source = rabbitmqSource.create(await parse(rabbitmqSource, { url: URL, queue: `tide-missing-${token()}` }), context());
      await expect(source.connect()).rejects.toThrow(/'queue': no queue "tide-missing-\w+" on amqp:\/\/127\.0\.0\.1:5672; declare it first/);
      await source.close();
    });

    it("fails the ack of a batch whose connection was cut, then reads it again from a new connection", async () => {
      const queue = await queueOf();
      send(queue, '{"n":1}', { messageId: "before-cut" });
      const proxy = await TcpProxy.start(RABBITMQ.host, RABBITMQ.port);
      const source = await openSource({ url: `amqp://127.0.0.1:${proxy.port}`, queue });
      try {
        const batch = (await source.read())!;
        await proxy.cut();
        await expect(batch.ack()).rejects.toThrow("delivers the batch again");
        send(queue, '{"n":2}', { messageId: "during-cut" });
        await expect(source.read()).rejects.toThrow(/closed|cannot connect/);
        await proxy.restore();
        const seen: string[] = [];
        await waitFor("both messages after the connection is back", async () => {
          const next = await source.read().catch(() => null);
          if (next) {
            seen.push(...next.messages.map((m) => m.eventId!));
            await next.ack();
          }
          return seen.includes("before-cut") && seen.includes("during-cut");
        });
      } finally {
        await source.close();
        await proxy.stop();
      }
    });
  });
});

describe("rabbitmq configs", () => {
  async function problems(definition: PluginDefinition, input: unknown): Promise<string[]> {
    const result = await definition.config["~standard"].validate(input);
    return (result.issues ?? []).map((i) => `${(i.path ?? []).map((p) => (typeof p === "object" ? p.key : p)).join(".")}: ${i.message}`);
  }

  it("accepts the examples and the usual shapes", async () => {
    expect(await problems(rabbitmqSink, rabbitmqSink.example)).toEqual([]);
    expect(await problems(rabbitmqSource, rabbitmqSource.example)).toEqual([]);
    expect(await problems(rabbitmqSink, { url: "amqp://rabbitmq:5672", exchange: "orders", routing_key: "" })).toEqual([]);
    expect(await problems(rabbitmqSink, { url: "amqps://u:p@mq.example.com/prod", routing_key: "q", tls: { ca: "PEM" } })).toEqual([]);
    expect(await problems(rabbitmqSource, { url: URL, queue: "q", username: "app", password: "p", event_id: "{payload.id}" })).toEqual([]);
  });

  it("rejects invalid configs, naming the key", async () => {
    expect(await problems(rabbitmqSink, { routing_key: "x" })).toEqual([expect.stringMatching(/^url: /)]);
    expect(await problems(rabbitmqSink, { url: "http://x", routing_key: "x" })).toEqual([expect.stringMatching(/^url: must start with amqp/)]);
    expect(await problems(rabbitmqSink, { url: URL })).toEqual([expect.stringMatching(/^routing_key: required/)]);
    expect(await problems(rabbitmqSink, { url: URL, routing_key: "a.{op}" })).toEqual([expect.stringMatching(/^routing_key: has a placeholder/)]);
    expect(await problems(rabbitmqSink, { url: URL, routing_key: "x", routing_key_template: "{op}" })).toEqual([expect.stringMatching(/^routing_key_template: /)]);
    expect(await problems(rabbitmqSink, { url: URL, exchange: "e", exchange_template: "{op}", routing_key: "" })).toEqual([expect.stringMatching(/^exchange_template: /)]);
    expect(await problems(rabbitmqSink, { url: URL, routing_key: "x", allow_dots_in: ["op"] })).toEqual([expect.stringMatching(/^allow_dots_in: /)]);
    expect(await problems(rabbitmqSink, { url: URL, routing_key: "x", password: "p" })).toEqual([expect.stringMatching(/^password: needs/)]);
    expect(await problems(rabbitmqSink, { url: "amqp://a:b@h", routing_key: "x", username: "u" })).toEqual([expect.stringMatching(/^username: /)]);
    expect(await problems(rabbitmqSink, { url: URL, routing_key: "x", tls: {} })).toEqual([expect.stringMatching(/^tls: needs an amqps/)]);
    expect(await problems(rabbitmqSink, { url: URL, routing_key: "k".repeat(256) })).toEqual([expect.stringMatching(/^routing_key: must be at most 255/)]);
    expect(await problems(rabbitmqSink, { url: URL, routing_key: "x", topic: "t" })).toEqual([expect.stringMatching(/topic/)]);
    expect(await problems(rabbitmqSource, { url: URL })).toEqual([expect.stringMatching(/^queue: /)]);
  });

  it("create() does no I/O and reports an unknown placeholder as a config error", async () => {
    const sink = rabbitmqSink.create(await parse(rabbitmqSink, { url: "amqp://127.0.0.1:1", routing_key: "x" }), context());
    await sink.close();
    const source = rabbitmqSource.create(await parse(rabbitmqSource, { url: "amqp://127.0.0.1:1", queue: "q" }), context());
    await source.close();
    const templated = await parse(rabbitmqSink, { url: URL, routing_key_template: "a.{nope}" });
    expect(() => rabbitmqSink.create(templated, context())).toThrow(/nope/);
    const dots = await parse(rabbitmqSink, { url: URL, routing_key_template: "a.{op}", allow_dots_in: ["payload.x"] });
    expect(() => rabbitmqSink.create(dots, context())).toThrow(/no placeholder \{payload\.x\} named in 'allow_dots_in'/);
  });
});
