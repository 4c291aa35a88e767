// CloudEvents as each sink puts them on the wire, decoded from what the real servers delivered: the
// official SDK (`cloudevents` on npm) reads the HTTP, Kafka and MQTT messages with its bindings;
// for NATS and AMQP, which it has no binding for, the binding's header names and values are checked
// and the event is built with the SDK's CloudEvent constructor, which validates it. Structured mode
// (`wire_format = "cloudevents"`) and binary mode (`"cloudevents-binary"`), with a payload whose
// big integer a JavaScript number would change: the data must arrive as the very same text.

import { afterAll, beforeAll, describe, expect, it, setDefaultTimeout } from "bun:test";
import type { Msg } from "@nats-io/transport-node";
import amqp, { type Channel, type ChannelModel, type ConsumeMessage } from "amqplib";
import { CloudEvent, HTTP, Kafka, type KafkaMessage, MQTT } from "cloudevents";
import mqtt, { type IPublishPacket, type MqttClient } from "mqtt";
import { Webhook } from "standardwebhooks";
import type { Relay } from "../../core/relay.ts";
import { KAFKA_BROKER, type KafkaRecord, KafkaReader, NATS_URL, NatsTestClient, unique } from "../support/brokers.ts";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { startRelay, waitFor } from "../support/relay.ts";
import { MQTT as MQTT_SERVER, RABBITMQ, requireService } from "../support/services.ts";

const up = (await Promise.all([
  requireService("kafka", "127.0.0.1", 9092),
  requireService("nats", "127.0.0.1", 4222),
  requireService(RABBITMQ.name, RABBITMQ.host, RABBITMQ.port),
  requireService(MQTT_SERVER.name, MQTT_SERVER.host, MQTT_SERVER.port),
])).every(Boolean);

setDefaultTimeout(60_000);
// The SDK then parses JSON data with BigInt for integers beyond 2^53, so data can be compared exactly.
// It does so by replacing the global JSON (with json-bigint's) while it parses, and puts the native
// one back only on a later parse without the variable: restore both once this file is done, since
// the test runner goes on in the same process.
process.env.CE_USE_BIG_INT = "true";
const nativeJSON = globalThis.JSON;
afterAll(() => {
  delete process.env.CE_USE_BIG_INT;
  globalThis.JSON = nativeJSON;
});

const RUN = unique();
const PAYLOAD = `{"order_id": 9007199254740993, "price": 1.50, "name": "caf\\u00e9"}`;
const SECRET = `whsec_${Buffer.from("a-32-byte-key-for-cloud-events!!").toString("base64")}`;
const STRUCTURED = "application/cloudevents+json; charset=utf-8";

let db: TestDatabase;
let relay: Relay;
let server: ReturnType<typeof Bun.serve>;
let nats: NatsTestClient;
let kafka: KafkaReader;
let amqpConnection: ChannelModel;
let channel: Channel;
let mqttClient: MqttClient;
const requests = new Map<string, { body: string; headers: Record<string, string> }[]>();
const natsMessages: Msg[] = [];
const amqpMessages = new Map<string, ConsumeMessage[]>();
const mqttPackets: IPublishPacket[] = [];
/** The published message as stored: id, payload::text, created_at. */
let stored: { id: string; payload: string; time: string };

const topic = (mode: string) => `ce-${mode}-${RUN}`;
const queue = (mode: string) => `tide-ce-${mode}-${RUN}`;

/** What every decoded event must say, and its data exactly (BigInt for the big integer). */
function expectTheEvent(event: { id: string; type: string; source: string; subject?: string; specversion: string; data?: unknown }) {
  expect(event.specversion).toBe("1.0");
  expect(event.id).toBe(`ce:${stored.id}`);
  expect(event.type).toBe("order.created");
  expect(event.source).toBe("/tide/outbox/ce");
  expect(event.subject).toBe("orders.created");
  expect((event.data as { order_id: unknown }).order_id).toBe(9007199254740993n);
}

