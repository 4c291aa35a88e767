// seeds/tutorial-end-to-end.txt, parts 1–4, against a running relay and real brokers: orders leave
// the outbox for Kafka, payment confirmations come from NATS JetStream into the inbox. The tutorial's
// SQL runs as written, with only the broker addresses, the topic and the subject replaced by names
// unique to this run. The last test stops Kafka (scripts/kafka.sh) and starts it again.

import { afterAll, beforeAll, describe, expect, it, setDefaultTimeout } from "bun:test";
import type { Relay } from "../../core/relay.ts";
import {
  KAFKA_BROKER, kafkaManagedByScript, kafkaScript, metricValue, NATS_URL, NatsTestClient, readKafka, scrape, unique,
} from "../support/brokers.ts";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { startRelay, waitFor } from "../support/relay.ts";
import { runBlock } from "../support/seeds.ts";
import { REQUIRE_SERVICES, reachable, requireService } from "../support/services.ts";

const kafkaUp = await requireService("kafka", "127.0.0.1", 9092);
const natsUp = await requireService("nats", "127.0.0.1", 4222);
const up = kafkaUp && natsUp;

// Brokers, relays and consumer-group joins take seconds; bun's default per-test timeout is 5 s.
setDefaultTimeout(60_000);

const RUN = unique();
const TOPIC = `order-events-${RUN}`;
const SUBJECT = `payments.${RUN}.confirmed`;
const STREAM = `TIDE_E2E_PAYMENTS_${RUN}`;

/** The tutorial's text with this run's broker addresses and names. */
function local(sql: string): string {
  return sql
    .replaceAll("localhost:9092", KAFKA_BROKER)
    .replaceAll("'order-events'", `'${TOPIC}'`)
    .replaceAll("nats://localhost:4222", NATS_URL)
    .replaceAll("'payments.confirmed'", `'${SUBJECT}'`);
}

// ---- Part 1 ----------------------------------------------------------------------------------

const STEP1 = `CREATE TABLE orders (
id SERIAL PRIMARY KEY,
customer_id TEXT NOT NULL,
total NUMERIC(10,2) NOT NULL,
status TEXT NOT NULL DEFAULT 'pending',
created_at TIMESTAMPTZ DEFAULT now()
);
SELECT tide.outbox_create('orders', p_retention_hours := 72);
SELECT tide.create_consumer_group('kafka-relay', 'orders',
p_auto_offset_reset := 'earliest'
);`;

const STEP2 = `SELECT tide.relay_set_outbox('orders-to-kafka', 'orders', 'kafka',
jsonb_build_object(
'brokers', 'localhost:9092',
'topic', 'order-events',
'acks', 'all', -- wait for all replicas to acknowledge
'compression', 'snappy', -- good balance of speed and compression ratio
'key', '{event_type}' -- partition by event type for ordering
),
p_batch_size := 200 -- Kafka benefits from larger batches
);`;

const STEP4_ORDER_1 = `BEGIN;
INSERT INTO orders (id, customer_id, total, status)
VALUES (1, 'alice', 149.99, 'confirmed');
SELECT tide.outbox_publish('orders',
jsonb_build_object(
'order_id', 1,
'customer_id', 'alice',
'total', 149.99,
'status', 'confirmed',
'items', jsonb_build_array(
jsonb_build_object('sku', 'WIDGET-01', 'qty', 2, 'price', 49.99),
jsonb_build_object('sku', 'GADGET-03', 'qty', 1, 'price', 50.01)
)
),
jsonb_build_object(
'event_type', 'order.confirmed',
'schema_version', '1.0',
'correlation_id', 'req-abc-123'
)
);
COMMIT;`;

