// The SQL of the seed documents, pasted verbatim: fan-out pattern, PostgreSQL outbox source,
// microservice event bus and Sequin's fan-out (the end-to-end tutorial is in seeds_end_to_end.test.ts).
// The relay's part is done by hand (consumer_next_batch + consumer_commit, inbox_insert_batch), and
// `CREATE EXTENSION pg_tide;` is skipped: each database already has the schema.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { deliver, expectError, listen, runBlock } from "../support/seeds.ts";

async function configOf(db: TestDatabase, pipeline: string) {
  const [{ relay_get_config: config }] = await db.sql`SELECT tide.relay_get_config(${pipeline})`;
  return config;
}

describe("fan-out pattern: one outbox, three sinks, independent groups", () => {
  let db: TestDatabase;
  beforeAll(async () => {
    db = await createTestDatabase();
  });
  afterAll(async () => {
    await db.drop();
  });

  const STEP1 = `SELECT tide.outbox_create('orders', p_retention_hours := 72);`;
  const STEP2 = [
    `SELECT tide.create_consumer_group('nats-relay', 'orders');`,
    `SELECT tide.create_consumer_group('kafka-relay', 'orders');`,
    `SELECT tide.create_consumer_group('webhook-relay', 'orders');`,
  ];
  const STEP3 = [
    `-- To NATS
SELECT tide.relay_set_outbox('orders-nats', 'orders', 'nats',
  '{"url": "nats://nats:4222", "subject": "orders.events"}'::jsonb
);`,
    `-- To Kafka
SELECT tide.relay_set_outbox('orders-kafka', 'orders', 'kafka',
  '{"brokers": "kafka:9092", "topic": "orders"}'::jsonb
);`,
    `-- To partner webhook
SELECT tide.relay_set_outbox('orders-webhook', 'orders', 'webhook',
  '{"url": "https://partner.example.com/hooks/orders"}'::jsonb
);`,
  ];
  const STEP4 = `SELECT * FROM tide.consumer_lag;`;
  // The document's output of step 4, after 1000 messages.
  const DOCUMENTED_LAG = [
    ["nats-relay", "orders", "relay-0", 1000n, 0n],
    ["kafka-relay", "orders", "relay-0", 950n, 50n],
    ["webhook-relay", "orders", "relay-0", 800n, 200n],
  ];
  const columns = (rows: Record<string, unknown>[]) =>
    rows.map((r) => [r.group_name, r.outbox_name, r.consumer_id, r.committed_offset, r.lag]);

  it("steps 1–3: each pipeline is bound to the group created for its sink", async () => {
    await db.sql.unsafe(STEP1);
    for (const statement of STEP2) await db.sql.unsafe(statement);
    for (const statement of STEP3) await db.sql.unsafe(statement);
    expect(await configOf(db, "orders-nats")).toMatchObject({ sink_type: "nats", consumer_group: "nats-relay", outbox: "orders" });
    expect(await configOf(db, "orders-kafka")).toMatchObject({ sink_type: "kafka", consumer_group: "kafka-relay" });
    expect(await configOf(db, "orders-webhook")).toMatchObject({
      sink_type: "webhook",
      consumer_group: "webhook-relay",
      config: { url: "https://partner.example.com/hooks/orders" },
    });
    const [{ n }] = await db.sql`SELECT count(*)::int AS n FROM tide.consumer_groups WHERE outbox_name = 'orders'`;
    expect(n).toBe(3);
  });

  it("step 4: after 1000 messages delivered 1000 / 950 / 800, consumer_lag shows the document's values", async () => {
    await db.sql`SELECT tide.outbox_publish('orders', jsonb_build_object('n', n)) FROM generate_series(1, 1000) n`;
    expect(await deliver(db.sql, "orders", "nats-relay")).toHaveLength(1000);
    expect(await deliver(db.sql, "orders", "kafka-relay", { count: 950 })).toHaveLength(950);
    expect(await deliver(db.sql, "orders", "webhook-relay", { count: 800, batch: 64 })).toHaveLength(800);

    const rows = await db.sql.unsafe(STEP4);
    // The document's five columns come first (the view may add more after them).
    expect(rows.columns.slice(0, 5).map((c) => c.name)).toEqual(["group_name", "outbox_name", "consumer_id", "committed_offset", "lag"]);
    const byGroup = (a: unknown[], b: unknown[]) => String(a[0]).localeCompare(String(b[0]));
    expect(columns(rows).sort(byGroup)).toEqual([...DOCUMENTED_LAG].sort(byGroup));
  });

  it("step 4: lists the groups in the document's order (the order they were created)", async () => {
    expect(columns(await db.sql.unsafe(STEP4))).toEqual(DOCUMENTED_LAG);
  });

  it("a slow group does not hold back the others: each delivers the next message on its own", async () => {
    await db.sql`SELECT tide.outbox_publish('orders', '{"n": 1001}'::jsonb)`;
    expect(await deliver(db.sql, "orders", "nats-relay")).toEqual([1001n]);
    const lag = await db.sql`SELECT group_name, lag FROM tide.consumer_lag ORDER BY group_name`;
    expect(lag.map((r) => [r.group_name, r.lag])).toEqual([["kafka-relay", 51n], ["nats-relay", 0n], ["webhook-relay", 201n]]);
  });
});

