// The SQL of seeds/tutorial-end-to-end.txt, pasted verbatim, in the tutorial's order. What needs the
// running relay (Kafka receiving the orders, NATS payments landing in the inbox) is done here the way
// the relay does it: consumer_next_batch + consumer_commit forward, inbox_insert_batch in reverse.
// `CREATE EXTENSION pg_tide;` is skipped: the test database has the schema (install.test.ts covers it).

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { deliver, runBlock } from "../support/seeds.ts";

const STEP1_ORDERS_TABLE = `-- Create a table for our orders
CREATE TABLE orders (
id SERIAL PRIMARY KEY,
customer_id TEXT NOT NULL,
total NUMERIC(10,2) NOT NULL,
status TEXT NOT NULL DEFAULT 'pending',
created_at TIMESTAMPTZ DEFAULT now()
);`;

const STEP1_OUTBOX = `SELECT tide.outbox_create('orders', p_retention_hours := 72);`;

const STEP1_GROUP = `SELECT tide.create_consumer_group('kafka-relay', 'orders',
p_auto_offset_reset := 'earliest'
);`;

const STEP2_PIPELINE = `SELECT tide.relay_set_outbox('orders-to-kafka', 'orders', 'kafka',
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
-- Publish the event atomically with the business data
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

const STEP6_INBOX = `SELECT tide.inbox_create('payments',
p_max_retries := 5,
p_processed_retention_hours := 72,
p_dlq_retention_hours := 0
);`;

const STEP7_REVERSE = `SELECT tide.relay_set_inbox('nats-to-payments', 'payments',
jsonb_build_object(
'url', 'nats://localhost:4222',
'subject', 'payments.confirmed',
'queue_group', 'pg-tide-payments'
),
p_source := 'nats',
p_batch_size := 50,
p_idempotent := true
);`;

const STEP9_INBOX_QUERY = `SELECT event_id, payload->>'payment_id' as payment_id,
payload->>'order_id' as order_id,
received_at, processed_at
FROM tide."payments_inbox"
ORDER BY id;`;

const STEP10_READ_PENDING = `SELECT id, event_id, payload
FROM tide."payments_inbox"
WHERE processed_at IS NULL
AND retry_count < 5
ORDER BY id
LIMIT 10;`;

const STEP10_PROCESS_1 = `UPDATE orders SET status = 'paid' WHERE id = 1;
SELECT tide.inbox_mark_processed('payments', 'payments:nats:seq-1');`;

const STEP10_PROCESS_REST = `UPDATE orders SET status = 'paid' WHERE id = 2;
SELECT tide.inbox_mark_processed('payments', 'payments:nats:seq-2');
UPDATE orders SET status = 'paid' WHERE id = 3;
SELECT tide.inbox_mark_processed('payments', 'payments:nats:seq-3');`;

const STEP11_DEDUP_COUNT = `SELECT count(*) FROM tide."payments_inbox"
WHERE payload->>'payment_id' = 'pay-001';`;

const PART3_REVERSE_STATUS = `SELECT
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

const PART4_DLQ_QUERY = `SELECT event_id, retry_count, last_error
FROM tide."payments_inbox"
WHERE processed_at IS NULL AND retry_count >= 5;`;

const PART4_REPLAY = `SELECT tide.replay_inbox_messages('payments', ARRAY['payments:nats:seq-4']);`;

/** What the NATS source hands the inbox writer: event_id is the source's stable dedup key. */
function payment(seq: number, paymentId: string, orderId: number, amount: number) {
  return {
    event_id: `payments:nats:seq-${seq}`,
    source: "nats",
    payload: { payment_id: paymentId, order_id: orderId, amount, status: "completed", processor: "stripe" },
    headers: { subject: "payments.confirmed" },
  };
}

let db: TestDatabase;
beforeAll(async () => {
  db = await createTestDatabase();
});
afterAll(async () => {
  await db.drop();
});

