// A worker killed with SIGKILL in the middle of its handlers: the messages it held come back once
// their claims run out, another worker processes them (the lost attempt counted), and a late mark
// from the killed worker's claim is refused.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import postgres from "postgres";
import { type InboxMessage, work } from "../../client/index.js";
import { expectError } from "../support/seeds.ts";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { collectLines, waitFor } from "../support/relay.ts";

let db: TestDatabase;
beforeAll(async () => {
  db = await createTestDatabase();
});
afterAll(() => db.drop());

const VISIBILITY_MS = 2_000;

describe("a worker killed mid-handler", () => {
  it("loses its messages to another worker after the visibility timeout; its late mark is refused", async () => {
    await db.sql`SELECT tide.inbox_create('crashing')`;
    const messages = Array.from({ length: 5 }, (_, n) => ({ event_id: `crash-${n}`, payload: { n } }));
    await db.sql`SELECT * FROM tide.inbox_insert_batch('crashing', ${db.sql.json(messages)})`;

    const child = Bun.spawn([process.execPath, `${import.meta.dir}/fixtures/stuck_worker.ts`, db.url, "crashing", String(VISIBILITY_MS)], {
      stdout: "pipe",
      stderr: "inherit",
    });
    const output = collectLines(child.stdout);
    try {
      await waitFor("the worker to start three handlers", () => output.lines.length === 3);
    } finally {
      child.kill("SIGKILL");
      await child.exited;
    }
    const killed: { id: string; claimId: string; claimedUntil: string }[] = output.lines.map((line) => JSON.parse(line))
      .sort((a, b) => Number(a.id) - Number(b.id));
    const held = await db.sql.unsafe<{ id: string; claimId: string }[]>(`SELECT id::text AS id, claim_id::text AS "claimId" FROM tide.crashing_inbox WHERE claim_id IS NOT NULL ORDER BY id`);
    expect(held.map(({ id, claimId }) => ({ id, claimId }))).toEqual(killed.map(({ id, claimId }) => ({ id, claimId })));

    const handled: InboxMessage[] = [];
    const sql = postgres(db.url, { max: 4, onnotice: () => {} });
    const worker = work(sql, "crashing", (message) => void handled.push(message), { concurrency: 2 });
    try {
      await waitFor("every message processed", () => handled.length === 5);
    } finally {
      await worker.stop();
      await sql.end();
    }

    const byId = new Map(handled.map((m) => [m.id, m]));
    expect(byId.size).toBe(5);
    for (const lost of killed) {
      const again = byId.get(lost.id)!;
      expect(again.attempt).toBe(2);
      expect(again.lastError).toContain(`claim ${lost.claimId} ran out`);
      expect(again.claimId).not.toBe(lost.claimId);
      const [{ after }] = await db.sql`
        SELECT processed_at >= ${lost.claimedUntil}::timestamptz AS after FROM tide.crashing_inbox WHERE id = ${lost.id}`;
      expect(after).toBe(true);
      const refused = await expectError(
        db.sql`SELECT tide.inbox_mark_processed('crashing', ${lost.id}::bigint, ${lost.claimId}::bigint)`,
        `claim ${lost.claimId} no longer holds message ${lost.id}`,
      );
      expect(refused.code).toBe("TD001");
    }
    const untouched = handled.filter((m) => !killed.some((k) => k.id === m.id));
    expect(untouched.map((m) => m.attempt)).toEqual([1, 1]);
    const [stats] = await db.sql`SELECT pending, claimed, failed, dead_lettered FROM tide.inbox_stats WHERE inbox = 'crashing'`;
    expect(stats).toEqual({ pending: 0n, claimed: 0n, failed: 0n, dead_lettered: 0n });
  });
});