describe("PostgreSQL outbox source", () => {
  let db: TestDatabase;
  beforeAll(async () => {
    db = await createTestDatabase();
    // The document assumes the outbox exists already.
    await db.sql`SELECT tide.outbox_create('orders')`;
  });
  afterAll(async () => {
    await db.drop();
  });

  const CONFIGURE = `SELECT tide.relay_set_outbox(
    'orders-pipeline',      -- pipeline name
    'orders',               -- outbox name (this IS the source)
    'relay-consumer',       -- consumer group name
    '{
        "sink_type": "kafka",
        "brokers": "localhost:9092",
        "topic": "order-events",
        "batch_size": 100,
        "poll_interval_ms": 1000
    }'::jsonb
);`;
  const TROUBLESHOOT = `SELECT tide.relay_get_config('orders-pipeline')`;

  it("configures a forward pipeline whose third argument is the consumer group", async () => {
    await db.sql.unsafe(CONFIGURE);
    const [{ relay_get_config: config }] = await db.sql.unsafe(TROUBLESHOOT);
    expect(config).toMatchObject({
      enabled: true, // "Check that the pipeline is enabled"
      outbox: "orders",
      sink_type: "kafka",
      consumer_group: "relay-consumer",
      batch_size: 100,
      config: { brokers: "localhost:9092", topic: "order-events", poll_interval_ms: 1000 },
    });
    const groups = await db.sql`SELECT group_name FROM tide.consumer_groups WHERE outbox_name = 'orders'`;
    expect(groups.map((g) => g.group_name)).toEqual(["relay-consumer"]);
  });

  // As written, the document's configs contain `...` and are not JSON:
  //   SELECT tide.relay_set_outbox('to-kafka', 'orders', 'kafka-group', '{"sink_type": "kafka", ...}'::jsonb);
  //   SELECT tide.relay_set_outbox('to-s3', 'orders', 's3-group', '{"sink_type": "object_storage", ...}'::jsonb);
  // The nearest valid forms fill in the required keys. object_storage is not a built-in sink: a relay
  // that loads such a drop-in plugin registers its type, after which the catalog accepts it.
  const TO_KAFKA = `SELECT tide.relay_set_outbox('to-kafka', 'orders', 'kafka-group', '{"sink_type": "kafka", "brokers": "localhost:9092", "topic": "orders"}'::jsonb);`;
  const TO_S3 = `SELECT tide.relay_set_outbox('to-s3', 'orders', 's3-group', '{"sink_type": "object_storage", "bucket": "orders-archive"}'::jsonb);`;

  it("rejects the documented placeholder JSON as invalid input", async () => {
    await expectError(
      db.sql.unsafe(`SELECT tide.relay_set_outbox('to-kafka', 'orders', 'kafka-group', '{"sink_type": "kafka", ...}'::jsonb);`),
      "invalid input syntax for type json",
    );
  });

  it("two pipelines read the same outbox through their own groups, independently", async () => {
    await db.sql.unsafe(TO_KAFKA);
    await expectError(db.sql.unsafe(TO_S3), "unknown sink type 'object_storage'", "kafka", "webhook");
    await db.sql`SELECT tide.register_plugin_type('object_storage', 'sink')`;
    await db.sql.unsafe(TO_S3);
    expect(await configOf(db, "to-kafka")).toMatchObject({ sink_type: "kafka", consumer_group: "kafka-group" });
    expect(await configOf(db, "to-s3")).toMatchObject({ sink_type: "object_storage", consumer_group: "s3-group" });

    for (let i = 0; i < 3; i++) await db.sql`SELECT tide.outbox_publish('orders', ${db.sql.json({ i })})`;
    expect(await deliver(db.sql, "orders", "kafka-group")).toHaveLength(3);
    const lag = await db.sql`SELECT group_name, lag FROM tide.consumer_lag ORDER BY group_name`;
    expect(lag.map((r) => [r.group_name, r.lag])).toEqual([["kafka-group", 0n], ["relay-consumer", 3n], ["s3-group", 3n]]);
  });

  it("a batch not committed is delivered again (redelivery after a relay restart)", async () => {
    const first = await db.sql`SELECT id FROM tide.consumer_next_batch('orders', 's3-group', 100)`;
    const again = await db.sql`SELECT id FROM tide.consumer_next_batch('orders', 's3-group', 100)`;
    expect(again.map((r) => r.id)).toEqual(first.map((r) => r.id));
  });

  it("with notify enabled on the outbox, outbox_publish wakes the relay on tide_outbox_notify", async () => {
    await db.sql`SELECT tide.outbox_create('orders_live', p_notify := true)`;
    const wakeups = await listen(db.sql, "tide_outbox_notify");
    try {
      await db.sql`SELECT tide.outbox_publish('orders_live', '{"order_id": 1}'::jsonb)`;
      expect(await wakeups.next()).toBe("orders_live");
    } finally {
      await wakeups.close();
    }
  });
});

