// An outage of RabbitMQ, Redis and MQTT as a running relay sees it: each broker is reached through a
// TCP proxy that the test cuts (every connection closed, new ones refused) and restores; the shared
// servers themselves cannot be stopped. While cut, outbox messages wait in the outbox and broker
// messages wait in the broker, every pipeline says which server it cannot reach; once restored,
// everything arrives by itself, nothing lost.

import { afterAll, beforeAll, describe, expect, it, setDefaultTimeout } from "bun:test";
import amqp, { type Channel, type ChannelModel, type GetMessage } from "amqplib";
import { Redis } from "ioredis";
import mqtt, { type IPublishPacket, type MqttClient } from "mqtt";
import type { Relay } from "../../core/relay.ts";
import { unique } from "../support/brokers.ts";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { startRelay, waitFor } from "../support/relay.ts";
import { MQTT, RABBITMQ, REDIS, requireService } from "../support/services.ts";
import { TcpProxy } from "../support/tcp_proxy.ts";

const up = (await requireService(RABBITMQ.name, RABBITMQ.host, RABBITMQ.port)) &&
  (await requireService(REDIS.name, REDIS.host, REDIS.port)) &&
  (await requireService(MQTT.name, MQTT.host, MQTT.port));

setDefaultTimeout(60_000);

const RUN = unique();
const OUT_QUEUE = `tide-outage-out-${RUN}`;
const IN_QUEUE = `tide-outage-in-${RUN}`;
const OUT_STREAM = `tide-outage:out:${RUN}`;
const IN_STREAM = `tide-outage:in:${RUN}`;
const OUT_TOPIC = `tide-outage/${RUN}/out`;
const IN_TOPIC = `tide-outage/${RUN}/in`;
const BROKERS = ["rabbitmq", "redis", "mqtt"] as const;
type Broker = (typeof BROKERS)[number];

let db: TestDatabase;
let relay: Relay | undefined;
const proxies = {} as Record<Broker, TcpProxy>;
let amqpConnection: ChannelModel;
let channel: Channel;
let redis: Redis;
let mqttClient: MqttClient;
const mqttPackets: IPublishPacket[] = [];
const queued: GetMessage[] = [];

/** What each destination received: the dedup keys, in arrival order. */
async function received(broker: Broker): Promise<string[]> {
  if (broker === "rabbitmq") {
    for (let m = await channel.get(OUT_QUEUE, { noAck: true }); m; m = await channel.get(OUT_QUEUE, { noAck: true })) queued.push(m);
    return queued.map((m) => m.properties.messageId as string);
  }
  if (broker === "redis") {
    const entries = (await redis.xrange(OUT_STREAM, "-", "+")) as [string, string[]][];
    return entries.map(([, fields]) => fields[fields.indexOf("tide-dedup-key") + 1]!);
  }
  return mqttPackets.map((p) => p.properties?.userProperties?.["tide-dedup-key"] as string);
}

/** Publishes `n` into the broker directly (not through the proxy), as another service would. */
async function publishToBroker(broker: Broker, n: number): Promise<void> {
  const body = JSON.stringify({ broker, n });
  if (broker === "rabbitmq") channel.sendToQueue(IN_QUEUE, Buffer.from(body), { messageId: `${broker}-${n}` });
  if (broker === "redis") await redis.xadd(IN_STREAM, "*", "payload", body, "event_id", `${broker}-${n}`);
  if (broker === "mqtt") await mqttClient.publishAsync(IN_TOPIC, body, { qos: 1, properties: { userProperties: { event_id: `${broker}-${n}` } } });
}

/** The dedup keys of the messages published to the broker's outbox, in order. */
async function dedupKeys(broker: Broker): Promise<string[]> {
  const rows = await db.sql`SELECT outbox || ':' || id AS key FROM tide.outbox_messages WHERE outbox = ${`to_${broker}`} ORDER BY id`;
  return rows.map((r) => r.key);
}

async function inbox(broker: Broker): Promise<string[]> {
  const rows = await db.sql`SELECT event_id FROM tide.${db.sql(`from_${broker}_inbox`)} ORDER BY id`;
  return rows.map((r) => r.event_id);
}

