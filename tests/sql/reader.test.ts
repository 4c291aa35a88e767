// The schema's side of gap-free delivery: positions are snapshots, so a message whose transaction
// commits late is delivered, and an open transaction holds back only its own messages.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";

let db: TestDatabase;
beforeAll(async () => {
  db = await createTestDatabase();
});
afterAll(async () => {
  await db.drop();
});

/** Reads and acknowledges batches until the group has nothing more to deliver. */
async function drain(outbox: string, group: string, limit = 100): Promise<bigint[]> {
  const delivered: bigint[] = [];
  for (;;) {
    const batch = await db.sql<{ id: bigint }[]>`SELECT id FROM tide.consumer_next_batch(${outbox}, ${group}, ${limit})`;
    if (batch.length === 0) return delivered;
    delivered.push(...batch.map((row) => row.id));
    await db.sql`SELECT tide.consumer_commit(${outbox}, ${group}, ${batch[batch.length - 1].id}, ${batch.length})`;
  }
}

describe("snapshot reader", () => {
  it("delivers a lower id that commits after a higher one", async () => {
    await db.sql`SELECT tide.outbox_create('late')`;
    await db.sql`SELECT tide.create_consumer_group('g', 'late')`;
    const early = await db.sql.reserve();
    const late = await db.sql.reserve();
    try {
      await early`BEGIN`;
      const [{ id: lowId }] = await early<{ id: bigint }[]>`SELECT tide.outbox_publish('late', '{"n": 1}'::jsonb) AS id`;
      await late`BEGIN`;
      const [{ id: highId }] = await late<{ id: bigint }[]>`SELECT tide.outbox_publish('late', '{"n": 2}'::jsonb) AS id`;
      await late`COMMIT`;
      expect(highId).toBeGreaterThan(lowId);

      // The relay reads while the lower id is still in flight: only the committed one is there.
      expect(await drain("late", "g")).toEqual([highId]);
      const [lag] = await db.sql`SELECT lag FROM tide.consumer_lag WHERE group_name = 'g'`;
      expect(lag.lag).toBe(0n);

      await early`COMMIT`;
      const [pending] = await db.sql`SELECT count(*)::int AS n FROM tide.outbox_pending WHERE outbox_name = 'late'`;
      expect(pending.n).toBe(1);
      const [lagAfter] = await db.sql`SELECT lag FROM tide.consumer_lag WHERE group_name = 'g'`;
      expect(lagAfter.lag).toBe(1n);
      expect(await drain("late", "g")).toEqual([lowId]);
      const [lagDone] = await db.sql`SELECT lag FROM tide.consumer_lag WHERE group_name = 'g'`;
      expect(lagDone.lag).toBe(0n);
    } finally {
      early.release();
      late.release();
    }
  });

  it("lets an idle-in-transaction publisher hold back only its own message", async () => {
    await db.sql`SELECT tide.outbox_create('idle')`;
    await db.sql`SELECT tide.create_consumer_group('g', 'idle')`;
    const idle = await db.sql.reserve();
    try {
      await idle`BEGIN`;
      const [{ id: idleId }] = await idle<{ id: bigint }[]>`SELECT tide.outbox_publish('idle', '{"idle": true}'::jsonb) AS id`;
      const committed: bigint[] = [];
      for (let i = 0; i < 5; i++) {
        const [{ id }] = await db.sql<{ id: bigint }[]>`SELECT tide.outbox_publish('idle', ${db.sql.json({ i })}) AS id`;
        committed.push(id);
      }
      expect(await drain("idle", "g", 2)).toEqual(committed);
      await idle`COMMIT`;
      expect(await drain("idle", "g", 2)).toEqual([idleId]);
    } finally {
      idle.release();
    }
  });

  it("never returns a message twice once acknowledged, and again if not acknowledged", async () => {
    await db.sql`SELECT tide.outbox_create('ack')`;
    await db.sql`SELECT tide.create_consumer_group('g', 'ack')`;
    for (let i = 0; i < 5; i++) await db.sql`SELECT tide.outbox_publish('ack', ${db.sql.json({ i })})`;
    const first = await db.sql<{ id: bigint }[]>`SELECT id FROM tide.consumer_next_batch('ack', 'g', 3)`;
    const again = await db.sql<{ id: bigint }[]>`SELECT id FROM tide.consumer_next_batch('ack', 'g', 3)`;
    expect(again.map((r) => r.id)).toEqual(first.map((r) => r.id));
    await db.sql`SELECT tide.consumer_commit('ack', 'g', ${first[2].id}, 3)`;
    const rest = await drain("ack", "g", 3);
    expect(rest.length).toBe(2);
    expect(rest[0]).toBeGreaterThan(first[2].id);
  });

  it("keeps independent positions per consumer group and per relay group", async () => {
    await db.sql`SELECT tide.outbox_create('fan')`;
    await db.sql`SELECT tide.create_consumer_group('a', 'fan')`;
    await db.sql`SELECT tide.create_consumer_group('b', 'fan')`;
    for (let i = 0; i < 4; i++) await db.sql`SELECT tide.outbox_publish('fan', ${db.sql.json({ i })})`;
    expect((await drain("fan", "a")).length).toBe(4);
    const lag = await db.sql`SELECT group_name, lag FROM tide.consumer_lag WHERE outbox_name = 'fan' ORDER BY 1`;
    expect(lag.map((r) => [r.group_name, r.lag])).toEqual([["a", 0n], ["b", 4n]]);
    const blue = await db.sql`SELECT id FROM tide.consumer_next_batch('fan', 'a', 100, 'blue')`;
    expect(blue.length).toBe(4);
  });

  it("starts a 'latest' group after what was already committed", async () => {
    await db.sql`SELECT tide.outbox_create('latest')`;
    await db.sql`SELECT tide.outbox_publish('latest', '{"old": true}'::jsonb)`;
    await db.sql`SELECT tide.create_consumer_group('g', 'latest', p_auto_offset_reset := 'latest')`;
    const [{ id }] = await db.sql<{ id: bigint }[]>`SELECT tide.outbox_publish('latest', '{"new": true}'::jsonb) AS id`;
    expect(await drain("latest", "g")).toEqual([id]);
  });
});