describe("microservice event bus: order, payment and shipping databases", () => {
  let orders: TestDatabase;
  let payments: TestDatabase;
  let shipping: TestDatabase;
  beforeAll(async () => {
    [orders, payments, shipping] = await Promise.all([createTestDatabase(), createTestDatabase(), createTestDatabase()]);
  });
  afterAll(async () => {
    await Promise.all([orders.drop(), payments.drop(), shipping.drop()]);
  });

  const ORDER_PUBLISH = `BEGIN;
INSERT INTO orders (id, customer_id, total, status)
VALUES ('ORD-001', 'CUST-42', 149.99, 'created');
SELECT tide.outbox_publish('order_events', 'orders', jsonb_build_object(
'event_type', 'order.created',
'order_id', 'ORD-001',
'customer_id', 'CUST-42',
'total', 149.99,
'items', jsonb_build_array(
jsonb_build_object('sku', 'WIDGET-A', 'qty', 2),
jsonb_build_object('sku', 'GADGET-B', 'qty', 1)
)
));
COMMIT;`;
  const ORDER_PIPELINE = `SELECT tide.relay_set_outbox(
'orders-to-nats',
'order_events',
'{
"sink_type": "nats",
"url": "nats://nats:4222",
"subject_template": "events.orders.{op}"
}'::jsonb
);`;
  const PAYMENT_PIPELINE = `SELECT tide.relay_set_inbox(
'orders-for-payments',
'payment_triggers',
'{
"source_type": "nats",
"url": "nats://nats:4222",
"subject": "events.orders.>",
"consumer_group": "payment-service",
"durable_name": "payment-service"
}'::jsonb
);`;
  const PAYMENT_WORKER_READ = `SELECT id, payload
FROM tide.inbox_pending('payment_triggers')
LIMIT 10;`;
  const PAYMENT_WORKER_DONE = `SELECT tide.inbox_mark_processed('payment_triggers', 42);`;
  // As written, the filter uses the shell idiom '"'"' for a single quote, which is not SQL:
  //   "filter": "payload.event_type == '"'"'order.created'"'"'"
  // In SQL the quote inside a literal is doubled (''), which gives the filter the document means.
  const SHIPPING_PIPELINE_AS_WRITTEN = `SELECT tide.relay_set_inbox(
'orders-for-shipping',
'shipping_triggers',
'{
"source_type": "nats",
"url": "nats://nats:4222",
"subject": "events.orders.>",
"consumer_group": "shipping-service",
"durable_name": "shipping-service",
"transform": {
"filter": "payload.event_type == '"'"'order.created'"'"'"
}
}'::jsonb
);`;
  const SHIPPING_PIPELINE = SHIPPING_PIPELINE_AS_WRITTEN.replaceAll(`'"'"'`, `''`);

  it("order service: publishes order.created with topic 'orders' in the order's transaction", async () => {
    await orders.sql.unsafe(`SELECT tide.outbox_create('order_events');`);
    // The document does not show the orders table of this service; its ids are text.
    await orders.sql`CREATE TABLE orders (id text PRIMARY KEY, customer_id text NOT NULL, total numeric(10,2) NOT NULL, status text NOT NULL)`;
    await runBlock(orders.sql, ORDER_PUBLISH);
    const [message] = await orders.sql`SELECT topic, payload FROM tide.outbox_messages WHERE outbox = 'order_events'`;
    expect(message.topic).toBe("orders");
    expect(message.payload).toMatchObject({ event_type: "order.created", order_id: "ORD-001", customer_id: "CUST-42", total: 149.99 });
    expect(message.payload.items).toEqual([{ sku: "WIDGET-A", qty: 2 }, { sku: "GADGET-B", qty: 1 }]);
  });

  it("order service: the NATS pipeline (3-argument form) gets a group named after it, from the earliest message", async () => {
    await orders.sql.unsafe(ORDER_PIPELINE);
    expect(await configOf(orders, "orders-to-nats")).toMatchObject({
      sink_type: "nats",
      consumer_group: "orders-to-nats",
      batch_size: 100,
      config: { url: "nats://nats:4222", subject_template: "events.orders.{op}" },
    });
    const batch = await orders.sql`SELECT topic, payload FROM tide.consumer_next_batch('order_events', 'orders-to-nats', 100)`;
    expect(batch.map((m) => [m.topic, m.payload.order_id])).toEqual([["orders", "ORD-001"]]);
  });

  it("payment service: an inbox and a NATS pipeline named by config.source_type", async () => {
    await payments.sql.unsafe(`SELECT tide.inbox_create('payment_triggers');`);
    await payments.sql.unsafe(PAYMENT_PIPELINE);
    expect(await configOf(payments, "orders-for-payments")).toMatchObject({
      direction: "reverse",
      source_type: "nats",
      inbox: "payment_triggers",
      config: { subject: "events.orders.>", consumer_group: "payment-service", durable_name: "payment-service" },
    });
  });

  it("payment service: the worker reads 10 pending messages and marks message 42 processed", async () => {
    // The relay has written 45 order events from NATS into the inbox.
    const events = Array.from({ length: 45 }, (_, i) => ({
      event_id: `order_events:${i + 1}`,
      source: "nats",
      payload: { event_type: "order.created", order_id: `ORD-${i + 1}` },
    }));
    await payments.sql`SELECT * FROM tide.inbox_insert_batch('payment_triggers', ${payments.sql.json(events)})`;
    const batch = await payments.sql.unsafe(PAYMENT_WORKER_READ);
    expect(batch.map((r) => r.id)).toEqual(Array.from({ length: 10 }, (_, i) => BigInt(i + 1)));
    expect(batch[0].payload.order_id).toBe("ORD-1");

    const [done] = await payments.sql.unsafe(PAYMENT_WORKER_DONE);
    expect(done.inbox_mark_processed).toBe(true);
    const pending = await payments.sql`SELECT id FROM tide.inbox_pending('payment_triggers')`;
    expect(pending).toHaveLength(44);
    expect(pending.map((r) => r.id)).not.toContain(42n);
  });

  it("shipping service: the document's filter as written is not valid SQL", async () => {
    await shipping.sql.unsafe(`SELECT tide.inbox_create('shipping_triggers');`);
    await expectError(shipping.sql.unsafe(SHIPPING_PIPELINE_AS_WRITTEN), "syntax error");
  });

  it("shipping service: the pipeline keeps its transform filter for order.created only", async () => {
    await shipping.sql.unsafe(SHIPPING_PIPELINE);
    expect(await configOf(shipping, "orders-for-shipping")).toMatchObject({
      source_type: "nats",
      inbox: "shipping_triggers",
      config: { consumer_group: "shipping-service", transform: { filter: "payload.event_type == 'order.created'" } },
    });
  });

  it("each service's database holds only its own part of the bus", async () => {
    const names = async (db: TestDatabase) => {
      const rows = await db.sql`SELECT name FROM tide.relay_pipelines ORDER BY name`;
      return rows.map((r) => r.name);
    };
    expect(await names(orders)).toEqual(["orders-to-nats"]);
    expect(await names(payments)).toEqual(["orders-for-payments"]);
    expect(await names(shipping)).toEqual(["orders-for-shipping"]);
  });
});

