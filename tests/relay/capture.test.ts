// Table capture and Sequin-style fan-out: every change to a table reaches several HTTP services,
// each on its own consumer group, retried until 2xx, in order, without slowing the others.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import type { Relay } from "../../core/relay.ts";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { startRelay, waitFor } from "../support/relay.ts";

let db: TestDatabase;
beforeAll(async () => {
  db = await createTestDatabase();
  await db.sql`CREATE TABLE orders (id serial PRIMARY KEY, customer_id int NOT NULL, total numeric(10,2), status text)`;
  await db.sql`SELECT tide.outbox_create('order_changes')`;
  await db.sql`SELECT tide.capture_table('orders', 'order_changes')`;
});
afterAll(() => db.drop());

/**
 * An HTTP service that records what it receives; `failing` makes it answer 500, and `hold` keeps
 * its answer back (the request is already recorded) until the promise settles.
 */
function service() {
  const state = { failing: false, attempts: 0, received: [] as any[], hold: undefined as Promise<void> | undefined };
  const server = Bun.serve({
    port: 0,
    async fetch(request) {
      state.attempts += 1;
      if (state.failing) return new Response("busy", { status: 500 });
      state.received.push(await request.json());
      await state.hold;
      return new Response("ok");
    },
  });
  return { state, server, url: `http://127.0.0.1:${server.port}/webhook` };
}

describe("captured changes", () => {
  it("carry op, table, record, changed columns and the primary key", async () => {
    await db.sql`SELECT tide.outbox_create('shapes')`;
    await db.sql`CREATE TABLE items (sku text PRIMARY KEY, qty int, price numeric)`;
    await db.sql`SELECT tide.capture_table('items', 'shapes')`;
    await db.sql`INSERT INTO items VALUES ('A', 1, 9.5)`;
    await db.sql`UPDATE items SET qty = 2 WHERE sku = 'A'`;
    await db.sql`DELETE FROM items WHERE sku = 'A'`;
    const rows = await db.sql`SELECT topic, payload, headers FROM tide.outbox_messages WHERE outbox = 'shapes' ORDER BY id`;
    expect(rows.map((r) => r.topic)).toEqual(["public.items", "public.items", "public.items"]);
    expect(rows[0].payload).toEqual({ action: "insert", record: { sku: "A", qty: 1, price: 9.5 }, changes: null });
    expect(rows[1].payload).toEqual({ action: "update", record: { sku: "A", qty: 2, price: 9.5 }, changes: { qty: 1 } });
    expect(rows[2].payload).toEqual({ action: "delete", record: { sku: "A", qty: 2, price: 9.5 }, changes: null });
    expect(rows[1].headers).toEqual({ op: "update", table_schema: "public", table_name: "items", key: { sku: "A" } });
  });

  it("turns a bulk INSERT ... SELECT of 10,000 rows into 10,000 events in the same transaction", async () => {
    await db.sql`SELECT tide.outbox_create('bulk')`;
    await db.sql`CREATE TABLE bulk_rows (id int PRIMARY KEY, v text)`;
    await db.sql`SELECT tide.capture_table('bulk_rows', 'bulk', ARRAY['insert'])`;
    await db.sql.begin(async (tx) => {
      await tx`INSERT INTO bulk_rows SELECT g, 'v' || g FROM generate_series(1, 10000) g`;
      const [{ n }] = await tx`SELECT count(*)::int AS n FROM tide.outbox_messages WHERE outbox = 'bulk'`;
      expect(n).toBe(10000);
      await tx`UPDATE bulk_rows SET v = 'changed'`; // not captured: only inserts were asked for
    });
    const [{ n, keys }] = await db.sql`
      SELECT count(*)::int AS n, count(DISTINCT headers -> 'key')::int AS keys FROM tide.outbox_messages WHERE outbox = 'bulk'`;
    expect([n, keys]).toEqual([10000, 10000]);
  });

  it("stops when uncaptured, and refuses a table without a primary key", async () => {
    await db.sql`SELECT tide.uncapture_table('bulk_rows', 'bulk')`;
    await db.sql`INSERT INTO bulk_rows VALUES (10001, 'after')`;
    const [{ n }] = await db.sql`SELECT count(*)::int AS n FROM tide.outbox_messages WHERE outbox = 'bulk'`;
    expect(n).toBe(10000);
    await db.sql`CREATE TABLE no_key (v text)`;
    await expect(db.sql`SELECT tide.capture_table('no_key', 'bulk')`).rejects.toThrow("has no primary key");
  });
});

