// pg-tide/client's publish(): the message commits with the caller's transaction or not at all, on
// postgres.js and node-postgres, its JSON arrives as given, and bad arguments are named.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import postgres from "postgres";
import { publish, rawJson } from "../../client/index.js";
import { createTestDatabase, loginRole, type TestDatabase } from "../support/postgres.ts";
import { expectError } from "../support/seeds.ts";

let db: TestDatabase;
let app: postgres.Sql;
beforeAll(async () => {
  db = await createTestDatabase();
  await db.sql`SELECT tide.outbox_create('orders')`;
  await db.sql`CREATE TABLE orders_table (id int PRIMARY KEY)`;
  await db.sql`GRANT INSERT ON orders_table TO tide_publisher`;
  // The application logs in as a role that holds only tide_publisher.
  const role = await loginRole(db, "tide_publisher", "publish_app");
  app = postgres(role.url, { max: 2, onnotice: () => {} });
});
afterAll(async () => {
  await app.end();
  await db.drop();
});

async function messages() {
  return await db.sql`SELECT id, topic, payload::text AS payload, headers FROM tide.outbox_messages ORDER BY id`;
}

describe("publish()", () => {
  it("commits the message with the caller's own writes, and rolls it back with them", async () => {
    const before = (await messages()).length;
    const id = await app.begin(async (tx) => {
      await tx`INSERT INTO orders_table VALUES (1)`;
      return await publish(tx, "orders", { order_id: 1 }, { event_type: "order.created" });
    });
    await expectError(app.begin(async (tx) => {
      await tx`INSERT INTO orders_table VALUES (2)`;
      await publish(tx, "orders", { order_id: 2 });
      throw new Error("the order was refused");
    }), "the order was refused");
    const rows = await messages();
    expect(rows).toHaveLength(before + 1);
    expect(rows.at(-1)).toEqual({ id: BigInt(id), topic: null, payload: '{"order_id": 1}', headers: { event_type: "order.created" } });
  });

  it("publishes JSON text as it is with rawJson, and a topic", async () => {
    const id = await publish(app, "orders", rawJson('{"amount": 12345678901234567890.10}'), null, { topic: "orders.paid" });
    const [row] = await db.sql`SELECT topic, payload::text AS payload, headers FROM tide.outbox_messages WHERE id = ${id}::bigint`;
    expect(row).toEqual({ topic: "orders.paid", payload: '{"amount": 12345678901234567890.10}', headers: {} });
  });

  it("publishes a string payload as a JSON string", async () => {
    const id = await publish(app, "orders", '{"looks": "like json"}');
    const [row] = await db.sql`SELECT payload::text AS payload FROM tide.outbox_messages WHERE id = ${id}::bigint`;
    expect(row.payload).toBe(JSON.stringify('{"looks": "like json"}'));
  });

  it("runs on a node-postgres client inside BEGIN ... COMMIT", async () => {
    let pg: any;
    try {
      pg = (await import("pg" as string)).default;
    } catch {
      console.warn("skipped: node-postgres (pg) is not installed");
      return;
    }
    const client = new pg.Client({ connectionString: db.url });
    await client.connect();
    try {
      await client.query("BEGIN");
      const kept = await publish(client, "orders", { via: "pg" }, { event_type: "kept" });
      await client.query("COMMIT");
      await client.query("BEGIN");
      await publish(client, "orders", { via: "pg" }, { event_type: "rolled back" });
      await client.query("ROLLBACK");
      const rows = await db.sql`SELECT id, headers->>'event_type' AS type FROM tide.outbox_messages WHERE payload->>'via' = 'pg'`;
      expect([...rows]).toEqual([{ id: BigInt(kept), type: "kept" }]);
    } finally {
      await client.end();
    }
  });

  it("names what is wrong with its arguments, and what the database refused", async () => {
    await expectError(publish(app, "", {}), "publish: outbox must be the name of an outbox");
    await expectError(publish(app, "orders", undefined), "publish: payload must be a JSON value (got undefined)");
    await expectError(publish(app, "orders", { amount: 10n }), "publish: payload cannot be serialized as JSON", "rawJson");
    await expectError(publish(app, "orders", {}, ["a"] as never), "publish: headers must be an object");
    await expectError(publish({} as never, "orders", {}), "publish: tx must be a postgres.js sql or transaction");
    await expectError(publish(app, "no_such_outbox", {}), 'outbox "no_such_outbox" does not exist');
    await expectError(publish(app, "orders", rawJson("{not json")), "invalid input syntax for type json");
  });
});
