// W3C trace context from the publishing transaction to every sink and from every source into the
// inbox, against the real servers: a publisher passes `traceparent`/`tracestate` in the headers, or
// sets `tide.traceparent` for its transaction; every sink carries them in its native header form;
// every source keeps them in the inbox row's headers; and with an OTLP endpoint the relay exports
// one span per delivered batch, linked to each message's trace, to a collector (here a small
// node:http receiver that parses the OTLP/HTTP JSON).

import { afterAll, beforeAll, describe, expect, it, setDefaultTimeout } from "bun:test";
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import type { Msg } from "@nats-io/transport-node";
import amqp, { type Channel, type ChannelModel, type ConsumeMessage } from "amqplib";
import { Redis } from "ioredis";
import mqtt, { type IPublishPacket, type MqttClient } from "mqtt";
import type { Relay } from "../../core/relay.ts";
import { KAFKA_BROKER, KafkaReader, NATS_URL, NatsTestClient, createTopics, kafkaClient, produceKafka, unique } from "../support/brokers.ts";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { startRelay, waitFor } from "../support/relay.ts";
import { MQTT, RABBITMQ, REDIS, requireService } from "../support/services.ts";

const up = (await Promise.all([
  requireService("kafka", "127.0.0.1", 9092),
  requireService("nats", "127.0.0.1", 4222),
  requireService(RABBITMQ.name, RABBITMQ.host, RABBITMQ.port),
  requireService(MQTT.name, MQTT.host, MQTT.port),
  requireService(REDIS.name, REDIS.host, REDIS.port),
])).every(Boolean);

setDefaultTimeout(60_000);