describe("tutorial: end-to-end pipeline (orders → Kafka, NATS payments → inbox)", () => {
  it("step 1: creates the orders table, the outbox with 72 hours retention and an 'earliest' group", async () => {
    await db.sql.unsafe(STEP1_ORDERS_TABLE);
    await db.sql.unsafe(STEP1_OUTBOX);
    await db.sql.unsafe(STEP1_GROUP);
    const [outbox] = await db.sql`SELECT retention_hours, enabled FROM tide.outboxes WHERE name = 'orders'`;
    expect(outbox).toEqual({ retention_hours: 72, enabled: true });
    const [group] = await db.sql`
      SELECT auto_offset_reset FROM tide.consumer_groups WHERE outbox_name = 'orders' AND group_name = 'kafka-relay'`;
    expect(group.auto_offset_reset).toBe("earliest");
  });

  it("step 2: configures the Kafka pipeline on the kafka-relay group with batch size 200", async () => {
    await db.sql.unsafe(STEP2_PIPELINE);
    const [{ relay_get_config: config }] = await db.sql`SELECT tide.relay_get_config('orders-to-kafka')`;
    expect(config).toMatchObject({
      name: "orders-to-kafka",
      direction: "forward",
      enabled: true,
      outbox: "orders",
      sink_type: "kafka",
      consumer_group: "kafka-relay",
      batch_size: 200,
      config: { brokers: "localhost:9092", topic: "order-events", acks: "all", compression: "snappy", key: "{event_type}" },
    });
    // The pipeline took the tutorial's group; it did not create another one.
    const groups = await db.sql`SELECT group_name FROM tide.consumer_groups WHERE outbox_name = 'orders'`;
    expect(groups.map((g) => g.group_name)).toEqual(["kafka-relay"]);
  });

  it("step 4: publishes three order events atomically with the order rows", async () => {
    await runBlock(db.sql, STEP4_ORDER_1);
    await runBlock(db.sql, STEP4_ORDERS_2_3);
    const orders = await db.sql`SELECT id, customer_id, status FROM orders ORDER BY id`;
    expect(orders.map((o) => [o.id, o.customer_id, o.status])).toEqual([
      [1, "alice", "confirmed"], [2, "bob", "confirmed"], [3, "charlie", "confirmed"],
    ]);
    const pending = await db.sql.unsafe(OUTBOX_PENDING);
    expect(pending.map((row) => [row.outbox_name, row.payload.order_id, row.pending_groups])).toEqual([
      ["orders", 1, ["kafka-relay"]], ["orders", 2, ["kafka-relay"]], ["orders", 3, ["kafka-relay"]],
    ]);
    expect(pending[0].headers).toEqual({ event_type: "order.confirmed", schema_version: "1.0", correlation_id: "req-abc-123" });
    expect(pending[0].payload.items).toEqual([
      { sku: "WIDGET-01", qty: 2, price: 49.99 }, { sku: "GADGET-03", qty: 1, price: 50.01 },
    ]);
  });

  it("step 5: after the relay delivered to Kafka, outbox_pending is empty and kafka-relay has lag 0", async () => {
    const [{ relay_get_config: config }] = await db.sql`SELECT tide.relay_get_config('orders-to-kafka')`;
    const delivered = await deliver(db.sql, "orders", config.consumer_group, { batch: config.batch_size });
    expect(delivered).toEqual([1n, 2n, 3n]);
    expect(await db.sql.unsafe(OUTBOX_PENDING)).toHaveLength(0);
    const lag = await db.sql.unsafe(CONSUMER_LAG);
    expect(lag.map((row) => [row.group_name, row.outbox_name, row.consumer_id, row.committed_offset, row.lag])).toEqual([
      ["kafka-relay", "orders", "relay-0", 3n, 0n],
    ]);
  });

  it("step 6: creates tide.\"payments_inbox\" with the documented columns and a unique event_id", async () => {
    await db.sql.unsafe(STEP6_INBOX);
    const columns = await db.sql`
      SELECT column_name FROM information_schema.columns
       WHERE table_schema = 'tide' AND table_name = 'payments_inbox' ORDER BY ordinal_position`;
    expect(columns.map((c) => c.column_name)).toEqual(expect.arrayContaining([
      "id", "event_id", "source", "payload", "headers", "received_at", "processed_at", "retry_count", "last_error",
    ]));
    const [unique] = await db.sql`
      SELECT count(*)::int AS n FROM pg_index i
       WHERE i.indrelid = 'tide.payments_inbox'::regclass AND i.indisunique AND i.indnkeyatts = 1
         AND i.indkey[0] = (SELECT attnum FROM pg_attribute WHERE attrelid = 'tide.payments_inbox'::regclass AND attname = 'event_id')`;
    expect(unique.n).toBe(1);
    const [inbox] = await db.sql`
      SELECT max_retries, processed_retention_hours, dlq_retention_hours FROM tide.inboxes WHERE name = 'payments'`;
    expect(inbox).toEqual({ max_retries: 5, processed_retention_hours: 72, dlq_retention_hours: 0 });
  });

  it("step 7: configures the reverse pipeline from NATS with batch size 50, idempotent", async () => {
    await db.sql.unsafe(STEP7_REVERSE);
    const [{ relay_get_config: config }] = await db.sql`SELECT tide.relay_get_config('nats-to-payments')`;
    expect(config).toMatchObject({
      name: "nats-to-payments",
      direction: "reverse",
      enabled: true,
      inbox: "payments",
      source_type: "nats",
      batch_size: 50,
      idempotent: true,
      config: { url: "nats://localhost:4222", subject: "payments.confirmed", queue_group: "pg-tide-payments" },
    });
  });

  it("steps 8–9: the three NATS payments are in the inbox, unprocessed, keyed by payments:nats:seq-N", async () => {
    const batch = [payment(1, "pay-001", 1, 149.99), payment(2, "pay-002", 2, 42.0), payment(3, "pay-003", 3, 299.95)];
    const [result] = await db.sql`SELECT * FROM tide.inbox_insert_batch('payments', ${db.sql.json(batch)})`;
    expect(result).toEqual({ inserted: 3, duplicates: 0 });
    const rows = await db.sql.unsafe(STEP9_INBOX_QUERY);
    expect(rows.map((r) => [r.event_id, r.payment_id, r.order_id, r.processed_at])).toEqual([
      ["payments:nats:seq-1", "pay-001", "1", null],
      ["payments:nats:seq-2", "pay-002", "2", null],
      ["payments:nats:seq-3", "pay-003", "3", null],
    ]);
    for (const row of rows) expect(row.received_at).toBeInstanceOf(Date);
  });

  it("step 10: reads the pending payments and marks them processed with the orders paid", async () => {
    const pending = await db.sql.unsafe(STEP10_READ_PENDING);
    expect(pending.map((r) => r.event_id)).toEqual(["payments:nats:seq-1", "payments:nats:seq-2", "payments:nats:seq-3"]);
    expect(pending[0].payload).toMatchObject({ payment_id: "pay-001", order_id: 1 });

    await runBlock(db.sql, STEP10_PROCESS_1);
    await runBlock(db.sql, STEP10_PROCESS_REST);
    const orders = await db.sql`SELECT status FROM orders ORDER BY id`;
    expect(orders.map((o) => o.status)).toEqual(["paid", "paid", "paid"]);
    expect(await db.sql.unsafe(STEP10_READ_PENDING)).toHaveLength(0);
    const processed = await db.sql.unsafe(STEP9_INBOX_QUERY);
    for (const row of processed) expect(row.processed_at).toBeInstanceOf(Date);
  });

  it("step 11: a redelivered pay-001 is a duplicate: still one row, not processed twice", async () => {
    // The relay passes the same dedup key for a redelivery of the same NATS message.
    const [result] = await db.sql`
      SELECT * FROM tide.inbox_insert_batch('payments', ${db.sql.json([payment(1, "pay-001", 1, 149.99)])})`;
    expect(result).toEqual({ inserted: 0, duplicates: 1 });
    const [{ count }] = await db.sql.unsafe(STEP11_DEDUP_COUNT);
    expect(count).toBe(1n);
    expect(await db.sql.unsafe(STEP10_READ_PENDING)).toHaveLength(0);
  });

  it("part 3: both directions report healthy: nothing pending, three payments processed", async () => {
    expect(await db.sql.unsafe(OUTBOX_PENDING)).toHaveLength(0);
    const lag = await db.sql.unsafe(CONSUMER_LAG);
    expect(lag.map((r) => [r.group_name, r.lag])).toEqual([["kafka-relay", 0n]]);
    const [status] = await db.sql.unsafe(PART3_REVERSE_STATUS);
    expect(status as unknown).toEqual({ pending: 0n, processed: 3n, dead_letter: 0n });
  });

  it("part 4: with Kafka down the new order waits in outbox_pending, and leaves it once delivered", async () => {
    await runBlock(db.sql, PART4_ORDER_4);
    const pending = await db.sql.unsafe(OUTBOX_PENDING);
    expect(pending.map((r) => [r.id, r.payload.customer_id])).toEqual([[4n, "diana"]]);
    const [lag] = await db.sql.unsafe(CONSUMER_LAG);
    expect(lag.lag).toBe(1n);

    expect(await deliver(db.sql, "orders", "kafka-relay", { batch: 200 })).toEqual([4n]);
    expect(await db.sql.unsafe(OUTBOX_PENDING)).toHaveLength(0);
  });

  it("part 4: a failing payment stays in the inbox with its retry count, and is dead-lettered after 5", async () => {
    // The fourth NATS message (the tutorial's payments:nats:seq-4), for diana's order.
    await db.sql`SELECT * FROM tide.inbox_insert_batch('payments', ${db.sql.json([payment(4, "pay-004", 4, 75.5)])})`;

    const [first] = await db.sql.unsafe(PART4_MARK_FAILED);
    expect(first.inbox_mark_failed).toBe(1);
    const [row] = await db.sql`SELECT retry_count, last_error, processed_at FROM tide."payments_inbox" WHERE event_id = 'payments:nats:seq-4'`;
    expect(row).toEqual({ retry_count: 1, last_error: "External API timeout: Stripe returned 504", processed_at: null });
    expect(await db.sql.unsafe(PART4_DLQ_QUERY)).toHaveLength(0);
    const stillPending = await db.sql`SELECT event_id FROM tide.inbox_pending('payments')`;
    expect(stillPending.map((r) => r.event_id)).toEqual(["payments:nats:seq-4"]);

    for (let attempt = 2; attempt <= 5; attempt++) await db.sql.unsafe(PART4_MARK_FAILED);
    const dlq = await db.sql.unsafe(PART4_DLQ_QUERY);
    expect(dlq.map((r) => [r.event_id, r.retry_count, r.last_error])).toEqual([
      ["payments:nats:seq-4", 5, "External API timeout: Stripe returned 504"],
    ]);
    expect(await db.sql`SELECT event_id FROM tide.inbox_pending('payments')`).toHaveLength(0);
    const [status] = await db.sql.unsafe(PART3_REVERSE_STATUS);
    expect(status as unknown).toEqual({ pending: 0n, processed: 3n, dead_letter: 1n });
  });

  it("part 4: replaying the dead letter returns 1 and makes it pending again", async () => {
    const [replayed] = await db.sql.unsafe(PART4_REPLAY);
    expect(replayed.replay_inbox_messages).toBe(1);
    expect(await db.sql.unsafe(PART4_DLQ_QUERY)).toHaveLength(0);
    const pending = await db.sql`SELECT event_id, retry_count, last_error FROM tide.inbox_pending('payments')`;
    expect([...pending]).toEqual([{ event_id: "payments:nats:seq-4", retry_count: 0, last_error: null }]);
    const [status] = await db.sql.unsafe(PART3_REVERSE_STATUS);
    expect(status as unknown).toEqual({ pending: 1n, processed: 3n, dead_letter: 0n });
  });
});
