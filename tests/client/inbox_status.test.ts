// What an operator sees of the inboxes that applications work: per inbox, pending, claimed, failed
// and dead-lettered counts, in the tide.inbox_stats view, the relay's Prometheus metrics and its
// status page.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { startRelay } from "../support/relay.ts";

let db: TestDatabase;
beforeAll(async () => {
  db = await createTestDatabase();
  // "refunds": 4 messages; one processed, one held by a claim, one failed once, one dead letter.
  await db.sql`SELECT tide.inbox_create('refunds', p_max_retries := 1)`;
  await db.sql`SELECT tide.inbox_create('empty_inbox')`;
  const messages = [1, 2, 3, 4].map((n) => ({ event_id: `r-${n}`, payload: { n } }));
  await db.sql`SELECT * FROM tide.inbox_insert_batch('refunds', ${db.sql.json(messages)})`;
  await db.sql`SELECT tide.inbox_mark_processed('refunds', 'r-1')`;
  await db.sql`SELECT tide.inbox_mark_failed('refunds', 'r-2', 'gone for good')`; // max_retries 1: dead letter
  await db.sql`UPDATE tide.inboxes SET max_retries = 3 WHERE name = 'refunds'`;
  await db.sql`SELECT tide.inbox_mark_failed('refunds', 'r-3', 'try later')`;
  await db.sql`SELECT * FROM tide.inbox_claim('refunds', 1, '1 hour')`; // r-3 (failed once, claimable again)
});
afterAll(() => db.drop());

describe("inbox counts", () => {
  it("tide.inbox_stats counts pending (claimed and failed among them) and dead letters per inbox", async () => {
    const rows = await db.sql`SELECT inbox, pending, claimed, failed, dead_lettered, oldest_pending_at IS NOT NULL AS waiting
                                FROM tide.inbox_stats ORDER BY inbox`;
    expect([...rows]).toEqual([
      { inbox: "empty_inbox", pending: 0n, claimed: 0n, failed: 0n, dead_lettered: 0n, waiting: false },
      { inbox: "refunds", pending: 2n, claimed: 1n, failed: 1n, dead_lettered: 1n, waiting: true },
    ]);
  });

  it("the relay exports them as metrics and shows them on its status page", async () => {
    const relay = await startRelay(db.url, { metricsAddr: "127.0.0.1:0" });
    try {
      const metrics = await (await fetch(`http://127.0.0.1:${relay.httpPort}/metrics`)).text();
      for (const line of [
        'pg_tide_relay_inbox_pending{inbox="refunds"} 2',
        'pg_tide_relay_inbox_claimed{inbox="refunds"} 1',
        'pg_tide_relay_inbox_failed{inbox="refunds"} 1',
        'pg_tide_relay_inbox_dead_lettered{inbox="refunds"} 1',
        'pg_tide_relay_inbox_pending{inbox="empty_inbox"} 0',
      ]) {
        expect(metrics).toContain(`${line}\n`);
      }
      expect(metrics).toMatch(/pg_tide_relay_inbox_oldest_pending_age_seconds\{inbox="refunds"\} \d/);
      expect(metrics).not.toContain('pg_tide_relay_inbox_oldest_pending_age_seconds{inbox="empty_inbox"}');

      const page = await (await fetch(`http://127.0.0.1:${relay.httpPort}/`)).text();
      expect(page).toContain("<h2>Inboxes</h2>");
      const row = page.slice(page.indexOf("<td>refunds</td>"));
      expect(row.slice(0, row.indexOf("</tr>")).match(/class="num">[^<]*/g)).toEqual([
        'class="num">2', 'class="num">1', 'class="num">1', 'class="num">1', expect.stringMatching(/class="num">\d+ s/),
      ]);
    } finally {
      await relay.stop();
    }
  });
});
