// seeds/tutorial-event-bus.txt with three services, each with its own database and its own relay,
// and NATS JetStream in between: the order service publishes order.created and order.cancelled;
// the payment service's inbox receives both, the shipping service's inbox only order.created (its
// pipeline filters). The tutorial's SQL runs as written, with this run's NATS address and subject
// prefix (`events.<run>` for `events.orders`) so that reruns never see old messages.

import { afterAll, beforeAll, describe, expect, it, setDefaultTimeout } from "bun:test";
import type { Relay } from "../../core/relay.ts";
import { NATS_URL, NatsTestClient, unique } from "../support/brokers.ts";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { startRelay, waitFor } from "../support/relay.ts";
import { runBlock } from "../support/seeds.ts";
import { requireService } from "../support/services.ts";

const up = await requireService("nats", "127.0.0.1", 4222);

// Brokers, relays and consumer-group joins take seconds; bun's default per-test timeout is 5 s.
setDefaultTimeout(60_000);

const RUN = unique();
const PREFIX = `events.${RUN}`;
const STREAM = `TIDE_EVENT_BUS_${RUN}`;

function local(sql: string): string {
  return sql.replaceAll("nats://nats:4222", NATS_URL).replaceAll("events.orders.", `${PREFIX}.`);
}

// ---- Order service ---------------------------------------------------------------------------

const ORDER_SETUP = `SELECT tide.outbox_create('order_events');
CREATE TABLE orders (id text PRIMARY KEY, customer_id text NOT NULL, total numeric(10,2) NOT NULL, status text NOT NULL);`;

