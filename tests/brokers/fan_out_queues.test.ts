// seeds/fan-out-pattern.txt with RabbitMQ, Redis Streams and MQTT as the three destinations, on a
// running relay: one outbox, a consumer group per destination bound by the seed's `<sink>-relay`
// naming, each progressing on its own. RabbitMQ's exchange has no queue bound at first, so its
// mandatory messages come back and wait in the outbox while Redis and MQTT receive everything; once
// a queue is bound, RabbitMQ catches up and every lag is 0.

import { afterAll, beforeAll, describe, expect, it, setDefaultTimeout } from "bun:test";
import amqp, { type Channel, type ChannelModel, type GetMessage } from "amqplib";
import { Redis } from "ioredis";
import mqtt, { type IPublishPacket, type MqttClient } from "mqtt";
import type { Relay } from "../../core/relay.ts";
import { unique } from "../support/brokers.ts";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { startRelay, waitFor } from "../support/relay.ts";
import { runBlock } from "../support/seeds.ts";
import { MQTT, RABBITMQ, REDIS, requireService } from "../support/services.ts";

const up = (await requireService(RABBITMQ.name, RABBITMQ.host, RABBITMQ.port)) &&
  (await requireService(REDIS.name, REDIS.host, REDIS.port)) &&
  (await requireService(MQTT.name, MQTT.host, MQTT.port));

setDefaultTimeout(60_000);

const RUN = unique();
const EXCHANGE = `orders-${RUN}`;
const QUEUE = `orders-analytics-${RUN}`;
const STREAM = `orders:${RUN}`;
const TOPIC = `orders/${RUN}/events`;
const MESSAGES = 40;

const STEP1 = `SELECT tide.outbox_create('orders', p_retention_hours := 72);`;

const STEP2 = `SELECT tide.create_consumer_group('rabbitmq-relay', 'orders');
SELECT tide.create_consumer_group('redis-relay', 'orders');
SELECT tide.create_consumer_group('mqtt-relay', 'orders');`;

// A short backoff keeps the test quick once RabbitMQ can route again; the default is up to 30 s.
const STEP3 = `SELECT tide.relay_set_outbox('orders-rabbitmq', 'orders', 'rabbitmq',
  '{"url": "${RABBITMQ.url}", "exchange": "${EXCHANGE}", "routing_key": "orders.created", "retry": {"max_backoff_ms": 500}}'::jsonb
);
SELECT tide.relay_set_outbox('orders-redis', 'orders', 'redis',
  '{"url": "${REDIS.url}", "stream": "${STREAM}"}'::jsonb
);
SELECT tide.relay_set_outbox('orders-mqtt', 'orders', 'mqtt',
  '{"url": "${MQTT.url}", "topic": "${TOPIC}"}'::jsonb
);`;

const STEP4 = `SELECT * FROM tide.consumer_lag;`;

let db: TestDatabase;
let relay: Relay | undefined;
let amqpConnection: ChannelModel;
let channel: Channel;
let redis: Redis;
let subscriber: MqttClient;
const mqttPackets: IPublishPacket[] = [];

async function lags(): Promise<Record<string, bigint>> {
  const rows = await db.sql.unsafe(STEP4);
  return Object.fromEntries(rows.map((r) => [r.group_name, r.lag]));
}

function range(n: number): number[] {
  return Array.from({ length: n }, (_, i) => i + 1);
}