describe.skipIf(!up)("an outage of RabbitMQ, Redis and MQTT under a running relay", () => {
  beforeAll(async () => {
    db = await createTestDatabase();
    amqpConnection = await amqp.connect(RABBITMQ.url);
    channel = await amqpConnection.createChannel();
    await channel.assertQueue(OUT_QUEUE, { durable: false });
    await channel.assertQueue(IN_QUEUE, { durable: false });
    redis = new Redis({ host: REDIS.host, port: REDIS.port, protocol: 2 });
    mqttClient = await mqtt.connectAsync(MQTT.url, { protocolVersion: 5, reconnectPeriod: 0 });
    mqttClient.on("message", (_topic, _payload, packet) => void mqttPackets.push(packet));
    await mqttClient.subscribeAsync(OUT_TOPIC, { qos: 1 });
    proxies.rabbitmq = await TcpProxy.start(RABBITMQ.host, RABBITMQ.port);
    proxies.redis = await TcpProxy.start(REDIS.host, REDIS.port);
    proxies.mqtt = await TcpProxy.start(MQTT.host, MQTT.port);
    const url = (broker: Broker) => `${{ rabbitmq: "amqp", redis: "redis", mqtt: "mqtt" }[broker]}://127.0.0.1:${proxies[broker].port}`;
    // The default backoff grows to 30 s between attempts; a short one keeps the test quick.
    const retry = { max_backoff_ms: 500 };
    const sinks = {
      rabbitmq: { url: url("rabbitmq"), routing_key: OUT_QUEUE },
      redis: { url: url("redis"), stream: OUT_STREAM },
      mqtt: { url: url("mqtt"), topic: OUT_TOPIC },
    };
    const sources = {
      rabbitmq: { url: url("rabbitmq"), queue: IN_QUEUE },
      redis: { url: url("redis"), stream: IN_STREAM },
      mqtt: { url: url("mqtt"), topic: IN_TOPIC, client_id: `tide-outage-${RUN}`, session_expiry_s: 300 },
    };
    for (const broker of BROKERS) {
      await db.sql`SELECT tide.outbox_create(${`to_${broker}`})`;
      await db.sql`SELECT tide.relay_set_outbox(${`to-${broker}`}, ${`to_${broker}`}, ${broker}, ${db.sql.json({ ...sinks[broker], retry })})`;
      await db.sql`SELECT tide.inbox_create(${`from_${broker}`})`;
      await db.sql`SELECT tide.relay_set_inbox(${`from-${broker}`}, ${`from_${broker}`},
                                               ${db.sql.json({ ...sources[broker], source_type: broker, retry })})`;
    }
  });
  afterAll(async () => {
    await relay?.stop();
    for (const proxy of Object.values(proxies)) await proxy.stop();
    await mqttClient?.endAsync();
    if (redis) {
      const keys = [...(await redis.keys(`${OUT_STREAM}*`)), IN_STREAM];
      await redis.del(...keys);
      redis.disconnect();
    }
    await channel?.deleteQueue(OUT_QUEUE).catch(() => {});
    await channel?.deleteQueue(IN_QUEUE).catch(() => {});
    await amqpConnection?.close();
    await db?.drop();
  });

  it("delivers both ways through the proxies", async () => {
    relay = await startRelay(db.url);
    for (const broker of BROKERS) {
      await db.sql`SELECT tide.outbox_publish(${`to_${broker}`}, ${db.sql.json({ n: 1 })})`;
      await publishToBroker(broker, 1);
    }
    for (const broker of BROKERS) {
      await waitFor(`the first message on ${broker}`, async () => (await received(broker)).length === 1);
      await waitFor(`the first ${broker} message in the inbox`, async () => (await inbox(broker)).length === 1);
    }
  });

  it("holds every message while the connections are cut, and each pipeline names the server it cannot reach", async () => {
    for (const proxy of Object.values(proxies)) await proxy.cut();
    for (const broker of BROKERS) {
      await db.sql`SELECT tide.outbox_publish(${`to_${broker}`}, ${db.sql.json({ n: 2 })})`;
      await publishToBroker(broker, 2);
    }
    const status = await waitFor("all six pipelines to report the outage", async () => {
      const rows = await db.sql`SELECT pipeline, healthy, last_error FROM tide.pipeline_status ORDER BY pipeline`;
      return rows.length === 6 && rows.every((r) => r.healthy === false) && rows;
    }, 30_000);
    for (const row of status) {
      const broker = (row.pipeline as string).replace(/^(to|from)-/, "") as Broker;
      expect(`${row.pipeline}: ${row.last_error}`).toContain(`127.0.0.1:${proxies[broker].port}`);
    }
    const pending = await db.sql`SELECT outbox_name FROM tide.outbox_pending ORDER BY outbox_name`;
    expect(pending.map((r) => r.outbox_name)).toEqual(["to_mqtt", "to_rabbitmq", "to_redis"]);
    for (const broker of BROKERS) {
      expect(await received(broker)).toHaveLength(1);
      expect(await inbox(broker)).toEqual([`${broker}-1`]);
    }
  });

  it("delivers what waited once the connections are back, without anyone's help, nothing lost", async () => {
    for (const proxy of Object.values(proxies)) await proxy.restore();
    for (const broker of BROKERS) {
      const keys = await waitFor(`both messages on ${broker}`, async () => {
        const keys = await received(broker);
        return new Set(keys).size === 2 && keys;
      }, 30_000);
      expect([...new Set(keys)]).toEqual(await dedupKeys(broker));
      expect(await waitFor(`both ${broker} messages in the inbox`, async () => {
        const ids = await inbox(broker);
        return ids.length === 2 && ids;
      }, 30_000)).toEqual([`${broker}-1`, `${broker}-2`]);
    }
    expect(await db.sql`SELECT * FROM tide.outbox_pending`).toHaveLength(0);
    await waitFor("every pipeline healthy again", async () => {
      const rows = await db.sql`SELECT healthy FROM tide.pipeline_status`;
      return rows.length === 6 && rows.every((r) => r.healthy);
    }, 30_000);
  });
});