const ORDER_CREATED = `BEGIN;
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

/** The tutorial names order.cancelled without showing it; published the same way. */
const ORDER_CANCELLED = `BEGIN;
UPDATE orders SET status = 'cancelled' WHERE id = 'ORD-001';
SELECT tide.outbox_publish('order_events', 'orders', jsonb_build_object(
'event_type', 'order.cancelled',
'order_id', 'ORD-001',
'reason', 'customer request'
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

// ---- Payment service -------------------------------------------------------------------------

const PAYMENT_SETUP = `SELECT tide.inbox_create('payment_triggers');`;

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

const PAYMENT_PENDING = `SELECT id, payload
FROM tide.inbox_pending('payment_triggers')
LIMIT 10;`;

// ---- Shipping service ------------------------------------------------------------------------

const SHIPPING_SETUP = `SELECT tide.inbox_create('shipping_triggers');`;

const SHIPPING_PIPELINE = `SELECT tide.relay_set_inbox(
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

/** The shell quoting of the tutorial ('"'"') is for a shell; in SQL the filter's quotes are doubled. */
function unshell(sql: string): string {
  return sql.replace(`'"'"'order.created'"'"'`, "''order.created''");
}

let orderDb: TestDatabase;
let paymentDb: TestDatabase;
let shippingDb: TestDatabase;
const relays: Relay[] = [];
let nats: NatsTestClient;

describe.skipIf(!up)("tutorial: microservice event bus over NATS", () => {
  beforeAll(async () => {
    [orderDb, paymentDb, shippingDb] = await Promise.all([createTestDatabase(), createTestDatabase(), createTestDatabase()]);
    nats = await NatsTestClient.connect();
    // Durable consumers need a stream; the tutorial assumes one stores events.orders.>.
    await nats.createStream(STREAM, [`${PREFIX}.>`]);
  });
  afterAll(async () => {
    await Promise.all(relays.map((relay) => relay.stop()));
    await nats?.close();
    await Promise.all([orderDb, paymentDb, shippingDb].map((db) => db?.drop()));
  });

  it("steps 1–4: each service configures its side, and runs a relay of its own", async () => {
    await runBlock(orderDb.sql, ORDER_SETUP);
    await runBlock(orderDb.sql, local(ORDER_PIPELINE));
    await runBlock(paymentDb.sql, PAYMENT_SETUP);
    await runBlock(paymentDb.sql, local(PAYMENT_PIPELINE));
    await runBlock(shippingDb.sql, SHIPPING_SETUP);
    await runBlock(shippingDb.sql, unshell(local(SHIPPING_PIPELINE)));
    const [{ relay_get_config: shipping }] = await shippingDb.sql`SELECT tide.relay_get_config('orders-for-shipping')`;
    expect(shipping.config.transform).toEqual({ filter: "payload.event_type == 'order.created'" });

    for (const db of [orderDb, paymentDb, shippingDb]) relays.push(await startRelay(db.url));
    // The inbox pipelines have created their durable consumers on the stream.
    await waitFor("both durable consumers", async () => {
      const names: string[] = [];
      for await (const info of nats.jsm.consumers.list(STREAM)) names.push(info.name);
      return names.sort().join(",") === "payment-service,shipping-service";
    });
  });

  it("order.created reaches payment and shipping; order.cancelled reaches payment only", async () => {
    await runBlock(orderDb.sql, ORDER_CREATED);
    await runBlock(orderDb.sql, ORDER_CANCELLED);

    // The order service's relay published both through JetStream, on events.<run>.publish ({op}).
    await waitFor("the order outbox to be delivered", async () => {
      const [row] = await orderDb.sql`SELECT lag FROM tide.consumer_lag WHERE group_name = 'orders-to-nats'`;
      return row?.lag === 0n;
    });
    const stored = await nats.jsm.streams.getMessage(STREAM, { seq: 1 });
    expect(stored!.subject).toBe(`${PREFIX}.publish`);
    expect(stored!.header.get("Nats-Msg-Id")).toBe("order_events:1");

    const payments = await waitFor("both events in payment_triggers", async () => {
      const rows = await paymentDb.sql`SELECT event_id, source, payload FROM tide."payment_triggers_inbox" ORDER BY id`;
      return rows.length === 2 && rows;
    });
    expect(payments.map((r) => [r.event_id, r.source, r.payload.event_type])).toEqual([
      ["order_events:1", `nats:${PREFIX}.publish`, "order.created"],
      ["order_events:2", `nats:${PREFIX}.publish`, "order.cancelled"],
    ]);
    expect(payments[0]!.payload).toEqual({
      event_type: "order.created", order_id: "ORD-001", customer_id: "CUST-42", total: 149.99,
      items: [{ sku: "WIDGET-A", qty: 2 }, { sku: "GADGET-B", qty: 1 }],
    });

    // Shipping has seen (and acknowledged) both stream messages, but kept only order.created.
    await waitFor("the shipping consumer to acknowledge both messages", async () => {
      const info = await nats.jsm.consumers.info(STREAM, "shipping-service");
      return info.delivered.stream_seq === 2 && info.num_ack_pending === 0 && info.num_pending === 0;
    });
    const shipping = await shippingDb.sql`SELECT event_id, payload->>'event_type' AS event_type FROM tide."shipping_triggers_inbox"`;
    expect([...shipping]).toEqual([{ event_id: "order_events:1", event_type: "order.created" }]);
  });

  it("the payment service works through inbox_pending and inbox_mark_processed by id", async () => {
    const pending = await paymentDb.sql.unsafe(PAYMENT_PENDING);
    expect(pending.map((r) => r.payload.event_type)).toEqual(["order.created", "order.cancelled"]);

    // The tutorial's `inbox_mark_processed('payment_triggers', 42)`, with this row's id.
    const [{ inbox_mark_processed: done }] = await paymentDb.sql`SELECT tide.inbox_mark_processed('payment_triggers', ${pending[0]!.id}::bigint)`;
    expect(done).toBe(true);
    const [{ inbox_mark_processed: again }] = await paymentDb.sql`SELECT tide.inbox_mark_processed('payment_triggers', ${pending[0]!.id}::bigint)`;
    expect(again).toBe(false);
    const left = await paymentDb.sql.unsafe(PAYMENT_PENDING);
    expect(left.map((r) => r.payload.event_type)).toEqual(["order.cancelled"]);
    const shipping = await shippingDb.sql`SELECT event_id FROM tide.inbox_pending('shipping_triggers')`;
    expect(shipping.map((r) => r.event_id)).toEqual(["order_events:1"]);
  });

  it("a payment service that was down gets what was published meanwhile from its durable consumer", async () => {
    const payment = relays[1]!;
    await payment.stop();
    await runBlock(orderDb.sql, ORDER_CREATED.replaceAll("ORD-001", "ORD-002"));
    await waitFor("the shipping service to receive ORD-002", async () =>
      (await shippingDb.sql`SELECT 1 FROM tide."shipping_triggers_inbox" WHERE payload->>'order_id' = 'ORD-002'`).length === 1);
    const [{ n: whileDown }] = await paymentDb.sql`SELECT count(*)::int AS n FROM tide."payment_triggers_inbox"`;
    expect(whileDown).toBe(2);

    relays[1] = await startRelay(paymentDb.url);
    const rows = await waitFor("ORD-002 in payment_triggers", async () => {
      const rows = await paymentDb.sql`SELECT event_id, payload->>'order_id' AS order_id FROM tide."payment_triggers_inbox" ORDER BY id`;
      return rows.length === 3 && rows;
    });
    expect(rows.map((r) => [r.event_id, r.order_id])).toEqual([
      ["order_events:1", "ORD-001"], ["order_events:2", "ORD-001"], ["order_events:3", "ORD-002"],
    ]);
  });
});
