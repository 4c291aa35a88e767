// Database-wide chores of the relays: the retention sweep runs on one relay at a time, and consumer
// groups that nothing reads any more (a deleted pipeline's group), which keep their messages from the
// sweep for ever, are shown where operators look.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { connect } from "../../core/db.ts";
import { createTestDatabase, loginRole, type TestDatabase } from "../support/postgres.ts";
import { captureLogger, startRelay, waitFor } from "../support/relay.ts";
import type { Relay } from "../../core/relay.ts";

const ROOT = `${import.meta.dir}/../..`;

let db: TestDatabase;
beforeAll(async () => {
  db = await createTestDatabase();
});
afterAll(async () => {
  await db.drop();
});

/** Backends of the test database whose retention sweep is waiting for a lock. */
async function sweepsWaiting(): Promise<number> {
  const [{ n }] = await db.sql`
    SELECT count(*)::int AS n FROM pg_stat_activity
     WHERE datname = ${db.name} AND wait_event_type = 'Lock' AND query LIKE '%retention_sweep%'`;
  return n;
}

const messages = (lines: string[], message: string) => lines.filter((line) => JSON.parse(line).message === message);

describe("retention sweep", () => {
  it("two relays never sweep side by side: while one sweeps, the other leaves the work to it", async () => {
    await db.sql`SELECT tide.outbox_create('expiring', p_retention_hours := 1)`;
    await db.sql`SELECT tide.outbox_publish('expiring', jsonb_build_object('n', n)) FROM generate_series(1, 10) n`;
    await db.sql`UPDATE tide.outbox_messages SET created_at = now() - interval '2 hours' WHERE outbox = 'expiring'`;
    // Holds off every DELETE on the outbox: the first sweep to start waits inside, still sweeping.
    const blocker = await db.sql.reserve();
    await blocker`BEGIN`;
    await blocker`LOCK TABLE tide.outbox_messages IN SHARE MODE`;
    const logs = [captureLogger(), captureLogger()];
    const relays: Relay[] = [];
    try {
      for (const { logger } of logs) relays.push(await startRelay(db.url, { logger, retentionIntervalMs: 100 }));
      await waitFor("a sweep waiting inside", async () => (await sweepsWaiting()) > 0);
      const skipped = () => logs.flatMap(({ lines }) => messages(lines, "retention sweep skipped: another relay is sweeping"));
      await waitFor("the other relay's sweep to come round and leave it alone", () => skipped().length >= 2);
      expect(await sweepsWaiting()).toBe(1);
      await blocker`ROLLBACK`;
      await waitFor("the expired messages to be swept", async () =>
        (await db.sql`SELECT 1 FROM tide.outbox_messages WHERE outbox = 'expiring'`).length === 0);
      const sweeps = logs.flatMap(({ lines }) => messages(lines, "retention sweep")).map((line) => JSON.parse(line));
      expect(sweeps.map((entry) => entry.outbox)).toEqual([10]); // one sweep deleted them all
    } finally {
      await blocker`ROLLBACK`.catch(() => {});
      blocker.release();
      for (const relay of relays) await relay.stop();
    }
  });
});

describe("consumer groups no pipeline reads", () => {
  it("a deleted pipeline's group shows with its waiting messages in tide.unread_consumer_groups, pg-tide status and the status page", async () => {
    await db.sql`SELECT tide.outbox_create('shipments')`;
    await db.sql`SELECT tide.relay_set_outbox('old-export', 'shipments', 'stdout', '{}'::jsonb, p_enabled := false)`;
    await db.sql`SELECT tide.relay_set_outbox('new-export', 'shipments', 'stdout', '{}'::jsonb, p_enabled := false)`;
    await db.sql`SELECT tide.outbox_publish('shipments', jsonb_build_object('n', n)) FROM generate_series(1, 3) n`;
    expect(await db.sql`SELECT * FROM tide.unread_consumer_groups`).toHaveLength(0);

    await db.sql`SELECT tide.relay_delete('old-export')`; // its consumer group stays
    // A dashboard's role reads the view as well.
    const reader = connect((await loginRole(db, "tide_reader", "unread_reader")).url, { max: 1 });
    try {
      const [row] = await reader`SELECT outbox_name, group_name, relay_group_id, lag FROM tide.unread_consumer_groups`;
      expect(row).toEqual({ outbox_name: "shipments", group_name: "old-export", relay_group_id: "default", lag: 3n });
    } finally {
      await reader.end();
    }

    // Through the command an operator runs, logged in with the relay's role.
    const operator = await loginRole(db, "tide_relay", "unread");
    const status = async (...args: string[]) => {
      const child = Bun.spawn([process.execPath, "main.ts", "status", "--postgres-url", operator.url, ...args],
        { cwd: ROOT, stdout: "pipe", stderr: "pipe" });
      const [out, err, code] = await Promise.all([new Response(child.stdout).text(), new Response(child.stderr).text(), child.exited]);
      expect({ code, err }).toEqual({ code: 0, err: "" });
      return out;
    };
    const text = await status();
    expect(text).toContain("consumer groups no pipeline reads");
    expect(text).toMatch(/shipments\s+old-export\s+default\s+3\s/);
    expect(text).toContain("SELECT tide.drop_consumer_group('old-export', 'shipments');");
    const json = JSON.parse(await status("--output", "json"));
    expect(json.unread_consumer_groups).toEqual([
      { outbox: "shipments", group: "old-export", relay_group_id: "default", lag: 3, position_moved_at: expect.any(String) },
    ]);
    expect(json.pipelines.map((p: { name: string; lag: number }) => [p.name, p.lag])).toEqual([["new-export", 3]]);
    const relay = await startRelay(db.url, { metricsAddr: "127.0.0.1:0" });
    try {
      const page = await (await fetch(`http://127.0.0.1:${relay.httpPort}/`)).text();
      expect(page).toContain("Consumer groups no pipeline reads");
      expect(page).toContain("SELECT tide.drop_consumer_group('old-export', 'shipments');");
    } finally {
      await relay.stop();
    }

    await db.sql`SELECT tide.drop_consumer_group('old-export', 'shipments')`;
    expect(await db.sql`SELECT * FROM tide.unread_consumer_groups`).toHaveLength(0);
    expect(await status()).not.toContain("consumer groups no pipeline reads");
  });
});
