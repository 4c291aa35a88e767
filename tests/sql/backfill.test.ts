// Backfill publishes every existing row as a "read" event, a chunk per transaction; killed in the
// middle (kill -9 of the client), it resumes after the last committed chunk: every row exactly once.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { waitFor } from "../support/relay.ts";

let db: TestDatabase;
beforeAll(async () => {
  db = await createTestDatabase();
  await db.sql`CREATE TABLE customers (id bigint PRIMARY KEY, name text NOT NULL)`;
  await db.sql`INSERT INTO customers SELECT g, 'customer ' || g FROM generate_series(1, 100000) g`;
  await db.sql`SELECT tide.outbox_create('customers_cdc')`;
});
afterAll(() => db.drop());

async function progress() {
  const [row] = await db.sql`SELECT rows_done, finished_at FROM tide.capture_backfills`;
  const [{ n }] = await db.sql`SELECT count(*)::int AS n FROM tide.outbox_messages WHERE outbox = 'customers_cdc'`;
  return { rowsDone: Number(row?.rows_done ?? 0), finished: row?.finished_at != null, published: n };
}

describe("capture_backfill", () => {
  it("resumes after the client is killed, publishing each of 100,000 rows exactly once", async () => {
    // psql as a separate client; the server drops the session soon after the client dies.
    const client = Bun.spawn(["psql", db.url, "-v", "ON_ERROR_STOP=1", "-c",
      "CALL tide.capture_backfill('customers', 'customers_cdc', 500)"], {
      env: { ...process.env, PGOPTIONS: "-c client_connection_check_interval=50" },
      stdout: "ignore",
      stderr: "pipe",
    });
    await waitFor("a few chunks", async () => (await progress()).rowsDone >= 5000, 60_000);
    client.kill("SIGKILL");
    await client.exited;
    await waitFor("the killed session to end", async () =>
      (await db.sql`SELECT count(*)::int AS n FROM pg_stat_activity WHERE query LIKE 'CALL tide.capture_backfill%'`)[0].n === 0);

    const killed = await progress();
    expect(killed.finished).toBe(false);
    expect(killed.rowsDone).toBeLessThan(100000);
    expect(killed.published).toBe(killed.rowsDone); // progress and messages commit together

    await db.sql`CALL tide.capture_backfill('customers', 'customers_cdc', 5000)`;
    const done = await progress();
    expect(done).toEqual({ rowsDone: 100000, finished: true, published: 100000 });
    const [{ keys, reads }] = await db.sql`
      SELECT count(DISTINCT headers -> 'key')::int AS keys,
             count(*) FILTER (WHERE payload ->> 'action' = 'read')::int AS reads
        FROM tide.outbox_messages WHERE outbox = 'customers_cdc'`;
    expect([keys, reads]).toEqual([100000, 100000]);
  }, 120_000);

  it("does nothing when already finished, and starts over with p_restart", async () => {
    await db.sql`CALL tide.capture_backfill('customers', 'customers_cdc')`;
    expect((await progress()).published).toBe(100000);
    await db.sql`DELETE FROM customers WHERE id > 10`;
    await db.sql`CALL tide.capture_backfill('customers', 'customers_cdc', p_restart => true)`;
    expect((await progress()).published).toBe(100010);
  });
});