const STEP4_ORDERS_2_3 = `BEGIN;
INSERT INTO orders (id, customer_id, total, status) VALUES (2, 'bob', 42.00, 'confirmed');
SELECT tide.outbox_publish('orders',
'{"order_id": 2, "customer_id": "bob", "total": 42.00, "status": "confirmed"}'::jsonb,
'{"event_type": "order.confirmed", "schema_version": "1.0"}'::jsonb);
COMMIT;
BEGIN;
INSERT INTO orders (id, customer_id, total, status) VALUES (3, 'charlie', 299.95, 'confirmed');
SELECT tide.outbox_publish('orders',
'{"order_id": 3, "customer_id": "charlie", "total": 299.95, "status": "confirmed"}'::jsonb,
'{"event_type": "order.confirmed", "schema_version": "1.0"}'::jsonb);
COMMIT;`;

const OUTBOX_PENDING = `SELECT * FROM tide.outbox_pending;`;
const CONSUMER_LAG = `SELECT * FROM tide.consumer_lag;`;

// ---- Part 2 ----------------------------------------------------------------------------------

const STEP6 = `SELECT tide.inbox_create('payments',
p_max_retries := 5,
p_processed_retention_hours := 72,
p_dlq_retention_hours := 0
);`;

const STEP7 = `SELECT tide.relay_set_inbox('nats-to-payments', 'payments',
jsonb_build_object(
'url', 'nats://localhost:4222',
'subject', 'payments.confirmed',
'queue_group', 'pg-tide-payments'
),
p_source := 'nats',
p_batch_size := 50,
p_idempotent := true
);`;

const STEP8_PAYMENTS = [
  '{"payment_id": "pay-001", "order_id": 1, "amount": 149.99, "status": "completed", "processor": "stripe"}',
  '{"payment_id": "pay-002", "order_id": 2, "amount": 42.00, "status": "completed", "processor": "stripe"}',
  '{"payment_id": "pay-003", "order_id": 3, "amount": 299.95, "status": "completed", "processor": "stripe"}',
];

const STEP9 = `SELECT event_id, payload->>'payment_id' as payment_id,
payload->>'order_id' as order_id,
received_at, processed_at
FROM tide."payments_inbox"
ORDER BY id;`;

const STEP10_READ = `SELECT id, event_id, payload
FROM tide."payments_inbox"
WHERE processed_at IS NULL
AND retry_count < 5
ORDER BY id
LIMIT 10;`;

const STEP10_PROCESS = `UPDATE orders SET status = 'paid' WHERE id = 1;
SELECT tide.inbox_mark_processed('payments', 'payments:nats:seq-1');
UPDATE orders SET status = 'paid' WHERE id = 2;
SELECT tide.inbox_mark_processed('payments', 'payments:nats:seq-2');
UPDATE orders SET status = 'paid' WHERE id = 3;
SELECT tide.inbox_mark_processed('payments', 'payments:nats:seq-3');`;

const STEP11_COUNT = `SELECT count(*) FROM tide."payments_inbox"
WHERE payload->>'payment_id' = 'pay-001';`;

// ---- Parts 3 and 4 ---------------------------------------------------------------------------

const PART3_REVERSE = `SELECT
count(*) FILTER (WHERE processed_at IS NULL AND retry_count < 5) as pending,
count(*) FILTER (WHERE processed_at IS NOT NULL) as processed,
count(*) FILTER (WHERE processed_at IS NULL AND retry_count >= 5) as dead_letter
FROM tide."payments_inbox";`;

const PART4_ORDER_4 = `BEGIN;
INSERT INTO orders (id, customer_id, total, status) VALUES (4, 'diana', 75.50, 'confirmed');
SELECT tide.outbox_publish('orders',
'{"order_id": 4, "customer_id": "diana", "total": 75.50}'::jsonb,
'{"event_type": "order.confirmed"}'::jsonb);
COMMIT;`;

const PART4_MARK_FAILED = `SELECT tide.inbox_mark_failed('payments', 'payments:nats:seq-4',
'External API timeout: Stripe returned 504');`;

const PART4_DLQ = `SELECT event_id, retry_count, last_error
FROM tide."payments_inbox"
WHERE processed_at IS NULL AND retry_count >= 5;`;

