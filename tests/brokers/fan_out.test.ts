// seeds/fan-out-pattern.txt with a running relay: one outbox delivered to NATS, Kafka and a partner
// webhook, each through its own consumer group. The webhook is a local endpoint that holds every
// request until the test lets it answer: NATS and Kafka must receive everything meanwhile, and
// consumer_lag must show the slow group behind and the others at 0.

import { afterAll, beforeAll, describe, expect, it, setDefaultTimeout } from "bun:test";
import type { Msg } from "@nats-io/transport-node";
import type { Relay } from "../../core/relay.ts";
import { KAFKA_BROKER, KafkaReader, NATS_URL, NatsTestClient, unique } from "../support/brokers.ts";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { startRelay, waitFor } from "../support/relay.ts";
import { runBlock } from "../support/seeds.ts";
import { requireService } from "../support/services.ts";

const kafkaUp = await requireService("kafka", "127.0.0.1", 9092);
const natsUp = await requireService("nats", "127.0.0.1", 4222);

// Brokers, relays and consumer-group joins take seconds; bun's default per-test timeout is 5 s.
setDefaultTimeout(60_000);

const RUN = unique();
const SUBJECT = `orders.${RUN}.events`;
const TOPIC = `orders-${RUN}`;
const MESSAGES = 40;

const STEP1 = `SELECT tide.outbox_create('orders', p_retention_hours := 72);`;

const STEP2 = `SELECT tide.create_consumer_group('nats-relay', 'orders');
SELECT tide.create_consumer_group('kafka-relay', 'orders');
SELECT tide.create_consumer_group('webhook-relay', 'orders');`;

/** Step 3 with this run's addresses in place of nats:4222, kafka:9092 and the partner URL. */
function step3(webhookUrl: string): string {
  return `SELECT tide.relay_set_outbox('orders-nats', 'orders', 'nats',
  '{"url": "nats://nats:4222", "subject": "orders.events"}'::jsonb
);
SELECT tide.relay_set_outbox('orders-kafka', 'orders', 'kafka',
  '{"brokers": "kafka:9092", "topic": "orders"}'::jsonb
);
SELECT tide.relay_set_outbox('orders-webhook', 'orders', 'webhook',
  '{"url": "https://partner.example.com/hooks/orders"}'::jsonb
);`
    .replace("nats://nats:4222", NATS_URL)
    .replace('"orders.events"', `"${SUBJECT}"`)
    .replace("kafka:9092", KAFKA_BROKER)
    .replace('"topic": "orders"', `"topic": "${TOPIC}"`)
    .replace("https://partner.example.com/hooks/orders", webhookUrl);
}

const STEP4 = `SELECT * FROM tide.consumer_lag;`;

/** A partner endpoint that holds every request until release(), then answers 200 to all. */
function slowPartner() {
  let release!: () => void;
  const released = new Promise<void>((resolve) => (release = resolve));
  const arrived: string[] = [];
  const answered = new Set<string>();
  const server = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(request) {
      const key = request.headers.get("idempotency-key") ?? "";
      arrived.push(key);
      await request.text();
      await released;
      answered.add(key);
      return new Response("ok");
    },
  });
  return { url: `http://127.0.0.1:${server.port}/hooks/orders`, arrived, answered, release, stop: () => server.stop(true) };
}

let db: TestDatabase;
let relay: Relay;
let nats: NatsTestClient;
let kafka: KafkaReader;
let partner: ReturnType<typeof slowPartner>;

async function lags(): Promise<Record<string, bigint>> {
  const rows = await db.sql.unsafe(STEP4);
  return Object.fromEntries(rows.map((r) => [r.group_name, r.lag]));
}