describe("Sequin fan-out: every insert reaches each of three services", () => {
  let db: TestDatabase;
  beforeAll(async () => {
    db = await createTestDatabase();
  });
  afterAll(async () => {
    await db.drop();
  });

  const INSERT_USER = `insert into users (name, email) values ('John Doe', 'john.doe@example.com');`;

  it("runs the document's insert, and tide fans the captured row out to three groups", async () => {
    // The table the document inserts into, and tide's equivalent of Sequin's capture: a trigger that
    // publishes the Sequin-shaped change in the inserting transaction.
    await db.sql.unsafe(`
      CREATE TABLE users (id serial PRIMARY KEY, name text NOT NULL, email text NOT NULL);
      SELECT tide.outbox_create('users');
      SELECT tide.create_consumer_group(g, 'users') FROM unnest(ARRAY['inventory_consumer', 'shipping_consumer', 'invoicing_consumer']) g;
      CREATE FUNCTION capture_users() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN
        PERFORM tide.outbox_publish('users', TG_TABLE_NAME, jsonb_build_object(
          'record', to_jsonb(NEW), 'changes', NULL, 'action', lower(TG_OP),
          'metadata', jsonb_build_object('table_schema', TG_TABLE_SCHEMA, 'table_name', TG_TABLE_NAME)));
        RETURN NEW;
      END $$;
      CREATE TRIGGER users_capture AFTER INSERT ON users FOR EACH ROW EXECUTE FUNCTION capture_users();`);

    await db.sql.unsafe(INSERT_USER);
    const [user] = await db.sql`SELECT id, name, email FROM users`;
    expect(user).toEqual({ id: 1, name: "John Doe", email: "john.doe@example.com" });

    for (const group of ["inventory_consumer", "shipping_consumer", "invoicing_consumer"]) {
      const batch = await db.sql`SELECT payload FROM tide.consumer_next_batch('users', ${group}, 10)`;
      expect(batch.map((m) => m.payload)).toEqual([{
        record: { id: 1, name: "John Doe", email: "john.doe@example.com" },
        changes: null,
        action: "insert",
        metadata: { table_schema: "public", table_name: "users" },
      }]);
    }
  });
});