const RUN = unique();
/** In the headers, with a tracestate. */
const HEADER_TRACE = { traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", tracestate: "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7" };
/** Set for the transaction with SET LOCAL tide.traceparent. */
const SESSION_TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const SINKS = ["webhook", "kafka", "nats", "rabbitmq", "mqtt", "redis"] as const;
type Sink = (typeof SINKS)[number];

let db: TestDatabase;

async function headersOf(id: bigint): Promise<Record<string, unknown>> {
  const [row] = await db.sql`SELECT headers FROM tide.outbox_messages WHERE id = ${id}`;
  return row!.headers;
}

describe.skipIf(!up)("trace context", () => {
  beforeAll(async () => {
    db = await createTestDatabase();
    await db.sql`SELECT tide.outbox_create('traced_sql')`;
  });
  afterAll(async () => {
    await db?.drop();
  });

  describe("tide.outbox_publish", () => {
    it("stores the transaction's tide.traceparent in the row's headers", async () => {
      const id = await db.sql.begin(async (tx) => {
        await tx.unsafe(`SET LOCAL tide.traceparent = '${SESSION_TRACE}'`);
        const [row] = await tx`SELECT tide.outbox_publish('traced_sql', '{"n": 1}'::jsonb, '{"event_type": "x"}'::jsonb) AS id`;
        return row!.id as bigint;
      });
      expect(await headersOf(id)).toEqual({ event_type: "x", traceparent: SESSION_TRACE });
    });

    it("keeps a traceparent the headers carry (and their tracestate) over the setting", async () => {
      const id = await db.sql.begin(async (tx) => {
        await tx`SELECT set_config('tide.traceparent', ${SESSION_TRACE}, true)`;
        const [row] = await tx`SELECT tide.outbox_publish('traced_sql', 'topic', '{"n": 2}'::jsonb, ${db.sql.json(HEADER_TRACE)}) AS id`;
        return row!.id as bigint;
      });
      expect(await headersOf(id)).toEqual(HEADER_TRACE);
    });

    it("ignores a value that is not a traceparent, and the transaction commits", async () => {
      for (const bad of ["garbage", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331", "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01", "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
        "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01"]) {
        const id = await db.sql.begin(async (tx) => {
          await tx`SELECT set_config('tide.traceparent', ${bad}, true)`;
          const [row] = await tx`SELECT tide.outbox_publish('traced_sql', '{"n": 3}'::jsonb, NULL) AS id`;
          return row!.id as bigint;
        });
        expect(await headersOf(id)).toEqual({});
      }
    });

    it("forgets the setting when the transaction ends (SET LOCAL)", async () => {
      const session = await db.sql.reserve();
      try {
        await session.unsafe(`BEGIN; SET LOCAL tide.traceparent = '${SESSION_TRACE}'; COMMIT`);
        const [row] = await session`SELECT tide.outbox_publish('traced_sql', '{"n": 4}'::jsonb) AS id`;
        expect(await headersOf(row!.id)).toEqual({});
      } finally {
        session.release();
      }
    });
  });

  describe("from the outbox to every sink, with a span per delivered batch", () => {
    let relay: Relay;
    let webhook: ReturnType<typeof Bun.serve>;
    let collector: Server;
    let nats: NatsTestClient;
    let kafka: KafkaReader;
    let amqpConnection: ChannelModel;
    let channel: Channel;
    let mqttClient: MqttClient;
    let redis: Redis;
    const requests: Headers[] = [];
    const natsMessages: Msg[] = [];
    const amqpMessages: ConsumeMessage[] = [];
    const mqttPackets: IPublishPacket[] = [];
    const spans: any[] = [];
    const stream = `tide-trace-${RUN}`;
    const queue = `tide-trace-${RUN}`;

    /** The trace context each sink delivered, for the message published with headers and for the other. */
    async function delivered(sink: Sink): Promise<{ traceparent?: string; tracestate?: string }[] | undefined> {
      const pick = (get: (name: string) => unknown) =>
        Object.fromEntries(["traceparent", "tracestate"].map((n) => [n, get(n)]).filter(([, v]) => v !== undefined && v !== null));
      switch (sink) {
        case "webhook":
          return requests.length === 2 ? requests.map((h) => pick((n) => h.get(n))) : undefined;
        case "kafka":
          return kafka.records.length === 2 ? kafka.records.map((r) => pick((n) => r.headers[n])) : undefined;
        case "nats":
          return natsMessages.length === 2 ? natsMessages.map((m) => pick((n) => (m.headers?.has(n) ? m.headers.get(n) : undefined))) : undefined;
        case "rabbitmq":
          return amqpMessages.length === 2 ? amqpMessages.map((m) => pick((n) => m.properties.headers?.[n]?.toString())) : undefined;
        case "mqtt":
          return mqttPackets.length === 2 ? mqttPackets.map((p) => pick((n) => p.properties?.userProperties?.[n])) : undefined;
        case "redis": {
          const entries = (await redis.xrange(stream, "-", "+")) as [string, string[]][];
          if (entries.length !== 2) return undefined;
          return entries.map(([, fields]) => pick((n) => JSON.parse(fields[fields.indexOf("headers") + 1]!)[n]));
        }
      }
    }

    beforeAll(async () => {
      webhook = Bun.serve({ port: 0, fetch: (request) => (requests.push(request.headers), new Response("ok")) });
      collector = createServer((request, response) => {
        let body = "";
        request.on("data", (chunk) => (body += chunk));
        request.on("end", () => {
          if (request.url === "/v1/traces" && request.headers["content-type"] === "application/json") {
            for (const resource of JSON.parse(body).resourceSpans) for (const scope of resource.scopeSpans) spans.push(...scope.spans);
          }
          response.writeHead(200, { "content-type": "application/json" }).end("{}");
        });
      });
      await new Promise<void>((resolve) => collector.listen(0, "127.0.0.1", resolve));
      nats = await NatsTestClient.connect();
      nats.nc.subscribe(`trace.${RUN}`, { callback: (_error, msg) => void natsMessages.push(msg) });
      await nats.nc.flush();
      kafka = await KafkaReader.start([`trace-${RUN}`]);
      amqpConnection = await amqp.connect(RABBITMQ.url);
      channel = await amqpConnection.createChannel();
      await channel.assertQueue(queue, { durable: false, autoDelete: true });
      await channel.consume(queue, (m) => void (m && amqpMessages.push(m)), { noAck: true });
      mqttClient = await mqtt.connectAsync(MQTT.url, { protocolVersion: 5, reconnectPeriod: 0 });
      mqttClient.on("message", (_topic, _payload, packet) => void mqttPackets.push(packet));
      await mqttClient.subscribeAsync(`tide/trace/${RUN}`, { qos: 1 });
      redis = new Redis({ host: REDIS.host, port: REDIS.port, protocol: 2 });

      await db.sql`SELECT tide.outbox_create('traced')`;
      await db.sql`SELECT tide.outbox_publish('traced', '{"n": 1}'::jsonb, ${db.sql.json(HEADER_TRACE)})`;
      await db.sql.begin(async (tx) => {
        await tx.unsafe(`SET LOCAL tide.traceparent = '${SESSION_TRACE}'`);
        await tx`SELECT tide.outbox_publish('traced', '{"n": 2}'::jsonb)`;
      });
      const sinks: Record<Sink, Record<string, string>> = {
        webhook: { url: `http://127.0.0.1:${webhook.port}/hook` },
        kafka: { brokers: KAFKA_BROKER, topic: `trace-${RUN}` },
        nats: { url: NATS_URL, subject: `trace.${RUN}`, mode: "core" },
        rabbitmq: { url: RABBITMQ.url, exchange: "", routing_key: queue },
        mqtt: { url: MQTT.url, topic: `tide/trace/${RUN}` },
        redis: { url: REDIS.url, stream },
      };
      for (const sink of SINKS) await db.sql`SELECT tide.relay_set_outbox(${`traced-${sink}`}, 'traced', ${sink}, ${db.sql.json(sinks[sink] as Record<string, string>)})`;
      relay = await startRelay(db.url, { otlpEndpoint: `http://127.0.0.1:${(collector.address() as AddressInfo).port}` });
    });

    afterAll(async () => {
      await relay?.stop();
      webhook?.stop(true);
      collector?.close();
      await nats?.close();
      await kafka?.stop();
      await amqpConnection?.close().catch(() => {});
      await mqttClient?.endAsync().catch(() => {});
      await redis?.del(stream);
      redis?.disconnect();
    });

    for (const sink of SINKS) {
      it(`${sink}: carries traceparent and tracestate in its own headers`, async () => {
        const contexts = await waitFor(`both messages from the ${sink} sink`, () => delivered(sink));
        expect(contexts).toContainEqual(HEADER_TRACE);
        expect(contexts).toContainEqual({ traceparent: SESSION_TRACE });
      });
    }

    it("exports one span per delivered batch to the OTLP endpoint, linked to each message's trace", async () => {
      // Each pipeline delivers its two messages in one batch: six spans once the exporter has sent them.
      await waitFor("a span for each pipeline", () => new Set(spans.map((s) => s.name)).size === SINKS.length, 20_000);
      expect(new Set(spans.map((s) => s.name))).toEqual(new Set(SINKS.map((sink) => `send traced-${sink}`)));
      for (const span of spans) {
        expect(span.traceId).toMatch(/^[0-9a-f]{32}$/);
        expect(span.spanId).toMatch(/^[0-9a-f]{16}$/);
        expect(BigInt(span.endTimeUnixNano)).toBeGreaterThanOrEqual(BigInt(span.startTimeUnixNano));
      }
      const links = spans.flatMap((s) => s.links);
      for (const sink of SINKS) {
        const span = spans.find((s) => s.name === `send traced-${sink}`);
        expect(span.links.map((l: any) => l.traceId).sort()).toEqual(["0af7651916cd43dd8448eb211c80319c", "4bf92f3577b34da6a3ce929d0e0e4736"]);
      }
      expect(links).toContainEqual(expect.objectContaining({ traceId: "0af7651916cd43dd8448eb211c80319c", spanId: "b7ad6b7169203331", traceState: HEADER_TRACE.tracestate }));
      expect(links).toContainEqual(expect.objectContaining({ traceId: "4bf92f3577b34da6a3ce929d0e0e4736", spanId: "00f067aa0ba902b7" }));
    });
  });

  describe("from every source into the inbox", () => {
    let relay: Relay;
    let nats: NatsTestClient;
    let amqpConnection: ChannelModel;
    let channel: Channel;
    let redis: Redis;
    const SOURCES = ["nats", "kafka", "rabbitmq", "redis", "mqtt", "webhook"] as const;
    const names = { subject: `trace.in.${RUN}`, topic: `trace-in-${RUN}`, queue: `tide-trace-in-${RUN}`, stream: `tide-trace-in-${RUN}`, mqtt: `tide/trace-in/${RUN}` };
    const mqttClientId = `tide-trace-in-${RUN}`;
    const body = (source: string) => JSON.stringify({ from: source });

    beforeAll(async () => {
      nats = await NatsTestClient.connect();
      await nats.createStream(`TRACE_IN_${RUN.replace(/\W/g, "_")}`, [names.subject]);
      await createTopics(kafkaClient(), [names.topic]);
      amqpConnection = await amqp.connect(RABBITMQ.url);
      channel = await amqpConnection.createChannel();
      await channel.assertQueue(names.queue, { durable: false });
      redis = new Redis({ host: REDIS.host, port: REDIS.port, protocol: 2 });
      // The source's persistent session exists before anything is published, so the broker keeps it.
      const session = await mqtt.connectAsync(MQTT.url, { protocolVersion: 5, clientId: mqttClientId, clean: false, reconnectPeriod: 0, properties: { sessionExpiryInterval: 300 } });
      await session.subscribeAsync(names.mqtt, { qos: 1 });
      await session.endAsync();

      const sources = {
        nats: { url: NATS_URL, subject: names.subject },
        kafka: { brokers: KAFKA_BROKER, topic: names.topic },
        rabbitmq: { url: RABBITMQ.url, queue: names.queue },
        redis: { url: REDIS.url, stream: names.stream },
        mqtt: { url: MQTT.url, topic: names.mqtt, client_id: mqttClientId, session_expiry_s: 300 },
        webhook: { path: `trace-${RUN}`, allow_unsigned: true },
      };
      for (const source of SOURCES) {
        await db.sql`SELECT tide.inbox_create(${`in_${source}`})`;
        const config = { ...sources[source], source_type: source } as Record<string, string | number | boolean>;
        await db.sql`SELECT tide.relay_set_inbox(${`trace-in-${source}`}, ${`in_${source}`}, ${db.sql.json(config)})`;
      }
      const trace = HEADER_TRACE;
      await nats.publish(names.subject, body("nats"), trace);
      await produceKafka(names.topic, [{ value: body("kafka"), headers: trace }]);
      channel.sendToQueue(names.queue, Buffer.from(body("rabbitmq")), { headers: trace, contentType: "application/json" });
      await redis.xadd(names.stream, "*", "payload", body("redis"), "traceparent", trace.traceparent, "tracestate", trace.tracestate);
      const publisher = await mqtt.connectAsync(MQTT.url, { protocolVersion: 5, reconnectPeriod: 0 });
      await publisher.publishAsync(names.mqtt, body("mqtt"), { qos: 1, properties: { userProperties: trace } });
      await publisher.endAsync();
      relay = await startRelay(db.url, { metricsAddr: "127.0.0.1:0" });
    });

    afterAll(async () => {
      await relay?.stop();
      await nats?.close();
      await channel?.deleteQueue(names.queue).catch(() => {});
      await amqpConnection?.close().catch(() => {});
      await redis?.del(names.stream);
      redis?.disconnect();
    });

    for (const source of SOURCES) {
      it(`${source}: the inbox row keeps traceparent and tracestate`, async () => {
        if (source === "webhook") {
          const url = `http://127.0.0.1:${relay.httpPort}/ingest/trace-${RUN}`;
          // The route exists once its pipeline runs on this relay.
          await waitFor("the webhook source's route", async () => (await fetch(url)).status === 405);
          const response = await fetch(url, { method: "POST", headers: { "content-type": "application/json", ...HEADER_TRACE }, body: body("webhook") });
          expect(response.status).toBe(200);
        }
        const [row] = await waitFor(`the ${source} message in the inbox`, async () => {
          const rows = await db.sql.unsafe(`SELECT payload, headers FROM tide."in_${source}_inbox"`);
          return rows.length > 0 && rows;
        });
        expect(row!.payload).toEqual({ from: source });
        expect(row!.headers).toMatchObject(HEADER_TRACE);
      });
    }
  });
});