describe.skipIf(!up)("CloudEvents protocol bindings", () => {
  beforeAll(async () => {
    db = await createTestDatabase();
    server = Bun.serve({
      port: 0,
      async fetch(request) {
        const path = new URL(request.url).pathname;
        const headers: Record<string, string> = {};
        request.headers.forEach((value, name) => void (headers[name] = value));
        requests.set(path, [...(requests.get(path) ?? []), { body: await request.text(), headers }]);
        return new Response("ok");
      },
    });
    nats = await NatsTestClient.connect();
    nats.nc.subscribe(`ce.${RUN}.>`, { callback: (_error, msg) => void natsMessages.push(msg) });
    await nats.nc.flush();
    kafka = await KafkaReader.start([topic("structured"), topic("binary")]);
    amqpConnection = await amqp.connect(RABBITMQ.url);
    channel = await amqpConnection.createChannel();
    for (const mode of ["structured", "binary"]) {
      await channel.assertQueue(queue(mode), { durable: false, autoDelete: true });
      await channel.consume(queue(mode), (m) => m && amqpMessages.set(mode, [...(amqpMessages.get(mode) ?? []), m]), { noAck: true });
    }
    mqttClient = await mqtt.connectAsync(MQTT_SERVER.url, { protocolVersion: 5, reconnectPeriod: 0 });
    mqttClient.on("message", (_topic, _payload, packet) => void mqttPackets.push(packet));
    await mqttClient.subscribeAsync(`tide/ce/${RUN}/#`, { qos: 1 });

    await db.sql`SELECT tide.outbox_create('ce')`;
    await db.sql`SELECT tide.outbox_publish('ce', 'orders.created', ${PAYLOAD}::text::jsonb, '{"event_type": "order.created"}'::jsonb)`;
    [stored] = await db.sql`SELECT id::text AS id, payload::text AS payload, created_at AS time FROM tide.outbox_messages WHERE outbox = 'ce'`;
    const url = (path: string) => `http://127.0.0.1:${server.port}${path}`;
    for (const [mode, format] of [["structured", "cloudevents"], ["binary", "cloudevents-binary"]] as const) {
      const pipelines: [string, Record<string, unknown>][] = [
        ["webhook", { url: url(`/${mode}`), signing: { scheme: "standard-webhooks", secret: SECRET } }],
        ["kafka", { brokers: KAFKA_BROKER, topic: topic(mode) }],
        ["nats", { url: NATS_URL, subject: `ce.${RUN}.${mode}`, mode: "core" }],
        ["rabbitmq", { url: RABBITMQ.url, exchange: "", routing_key: queue(mode) }],
        ["mqtt", { url: MQTT_SERVER.url, topic: `tide/ce/${RUN}/${mode}` }],
      ];
      for (const [type, config] of pipelines) {
        await db.sql`SELECT tide.relay_set_outbox(${`ce-${type}-${mode}`}, 'ce', ${type}, ${db.sql.json({ ...config, wire_format: format })})`;
      }
    }
    await db.sql`SELECT tide.relay_set_outbox('ce-webhook-batch', 'ce', 'webhook',
                   ${db.sql.json({ url: url("/batch"), mode: "batch", wire_format: "cloudevents" })})`;
    await db.sql`SELECT tide.relay_set_outbox('ce-webhook-binary-batch', 'ce', 'webhook',
                   ${db.sql.json({ url: url("/binary-batch"), mode: "batch", wire_format: "cloudevents-binary" })})`;
    await db.sql`SELECT tide.relay_set_outbox('ce-mqtt-3-binary', 'ce', 'mqtt',
                   ${db.sql.json({ url: MQTT_SERVER.url, topic: `tide/ce/${RUN}/v3`, protocol_version: "3.1.1", wire_format: "cloudevents-binary" })})`;
    relay = await startRelay(db.url);
  });

  afterAll(async () => {
    await relay?.stop();
    server?.stop(true);
    await nats?.close();
    await kafka?.stop();
    await amqpConnection?.close().catch(() => {});
    await mqttClient?.endAsync().catch(() => {});
    await db?.drop();
  });

  describe("structured mode (wire_format cloudevents)", () => {
    it("webhook: HTTP.toEvent finds the event by its Content-Type, and the request's Standard Webhooks signature verifies", async () => {
      const [request] = await waitFor("the webhook request", () => requests.get("/structured"));
      expect(request!.headers["content-type"]).toBe(STRUCTURED);
      expectTheEvent(HTTP.toEvent({ headers: request!.headers, body: request!.body }) as CloudEvent<unknown>);
      expect(request!.body).toContain(`"data":${stored.payload}}`);
      // The official package verifies what was signed: this very body, id and timestamp.
      expect(() => new Webhook(SECRET).verify(request!.body, request!.headers)).not.toThrow();
    });

    it("kafka: Kafka.toEvent reads it by the content-type record header", async () => {
      await kafka.waitForCount(2);
      const record = kafka.records.find((r) => r.topic === topic("structured"))!;
      expect(record.headers["content-type"]).toBe(STRUCTURED);
      expectTheEvent(Kafka.toEvent(kafkaMessage(record)) as CloudEvent<unknown>);
      expect(record.value).toContain(`"data":${stored.payload}}`);
    });

    it("mqtt: MQTT.toEvent reads it by the MQTT 5 Content Type property", async () => {
      const packet = await waitFor("the MQTT message", () => mqttPackets.find((p) => p.topic.endsWith("/structured")));
      expect(packet.properties?.contentType).toBe(STRUCTURED);
      const body = packet.payload.toString();
      const message = { PUBLISH: { "Content Type": packet.properties!.contentType! }, body, headers: {} };
      expectTheEvent(MQTT.toEvent(message as never) as CloudEvent<unknown>);
      expect(body).toContain(`"data":${stored.payload}}`);
    });

    it("nats: the Content-Type header marks structured mode; the body is a valid CloudEvent", async () => {
      const msg = await waitFor("the NATS message", () => natsMessages.find((m) => m.subject.endsWith(".structured")));
      expect(msg.headers?.get("Content-Type")).toBe(STRUCTURED);
      expect(msg.headers?.has("ce-id")).toBe(false);
      expect(msg.string()).toContain(`"data":${stored.payload}}`);
      expectTheEvent(HTTP.toEvent({ headers: { "content-type": STRUCTURED }, body: msg.string() }) as CloudEvent<unknown>);
    });

    it("rabbitmq: the AMQP content-type property is the event format's media type", async () => {
      const [m] = await waitFor("the AMQP message", () => amqpMessages.get("structured"));
      expect(m!.properties.contentType).toBe(STRUCTURED);
      const body = m!.content.toString();
      expect(body).toContain(`"data":${stored.payload}}`);
      expectTheEvent(HTTP.toEvent({ headers: { "content-type": m!.properties.contentType }, body }) as CloudEvent<unknown>);
    });
  });

  describe("batches and transports without headers", () => {
    it("webhook batch mode sends structured events as a CloudEvents batch that HTTP.toEvent reads", async () => {
      const [request] = await waitFor("the batch request", () => requests.get("/batch"));
      expect(request!.headers["content-type"]).toBe("application/cloudevents-batch+json; charset=utf-8");
      const single = await waitFor("the single request", () => requests.get("/structured"));
      expect(request!.body).toBe(`[${single[0]!.body}]`);
      const events = HTTP.toEvent({ headers: request!.headers, body: request!.body }) as CloudEvent<unknown>[];
      expect(events).toHaveLength(1);
      expect(events[0]!.id).toBe(`ce:${stored.id}`);
    });

    it("refuses binary mode where the attributes have nowhere to go (a webhook batch, MQTT 3.1.1), into the DLQ with the reason", async () => {
      const dead = await waitFor("both dead letters", async () => {
        const rows = await db.sql`SELECT pipeline, error FROM tide.relay_dlq WHERE pipeline IN ('ce-webhook-binary-batch', 'ce-mqtt-3-binary') ORDER BY pipeline`;
        return rows.length === 2 && rows;
      });
      expect(dead[0]!.error).toContain('wire_format "cloudevents-binary" needs MQTT 5');
      expect(dead[1]!.error).toContain('wire_format "cloudevents-binary" sends one event per request');
      expect(requests.get("/binary-batch")).toBeUndefined();
      expect(mqttPackets.find((p) => p.topic.endsWith("/v3"))).toBeUndefined();
    });
  });

  describe("binary mode (wire_format cloudevents-binary)", () => {
    it("webhook: ce- headers and Content-Type carry the attributes, the body is the payload byte for byte, signed", async () => {
      const [request] = await waitFor("the webhook request", () => requests.get("/binary"));
      expect(request!.body).toBe(stored.payload);
      expect(request!.headers["content-type"]).toBe("application/json");
      expect(request!.headers["ce-time"]).toBe(new Date(stored.time).toISOString());
      const event = HTTP.toEvent({ headers: request!.headers, body: request!.body }) as CloudEvent<unknown>;
      expectTheEvent(event);
      expect(event.datacontenttype).toBe("application/json");
      expect(() => new Webhook(SECRET).verify(request!.body, request!.headers)).not.toThrow();
    });

    it("kafka: ce_ record headers and content-type, the value is the payload byte for byte", async () => {
      await kafka.waitForCount(2);
      const record = kafka.records.find((r) => r.topic === topic("binary"))!;
      expect(record.value).toBe(stored.payload);
      expect(record.headers["content-type"]).toBe("application/json");
      expect(record.headers.ce_specversion).toBe("1.0");
      expectTheEvent(Kafka.toEvent(kafkaMessage(record)) as CloudEvent<unknown>);
    });

    it("mqtt: unprefixed user properties and Content Type, the payload byte for byte", async () => {
      const packet = await waitFor("the MQTT message", () => mqttPackets.find((p) => p.topic.endsWith("/binary")));
      const body = packet.payload.toString();
      expect(body).toBe(stored.payload);
      expect(packet.properties?.contentType).toBe("application/json");
      const properties = packet.properties!.userProperties as Record<string, string>;
      // Every user property is read as an attribute: only valid attribute names are sent.
      expect(Object.keys(properties).sort()).toEqual(["id", "source", "specversion", "subject", "time", "type"]);
      const message = { PUBLISH: { "Content Type": packet.properties!.contentType! }, body, headers: properties };
      const event = MQTT.toEvent(message as never) as CloudEvent<unknown>;
      expect(event.id).toBe(`ce:${stored.id}`);
      expect(event.type).toBe("order.created");
      // MQTT.toEvent hands the body over as it came; it is the payload text, parsed here as the SDK's HTTP binding would.
      expectTheEvent(new CloudEvent({ ...properties, datacontenttype: packet.properties!.contentType, data: parseBig(body) } as never));
    });

    it("nats: ce- headers for every attribute, datacontenttype included (NATS binding 1.0.1); no Content-Type", async () => {
      const msg = await waitFor("the NATS message", () => natsMessages.find((m) => m.subject.endsWith(".binary")));
      expect(msg.string()).toBe(stored.payload);
      const h = msg.headers!;
      expect(h.has("Content-Type")).toBe(false);
      const attributes = Object.fromEntries(
        ["specversion", "id", "source", "type", "subject", "time", "datacontenttype"].map((name) => [name, h.get(`ce-${name}`)]),
      );
      expect(attributes).toEqual({
        specversion: "1.0",
        id: `ce:${stored.id}`,
        source: "/tide/outbox/ce",
        type: "order.created",
        subject: "orders.created",
        time: new Date(stored.time).toISOString(),
        datacontenttype: "application/json",
      });
      expectTheEvent(new CloudEvent({ ...attributes, data: parseBig(msg.string()) } as never));
    });

    it("rabbitmq: cloudEvents: application properties and the content-type property (AMQP binding)", async () => {
      const [m] = await waitFor("the AMQP message", () => amqpMessages.get("binary"));
      const body = m!.content.toString();
      expect(body).toBe(stored.payload);
      expect(m!.properties.contentType).toBe("application/json");
      const headers = m!.properties.headers as Record<string, unknown>;
      const attributes = Object.fromEntries(
        ["specversion", "id", "source", "type", "subject", "time"].map((name) => [name, String(headers[`cloudEvents:${name}`])]),
      );
      expect(attributes.time).toBe(new Date(stored.time).toISOString());
      expectTheEvent(new CloudEvent({ ...attributes, datacontenttype: m!.properties.contentType, data: parseBig(body) } as never));
    });
  });
});

/** JSON text parsed as the SDK parses an event's JSON data (json-bigint under CE_USE_BIG_INT). */
function parseBig(text: string): unknown {
  const headers = { "ce-id": "x", "ce-source": "/x", "ce-type": "x", "ce-specversion": "1.0", "content-type": "application/json" };
  return (HTTP.toEvent({ headers, body: text }) as CloudEvent<unknown>).data;
}

/** A record as the SDK's Kafka binding takes it. */
function kafkaMessage(record: KafkaRecord): KafkaMessage<string> {
  return { headers: record.headers, key: record.key ?? "", value: record.value!, body: record.value! };
}