describe.skipIf(!up)("tutorial: fan-out to RabbitMQ, Redis Streams and MQTT", () => {
  beforeAll(async () => {
    db = await createTestDatabase();
    amqpConnection = await amqp.connect(RABBITMQ.url);
    channel = await amqpConnection.createChannel();
    await channel.assertExchange(EXCHANGE, "topic", { durable: false });
    await channel.assertQueue(QUEUE, { durable: false });
    redis = new Redis({ host: REDIS.host, port: REDIS.port, protocol: 2 });
    subscriber = await mqtt.connectAsync(MQTT.url, { protocolVersion: 5, reconnectPeriod: 0 });
    subscriber.on("message", (_topic, _payload, packet) => void mqttPackets.push(packet));
    await subscriber.subscribeAsync(TOPIC, { qos: 1 });
  });
  afterAll(async () => {
    await relay?.stop();
    await subscriber?.endAsync();
    if (redis) {
      const keys = await redis.keys(`${STREAM}*`);
      if (keys.length > 0) await redis.del(...keys);
      redis.disconnect();
    }
    await channel?.deleteQueue(QUEUE).catch(() => {});
    await channel?.deleteExchange(EXCHANGE).catch(() => {});
    await amqpConnection?.close();
    await db?.drop();
  });

  it("binds each pipeline to the consumer group created for it", async () => {
    await runBlock(db.sql, STEP1);
    await runBlock(db.sql, STEP2);
    await runBlock(db.sql, STEP3);
    const pipelines = await db.sql`SELECT name, consumer_group FROM tide.relay_pipelines ORDER BY name`;
    expect(pipelines.map((p) => [p.name, p.consumer_group])).toEqual([
      ["orders-mqtt", "mqtt-relay"],
      ["orders-rabbitmq", "rabbitmq-relay"],
      ["orders-redis", "redis-relay"],
    ]);
  });

  it("delivers everything to Redis and MQTT while RabbitMQ has no queue bound; only rabbitmq-relay lags", async () => {
    relay = await startRelay(db.url);
    await db.sql`SELECT tide.outbox_publish('orders', jsonb_build_object('order_id', g, 'total', g * 10),
                                            '{"event_type": "order.created"}'::jsonb)
                   FROM generate_series(1, ${MESSAGES}) g`;

    await waitFor(`${MESSAGES} messages on MQTT`, () => mqttPackets.length >= MESSAGES);
    const entries = await waitFor(`${MESSAGES} entries in the Redis stream`, async () => {
      const entries = (await redis.xrange(STREAM, "-", "+")) as [string, string[]][];
      return entries.length >= MESSAGES && entries;
    });
    const field = (fields: string[], name: string) => fields[fields.indexOf(name) + 1];
    expect(entries.map(([, fields]) => JSON.parse(field(fields, "payload")!).order_id)).toEqual(range(MESSAGES));
    expect(entries.map(([, fields]) => field(fields, "tide-dedup-key"))).toEqual(range(MESSAGES).map((n) => `orders:${n}`));
    expect(mqttPackets.map((p) => JSON.parse(p.payload.toString()).order_id)).toEqual(range(MESSAGES));
    expect(mqttPackets.map((p) => p.properties?.userProperties?.["tide-dedup-key"])).toEqual(range(MESSAGES).map((n) => `orders:${n}`));

    const lag = await waitFor("redis-relay and mqtt-relay at lag 0", async () => {
      const lag = await lags();
      return lag["redis-relay"] === 0n && lag["mqtt-relay"] === 0n && lag;
    });
    expect(lag["rabbitmq-relay"]).toBe(BigInt(MESSAGES));
    const [status] = await waitFor("orders-rabbitmq to report the unroutable messages", async () => {
      const rows = await db.sql`SELECT healthy, last_error FROM tide.pipeline_status WHERE pipeline = 'orders-rabbitmq'`;
      return rows[0]?.healthy === false && rows;
    });
    expect(status.last_error).toContain("no queue is bound to receive it");
    expect(await db.sql`SELECT * FROM tide.relay_dlq`).toHaveLength(0);
  });

  it("catches RabbitMQ up once a queue is bound, in order and each message once; all lags 0", async () => {
    await channel.bindQueue(QUEUE, EXCHANGE, "orders.#");
    await waitFor("rabbitmq-relay at lag 0", async () => (await lags())["rabbitmq-relay"] === 0n, 30_000);
    const got: GetMessage[] = [];
    await waitFor(`${MESSAGES} messages in the queue`, async () => {
      for (let m = await channel.get(QUEUE, { noAck: true }); m; m = await channel.get(QUEUE, { noAck: true })) got.push(m);
      return got.length >= MESSAGES;
    });
    expect(got.map((m) => m.properties.messageId)).toEqual(range(MESSAGES).map((n) => `orders:${n}`));
    expect(got.map((m) => JSON.parse(m.content.toString()).order_id)).toEqual(range(MESSAGES));
    expect(await lags()).toEqual({ "rabbitmq-relay": 0n, "redis-relay": 0n, "mqtt-relay": 0n });
    expect(await db.sql`SELECT * FROM tide.relay_dlq`).toHaveLength(0);
    const status = await waitFor("every pipeline healthy", async () => {
      const rows = await db.sql`SELECT pipeline, healthy, lag FROM tide.pipeline_status ORDER BY pipeline`;
      return rows.every((r) => r.healthy) && rows;
    });
    expect(status.map((s) => [s.pipeline, s.healthy, s.lag])).toEqual([
      ["orders-mqtt", true, 0n],
      ["orders-rabbitmq", true, 0n],
      ["orders-redis", true, 0n],
    ]);
  });
});