const PART4_REPLAY = `SELECT tide.replay_inbox_messages('payments', ARRAY['payments:nats:seq-4']);`;

let db: TestDatabase;
let relay: Relay | undefined;
let nats: NatsTestClient;

async function lagOf(group: string): Promise<bigint | undefined> {
  const [row] = await db.sql`SELECT lag FROM tide.consumer_lag WHERE group_name = ${group}`;
  return row?.lag;
}

async function inboxCount(): Promise<number> {
  const [{ n }] = await db.sql`SELECT count(*)::int AS n FROM tide."payments_inbox"`;
  return n;
}

describe.skipIf(!up)("tutorial: end-to-end pipeline with the relay, Kafka and NATS", () => {
  beforeAll(async () => {
    db = await createTestDatabase();
    nats = await NatsTestClient.connect();
  });
  afterAll(async () => {
    await relay?.stop();
    await nats?.close();
    await db?.drop();
  });

  it("part 1, steps 1–3: the schema, the kafka-relay group and the Kafka pipeline, picked up by a started relay", async () => {
    await runBlock(db.sql, STEP1);
    await runBlock(db.sql, local(STEP2));
    const [{ relay_get_config: config }] = await db.sql`SELECT tide.relay_get_config('orders-to-kafka')`;
    expect(config).toMatchObject({ sink_type: "kafka", consumer_group: "kafka-relay", batch_size: 200 });
    relay = await startRelay(db.url, { metricsAddr: "127.0.0.1:0" });
    await waitFor("the relay to own orders-to-kafka", async () => {
      const [row] = await db.sql`SELECT owner_id FROM tide.pipeline_status WHERE pipeline = 'orders-to-kafka'`;
      return row?.owner_id === relay!.relayId;
    });
  });

  it("part 1, steps 4–5: the three orders arrive in the topic keyed by event type; nothing pending, lag 0", async () => {
    await runBlock(db.sql, STEP4_ORDER_1);
    await runBlock(db.sql, STEP4_ORDERS_2_3);
    await waitFor("outbox_pending to empty", async () => (await db.sql.unsafe(OUTBOX_PENDING)).length === 0, 30_000);

    const lag = await db.sql.unsafe(CONSUMER_LAG);
    expect(lag.map((r) => [r.group_name, r.outbox_name, r.consumer_id, r.committed_offset, r.lag])).toEqual([
      ["kafka-relay", "orders", "relay-0", 3n, 0n],
    ]);

    const records = await readKafka(TOPIC, 3);
    expect(records).toHaveLength(3);
    expect(records.map((r) => JSON.parse(r.value!))).toEqual([
      {
        order_id: 1, customer_id: "alice", total: 149.99, status: "confirmed",
        items: [{ sku: "WIDGET-01", qty: 2, price: 49.99 }, { sku: "GADGET-03", qty: 1, price: 50.01 }],
      },
      { order_id: 2, customer_id: "bob", total: 42.0, status: "confirmed" },
      { order_id: 3, customer_id: "charlie", total: 299.95, status: "confirmed" },
    ]);
    expect(records.map((r) => r.key)).toEqual(["order.confirmed", "order.confirmed", "order.confirmed"]);
    expect(records.map((r) => r.headers["tide-dedup-key"])).toEqual(["orders:1", "orders:2", "orders:3"]);
    expect(records[0]!.headers).toMatchObject({
      event_type: "order.confirmed", schema_version: "1.0", correlation_id: "req-abc-123", "tide-outbox": "orders",
    });
  });

  it("part 2, steps 6–9: payments published on NATS land in the inbox as payments:nats:seq-N", async () => {
    await runBlock(db.sql, STEP6);
    // A stream stores the subject, so the source reads it through a JetStream durable consumer and
    // the event ids are the stream sequences of the tutorial's table.
    await nats.createStream(STREAM, [SUBJECT]);
    await runBlock(db.sql, local(STEP7));
    for (const body of STEP8_PAYMENTS) await nats.publish(SUBJECT, body);

    await waitFor("three payments in the inbox", async () => (await inboxCount()) === 3);
    const rows = await db.sql.unsafe(STEP9);
    expect(rows.map((r) => [r.event_id, r.payment_id, r.order_id, r.processed_at])).toEqual([
      ["payments:nats:seq-1", "pay-001", "1", null],
      ["payments:nats:seq-2", "pay-002", "2", null],
      ["payments:nats:seq-3", "pay-003", "3", null],
    ]);
    for (const row of rows) expect(row.received_at).toBeInstanceOf(Date);
    const [full] = await db.sql`SELECT source, payload FROM tide."payments_inbox" WHERE event_id = 'payments:nats:seq-1'`;
    expect(full).toEqual({
      source: `nats:${SUBJECT}`,
      payload: { payment_id: "pay-001", order_id: 1, amount: 149.99, status: "completed", processor: "stripe" },
    });
    // The JetStream consumer got its acks (after the inbox commit): nothing is waiting for one.
    await waitFor("the consumer to have no unacknowledged messages", async () => {
      const info = await nats.jsm.consumers.info(STREAM, "pg-tide-payments");
      return info.num_ack_pending === 0 && info.num_pending === 0 && info.delivered.stream_seq === 3;
    });
  });

  it("part 2, step 10: the application reads the pending payments and marks them processed", async () => {
    const pending = await db.sql.unsafe(STEP10_READ);
    expect(pending.map((r) => r.event_id)).toEqual(["payments:nats:seq-1", "payments:nats:seq-2", "payments:nats:seq-3"]);
    await runBlock(db.sql, STEP10_PROCESS);
    expect(await db.sql.unsafe(STEP10_READ)).toHaveLength(0);
    const orders = await db.sql`SELECT status FROM orders ORDER BY id`;
    expect(orders.map((o) => o.status)).toEqual(["paid", "paid", "paid"]);
  });

  it("part 2, step 11: a redelivery of the same NATS messages is a duplicate: one row each, still processed", async () => {
    // Make JetStream deliver seq 1–3 again: the durable consumer is deleted under the running relay,
    // which recreates it (deliver policy "all") and reads the stream from the start once more.
    const before = metricValue(await scrape(relay!.httpPort), "pg_tide_relay_dedup_skipped_total", { pipeline: "nats-to-payments" }) ?? 0;
    await nats.jsm.consumers.delete(STREAM, "pg-tide-payments");
    await waitFor("the relay to count the three redelivered payments as duplicates", async () => {
      const text = await scrape(relay!.httpPort);
      return (metricValue(text, "pg_tide_relay_dedup_skipped_total", { pipeline: "nats-to-payments" }) ?? 0) - before === 3;
    }, 30_000);
    const [{ count }] = await db.sql.unsafe(STEP11_COUNT);
    expect(count).toBe(1n);
    expect(await inboxCount()).toBe(3);
    expect(await db.sql.unsafe(STEP10_READ)).toHaveLength(0); // not pending again: no double processing
  });

  it("part 2, step 11 as written: pay-001 published again as a new message is one row when event_id comes from the payload", async () => {
    // The tutorial republishes the same body, which is a new stream message (a new sequence). Only
    // an id carried by the message itself can recognise it: here the pipeline's event_id template.
    const subject = `payments.${RUN}.by-id`;
    await nats.createStream(`TIDE_E2E_BY_ID_${RUN}`, [subject]);
    await db.sql`SELECT tide.inbox_create('payments_by_id', p_max_retries := 5)`;
    await db.sql`SELECT tide.relay_set_inbox('nats-to-payments-by-id', 'payments_by_id',
                   ${db.sql.json({ url: NATS_URL, subject, queue_group: "pg-tide-payments-by-id", event_id: "{payload.payment_id}" })},
                   p_source := 'nats', p_batch_size := 50, p_idempotent := true)`;
    await nats.publish(subject, STEP8_PAYMENTS[0]!);
    await nats.publish(subject, STEP8_PAYMENTS[0]!);
    await waitFor("the second pay-001 to be counted as a duplicate", async () => {
      const text = await scrape(relay!.httpPort);
      return metricValue(text, "pg_tide_relay_dedup_skipped_total", { pipeline: "nats-to-payments-by-id" }) === 1;
    });
    const rows = await db.sql`SELECT event_id, payload->>'payment_id' AS payment_id FROM tide."payments_by_id_inbox"`;
    expect([...rows]).toEqual([{ event_id: "pay-001", payment_id: "pay-001" }]);
  });

  it("part 3: both directions are healthy, counted in /metrics, nothing pending", async () => {
    expect(await db.sql.unsafe(OUTBOX_PENDING)).toHaveLength(0);
    expect((await db.sql.unsafe(CONSUMER_LAG)).map((r) => [r.group_name, r.lag])).toEqual([["kafka-relay", 0n]]);
    const [status] = await db.sql.unsafe(PART3_REVERSE);
    expect(status as unknown).toEqual({ pending: 0n, processed: 3n, dead_letter: 0n });

    const text = await waitFor("both pipelines healthy in /metrics", async () => {
      const text = await scrape(relay!.httpPort);
      return metricValue(text, "pg_tide_relay_pipeline_healthy", { pipeline: "orders-to-kafka" }) === 1 &&
        metricValue(text, "pg_tide_relay_pipeline_healthy", { pipeline: "nats-to-payments" }) === 1 && text;
    });
    expect(metricValue(text, "pg_tide_relay_messages_published_total", { pipeline: "orders-to-kafka", direction: "forward" })).toBe(3);
    expect(metricValue(text, "pg_tide_relay_messages_consumed_total", { pipeline: "nats-to-payments", direction: "reverse" })).toBe(3);
    expect(metricValue(text, "pg_tide_relay_consumer_lag", { pipeline: "orders-to-kafka" })).toBe(0);
    // pipeline_status is written at the relay's heartbeat: wait for the one after the last delivery.
    const pipelines = await waitFor("both pipelines healthy in pipeline_status", async () => {
      const rows = await db.sql`SELECT pipeline, healthy, owner_id FROM tide.pipeline_status
                                 WHERE pipeline IN ('orders-to-kafka', 'nats-to-payments') ORDER BY pipeline`;
      return rows.every((r) => r.healthy) && rows;
    });
    expect(pipelines.map((p) => [p.pipeline, p.healthy, p.owner_id])).toEqual([
      ["nats-to-payments", true, relay!.relayId],
      ["orders-to-kafka", true, relay!.relayId],
    ]);
  });

  it("part 4: a payment that keeps failing is retried, dead-lettered after 5 failures, and replayed", async () => {
    // diana's payment is the stream's fourth message.
    await nats.publish(SUBJECT, '{"payment_id": "pay-004", "order_id": 4, "amount": 75.50, "status": "completed", "processor": "stripe"}');
    await waitFor("payments:nats:seq-4 in the inbox", async () =>
      (await db.sql`SELECT 1 FROM tide."payments_inbox" WHERE event_id = 'payments:nats:seq-4'`).length === 1);

    const [first] = await db.sql.unsafe(PART4_MARK_FAILED);
    expect(first.inbox_mark_failed).toBe(1);
    const [row] = await db.sql`SELECT retry_count, last_error, processed_at FROM tide."payments_inbox" WHERE event_id = 'payments:nats:seq-4'`;
    expect(row).toEqual({ retry_count: 1, last_error: "External API timeout: Stripe returned 504", processed_at: null });
    expect(await db.sql.unsafe(PART4_DLQ)).toHaveLength(0);

    for (let attempt = 2; attempt <= 5; attempt++) await db.sql.unsafe(PART4_MARK_FAILED);
    const dlq = await db.sql.unsafe(PART4_DLQ);
    expect(dlq.map((r) => [r.event_id, r.retry_count, r.last_error])).toEqual([
      ["payments:nats:seq-4", 5, "External API timeout: Stripe returned 504"],
    ]);
    expect(await db.sql`SELECT 1 FROM tide.inbox_pending('payments')`).toHaveLength(0);

    const [replayed] = await db.sql.unsafe(PART4_REPLAY);
    expect(replayed.replay_inbox_messages).toBe(1);
    expect(await db.sql.unsafe(PART4_DLQ)).toHaveLength(0);
    const pending = await db.sql`SELECT event_id, retry_count FROM tide.inbox_pending('payments')`;
    expect([...pending]).toEqual([{ event_id: "payments:nats:seq-4", retry_count: 0 }]);
  });

  // The outage is real: the test stops the broker and starts it again, which it can only do to a
  // broker that scripts/kafka.sh of this checkout started (a proxy would not do: Kafka clients go
  // to the advertised address).
  const ownKafka = kafkaManagedByScript();
  const notOurs = "the Kafka at 127.0.0.1:9092 was not started by this checkout's scripts/kafka.sh, " +
    "so this test cannot stop it; stop that broker and run scripts/kafka.sh start";
  if (!ownKafka && !REQUIRE_SERVICES) console.warn(`skipping the Kafka outage test: ${notOurs}`);
  it.skipIf(!ownKafka && !REQUIRE_SERVICES)(
    "part 4: with Kafka stopped order 4 waits in outbox_pending, and arrives by itself once Kafka is back",
    async () => {
      if (!ownKafka) throw new Error(`${notOurs} (TIDE_REQUIRE_SERVICES=1)`);
      try {
        await kafkaScript("stop");
        await waitFor("Kafka to stop answering", async () => !(await reachable("127.0.0.1", 9092)));
        await runBlock(db.sql, PART4_ORDER_4);

        const pending = await db.sql.unsafe(OUTBOX_PENDING);
        expect(pending.map((r) => [r.id, r.payload.customer_id, r.pending_groups])).toEqual([[4n, "diana", ["kafka-relay"]]]);
        // The relay tries, fails and says why; the message stays where it is.
        const [status] = await waitFor("the pipeline to report the outage", async () => {
          const rows = await db.sql`SELECT healthy, last_error, lag FROM tide.pipeline_status WHERE pipeline = 'orders-to-kafka'`;
          return rows[0]?.healthy === false && rows;
        }, 60_000);
        expect(status.last_error).toContain(KAFKA_BROKER);
        expect(status.lag).toBe(1n);
        expect(await lagOf("kafka-relay")).toBe(1n);
        expect(await db.sql.unsafe(OUTBOX_PENDING)).toHaveLength(1);
      } finally {
        await kafkaScript("start");
      }
      await waitFor("order 4 to be delivered after Kafka came back", async () => (await db.sql.unsafe(OUTBOX_PENDING)).length === 0, 90_000);
      expect(await lagOf("kafka-relay")).toBe(0n);
      const records = await readKafka(TOPIC, 4);
      const keys = records.map((r) => r.headers["tide-dedup-key"]);
      expect(new Set(keys)).toEqual(new Set(["orders:1", "orders:2", "orders:3", "orders:4"]));
      const diana = records.find((r) => r.headers["tide-dedup-key"] === "orders:4")!;
      expect(JSON.parse(diana.value!)).toEqual({ order_id: 4, customer_id: "diana", total: 75.5 });
      expect(diana.key).toBe("order.confirmed");
      await waitFor("the pipeline to be healthy again", async () => {
        const [row] = await db.sql`SELECT healthy FROM tide.pipeline_status WHERE pipeline = 'orders-to-kafka'`;
        return row?.healthy === true;
      });
    },
    240_000,
  );
});