describe.skipIf(!kafkaUp || !natsUp)("tutorial: fan-out to NATS, Kafka and a slow webhook", () => {
  beforeAll(async () => {
    db = await createTestDatabase();
    nats = await NatsTestClient.connect();
    kafka = await KafkaReader.start([TOPIC]);
    partner = slowPartner();
  });
  afterAll(async () => {
    partner?.release();
    await relay?.stop();
    partner?.stop();
    await kafka?.stop();
    await nats?.close();
    await db?.drop();
  });

  it("binds each pipeline to the consumer group created for it", async () => {
    await runBlock(db.sql, STEP1);
    await runBlock(db.sql, STEP2);
    await runBlock(db.sql, step3(partner.url));
    const pipelines = await db.sql`SELECT name, consumer_group FROM tide.relay_pipelines ORDER BY name`;
    expect(pipelines.map((p) => [p.name, p.consumer_group])).toEqual([
      ["orders-kafka", "kafka-relay"],
      ["orders-nats", "nats-relay"],
      ["orders-webhook", "webhook-relay"],
    ]);
    const groups = await db.sql`SELECT group_name FROM tide.consumer_groups WHERE outbox_name = 'orders' ORDER BY group_name`;
    expect(groups.map((g) => g.group_name)).toEqual(["kafka-relay", "nats-relay", "webhook-relay"]);
  });

  it("delivers everything to NATS and Kafka while the webhook is held back; only webhook-relay lags", async () => {
    const received: Msg[] = [];
    nats.nc.subscribe(SUBJECT, { callback: (_error, msg) => void received.push(msg) });
    await nats.nc.flush();
    relay = await startRelay(db.url);
    await db.sql`SELECT tide.outbox_publish('orders', jsonb_build_object('order_id', g, 'total', g * 10),
                                            '{"event_type": "order.created"}'::jsonb)
                   FROM generate_series(1, ${MESSAGES}) g`;

    await waitFor(`${MESSAGES} messages on NATS`, () => received.length >= MESSAGES);
    const records = await kafka.waitForCount(MESSAGES);
    expect(received.map((m) => m.json<{ order_id: number }>().order_id)).toEqual(range(MESSAGES));
    expect(received.map((m) => m.headers?.get("Nats-Msg-Id"))).toEqual(range(MESSAGES).map((n) => `orders:${n}`));
    expect(records.map((r) => JSON.parse(r.value!).order_id)).toEqual(range(MESSAGES));
    expect(records.map((r) => r.headers["tide-dedup-key"])).toEqual(range(MESSAGES).map((n) => `orders:${n}`));

    const lag = await waitFor("nats-relay and kafka-relay at lag 0", async () => {
      const lag = await lags();
      return lag["nats-relay"] === 0n && lag["kafka-relay"] === 0n && lag;
    });
    // The webhook is being tried (its first request may come after the fast sinks are done)...
    await waitFor("the webhook to be tried", () => partner.arrived.length > 0);
    expect(partner.answered.size).toBe(0); // ...but has answered nothing yet
    expect(lag["webhook-relay"]).toBe(BigInt(MESSAGES));
    const pending = await db.sql`SELECT count(*)::int AS n, array_agg(DISTINCT g) AS groups
                                   FROM tide.outbox_pending, unnest(pending_groups) g`;
    expect(pending[0]).toEqual({ n: MESSAGES, groups: ["webhook-relay"] });
  });

  it("catches the webhook up once it answers, with every message once by Idempotency-Key; all lags 0", async () => {
    partner.release();
    await waitFor("webhook-relay at lag 0", async () => (await lags())["webhook-relay"] === 0n, 30_000);
    expect(partner.answered).toEqual(new Set(range(MESSAGES).map((n) => `orders:${n}`)));
    expect(await lags()).toEqual({ "nats-relay": 0n, "kafka-relay": 0n, "webhook-relay": 0n });
    expect(await db.sql`SELECT * FROM tide.outbox_pending`).toHaveLength(0);
    // Health is written at the relay's next heartbeat (a held request may have timed out before).
    const status = await waitFor("every pipeline healthy", async () => {
      const rows = await db.sql`SELECT pipeline, healthy, lag, dlq_depth FROM tide.pipeline_status ORDER BY pipeline`;
      return rows.every((r) => r.healthy) && rows;
    });
    expect(status.map((s) => [s.pipeline, s.healthy, s.lag, s.dlq_depth])).toEqual([
      ["orders-kafka", true, 0n, 0n],
      ["orders-nats", true, 0n, 0n],
      ["orders-webhook", true, 0n, 0n],
    ]);
  });
});

function range(n: number): number[] {
  return Array.from({ length: n }, (_, i) => i + 1);
}