describe("Sequin-style fan-out", () => {
  let relay: Relay;
  const services = { inventory: service(), shipping: service(), invoicing: service() };

  beforeAll(async () => {
    relay = await startRelay(db.url);
    for (const [name, svc] of Object.entries(services)) {
      await db.sql`SELECT tide.relay_set_outbox(${name + "_consumer"}, 'order_changes', 'webhook', ${db.sql.json({
        url: svc.url,
        wire_format: "sequin",
        retry: { initial_backoff_ms: 20, max_backoff_ms: 100 },
      })})`;
    }
  });
  afterAll(async () => {
    await relay.stop();
    for (const svc of Object.values(services)) svc.server.stop(true);
  });

  it("delivers every insert to all three services in the Sequin shape", async () => {
    await db.sql`INSERT INTO orders (customer_id, total, status) VALUES (42, 99.99, 'new')`;
    for (const svc of Object.values(services)) await waitFor("the first order", () => svc.state.received.length === 1);
    const body = services.shipping.state.received[0];
    expect(body.record).toMatchObject({ customer_id: 42, total: 99.99, status: "new" });
    expect(body.changes).toBeNull();
    expect(body.action).toBe("insert");
    expect(body.metadata.table_schema).toBe("public");
    expect(body.metadata.table_name).toBe("orders");
    expect(Date.parse(body.metadata.commit_timestamp)).not.toBeNaN();
    expect(body.metadata.consumer.name).toBe("shipping_consumer");
    expect(body.metadata.consumer.id).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    expect(services.inventory.state.received[0].metadata.consumer.name).toBe("inventory_consumer");
  });

  it("keeps retrying a failing service until it answers 2xx, in order, while the others go on", async () => {
    const invoicing = services.invoicing.state;
    invoicing.failing = true;
    const before = invoicing.attempts;
    for (let i = 1; i <= 10; i++) await db.sql`INSERT INTO orders (customer_id, total) VALUES (${i}, ${i * 10})`;
    await db.sql`UPDATE orders SET status = 'paid' WHERE customer_id = 1`;

    for (const svc of [services.inventory, services.shipping]) {
      await waitFor("the healthy services to get all 12 changes", () => svc.state.received.length === 12);
    }
    await waitFor("several failed attempts", () => invoicing.attempts >= before + 3);
    expect(invoicing.received.length).toBe(1);
    const [lag] = await db.sql`SELECT lag FROM tide.consumer_lag WHERE group_name = 'invoicing_consumer'`;
    expect(lag.lag).toBe(11n);

    invoicing.failing = false;
    await waitFor("the invoicing service to catch up", () => invoicing.received.length === 12, 30_000);
    const actions = invoicing.received.map((b) => `${b.action}:${b.record.customer_id}`);
    expect(actions).toEqual(services.shipping.state.received.map((b) => `${b.action}:${b.record.customer_id}`));
    expect(invoicing.received[11].changes).toEqual({ status: null });
  }, 60_000);

  it("filters per consumer with CEL over record, changes and action", async () => {
    const big = service();
    try {
      await db.sql`SELECT tide.relay_set_outbox('big_orders', 'order_changes', 'webhook', ${db.sql.json({
        url: big.url,
        wire_format: "sequin",
        auto_offset_reset: "latest",
        transform: { filter: "action == 'insert' && double(record.total) >= 500.0" },
      })})`;
      await waitFor("the new pipeline to run", () => relay.coordinator.owned().some((p) => p.name === "big_orders"));
      await db.sql`INSERT INTO orders (customer_id, total) VALUES (7, 50), (8, 750), (9, 5000)`;
      await db.sql`UPDATE orders SET total = 900 WHERE customer_id = 7`;
      await waitFor("the position to pass all four changes", async () =>
        (await db.sql`SELECT lag FROM tide.consumer_lag WHERE group_name = 'big_orders'`)[0].lag === 0n);
      expect(big.state.received.map((b) => b.record.customer_id)).toEqual([8, 9]);
    } finally {
      big.server.stop(true);
    }
  });

  it("replays from a point in time after a rewind, also when the rewind lands mid-batch", async () => {
    const shipping = services.shipping.state;
    const [{ t }] = await db.sql`SELECT now() AS t`;
    let release!: () => void;
    shipping.hold = new Promise<void>((resolve) => (release = resolve));
    try {
      await db.sql`INSERT INTO orders (customer_id, total) VALUES (77, 1)`;
      // The service has the change but has not answered: the relay's batch is in flight.
      await waitFor("delivery", () => shipping.received.some((b) => b.record.customer_id === 77));
      const [{ n }] = await db.sql`SELECT tide.consumer_group_rewind('shipping_consumer', 'order_changes',
                                      p_to_time := ${t}, p_force := true) AS n`;
      expect(n).toBe(1n);
    } finally {
      shipping.hold = undefined;
      release();
    }
    // The acknowledgement of the in-flight batch arrives after the rewind and must not undo it.
    await waitFor("the replay", () => shipping.received.filter((b) => b.record.customer_id === 77).length === 2);
    const [{ lag }] = await waitFor("the position to settle", async () => {
      const rows = await db.sql`SELECT lag FROM tide.consumer_lag WHERE group_name = 'shipping_consumer'`;
      return rows[0].lag === 0n && rows;
    });
    expect(lag).toBe(0n);
    expect(shipping.received.at(-1).record.customer_id).toBe(77);
  });
});
