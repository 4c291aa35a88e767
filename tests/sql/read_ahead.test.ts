// The SQL the relay uses to keep busy with fewer round trips and writes: consumer_read_ahead (the
// next batch, read before the one in flight is acknowledged, fenced on that acknowledgement),
// consumer_commit_read (an acknowledgement and the next read in one call), consumer_probe (which
// waiting groups have something to read, as a plain read) and p_durable := false (an
// acknowledgement that does not wait for a disk flush, for its own transaction only).

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";

let db: TestDatabase;

beforeAll(async () => {
  db = await createTestDatabase();
});
afterAll(async () => {
  await db.drop();
});

interface Row {
  id: bigint;
  interval_seq: bigint;
  read_cursor: bigint;
  generation: bigint;
}

async function outboxWith(name: string, count: number): Promise<void> {
  await db.sql`SELECT tide.outbox_create(${name})`;
  await db.sql`SELECT tide.create_consumer_group('g', ${name})`;
  await db.sql`INSERT INTO tide.outbox_messages (outbox, payload) SELECT ${name}, jsonb_build_object('n', g) FROM generate_series(1, ${count}) g`;
}

const read = (outbox: string, limit: number) =>
  db.sql<Row[]>`SELECT id, interval_seq, read_cursor, generation FROM tide.consumer_read_batch(${outbox}, 'g', ${limit})`;

const ahead = (outbox: string, limit: number, after: Row) =>
  db.sql<Row[]>`SELECT id, interval_seq, read_cursor, generation
                  FROM tide.consumer_read_ahead(${outbox}, 'g', ${limit}, 'default', ${after.interval_seq}, ${after.generation}, ${after.id})`;

const commit = async (outbox: string, batch: Row[], epoch: bigint, durable = true) => {
  const last = batch[batch.length - 1]!;
  const [{ moved }] = await db.sql`
    SELECT tide.consumer_commit(${outbox}, 'g', ${last.id}, ${batch.length}, 'default', ${last.generation}, ${last.interval_seq},
                                ${last.read_cursor}, ${epoch}, p_durable := ${durable}) AS moved`;
  return moved as boolean;
};

const claim = async (outbox: string) => (await db.sql`SELECT tide.consumer_claim(${outbox}, 'g') AS epoch`)[0]!.epoch as bigint;

describe("consumer_read_ahead", () => {
  it("returns the batch a read after the acknowledgement would return, fenced on that acknowledgement", async () => {
    await outboxWith("ra_same", 7);
    const epoch = await claim("ra_same");
    const first = await read("ra_same", 3);
    const next = await ahead("ra_same", 3, first[2]!);
    expect(next.map((r) => r.id)).toEqual([first[2]!.id + 1n, first[2]!.id + 2n, first[2]!.id + 3n]);
    expect(next.every((r) => r.read_cursor === first[2]!.id && r.interval_seq === first[0]!.interval_seq)).toBe(true);
    // Nothing moved: reading again returns the first batch.
    expect((await read("ra_same", 3)).map((r) => r.id)).toEqual(first.map((r) => r.id));

    expect(await commit("ra_same", first, epoch)).toBe(true);
    expect((await read("ra_same", 3)).map((r) => [r.id, r.read_cursor])).toEqual(next.map((r) => [r.id, r.read_cursor]));
    expect(await commit("ra_same", next, epoch)).toBe(true);
  });

  it("is refused when the batch before it was not acknowledged up to its last id", async () => {
    await outboxWith("ra_refused", 6);
    const epoch = await claim("ra_refused");
    const first = await read("ra_refused", 3);
    const next = await ahead("ra_refused", 3, first[2]!);
    // Only the first two of the batch are acknowledged (a paused pipeline stops before a failure).
    expect(await commit("ra_refused", first.slice(0, 2), epoch)).toBe(true);
    expect(await commit("ra_refused", next, epoch)).toBe(false);
    expect((await read("ra_refused", 10)).map((r) => r.id)).toEqual([first[2]!.id, ...next.map((r) => r.id)]);
  });

  it("returns nothing when the interval ends with the batch, or after a rewind", async () => {
    await outboxWith("ra_end", 3);
    const first = await read("ra_end", 3);
    expect((await ahead("ra_end", 3, first[2]!)).length).toBe(0);
    const part = await ahead("ra_end", 3, first[0]!);
    expect(part.map((r) => r.id)).toEqual([first[1]!.id, first[2]!.id]);
    await db.sql`SELECT tide.consumer_group_rewind('g', 'ra_end', p_to_id := 0)`;
    expect((await ahead("ra_end", 3, first[0]!)).length).toBe(0);
  });

  it("names a NULL argument and a limit below 1", async () => {
    await outboxWith("ra_bad", 1);
    await expect(db.sql`SELECT * FROM tide.consumer_read_ahead('ra_bad', 'g', 0, 'default', 1, 0, 0)`).rejects.toThrow("batch limit must be at least 1");
    await expect(db.sql`SELECT * FROM tide.consumer_read_ahead('ra_bad', 'g', 1, 'default', NULL, 0, 0)`).rejects.toThrow("p_interval_seq must not be NULL");
  });
});

describe("consumer_commit_read", () => {
  const commitRead = (outbox: string, batch: Row[], epoch: bigint, limit: number) => {
    const last = batch[batch.length - 1]!;
    return db.sql<(Row & { moved: boolean })[]>`
      SELECT moved, id, interval_seq, read_cursor, generation
        FROM tide.consumer_commit_read(${outbox}, 'g', ${last.id}, ${batch.length}, 'default', ${last.generation},
                                       ${last.interval_seq}, ${last.read_cursor}, ${epoch}, ${limit})`;
  };

  it("acknowledges and returns the next batch from the new position; at the end, only that it moved", async () => {
    await outboxWith("cr", 5);
    const epoch = await claim("cr");
    const first = await read("cr", 3);
    const next = await commitRead("cr", first, epoch, 3);
    expect(next.map((r) => [r.moved, r.id, r.read_cursor])).toEqual([[true, first[2]!.id + 1n, first[2]!.id], [true, first[2]!.id + 2n, first[2]!.id]]);
    const end = await commitRead("cr", next, epoch, 3);
    expect(end.map((r) => [r.moved, r.id as bigint | null])).toEqual([[true, null]]);
    const [{ lag }] = await db.sql`SELECT lag FROM tide.consumer_lag WHERE outbox_name = 'cr'`;
    expect(lag).toBe(0n);
  });

  it("reads nothing when the acknowledgement is refused", async () => {
    await outboxWith("cr_stale", 4);
    const epoch = await claim("cr_stale");
    const first = await read("cr_stale", 2);
    expect(await commit("cr_stale", first, epoch)).toBe(true);
    const again = await commitRead("cr_stale", first, epoch, 2);
    expect(again.map((r) => [r.moved, r.id as bigint | null])).toEqual([[false, null]]);
  });
});

describe("consumer_probe", () => {
  it("reports the groups with something to read, without writing anything", async () => {
    await outboxWith("probe_busy", 2);
    await outboxWith("probe_quiet", 0);
    const probe = () => db.sql<{ outbox_name: string }[]>`
      SELECT outbox_name FROM tide.consumer_probe('default', ${["probe_busy", "probe_quiet"]}::text[], ${["g", "g"]}::text[])
       ORDER BY 1`;
    // A probe runs as a plain read: its transaction gets no transaction id.
    const reserved = await db.sql.reserve();
    try {
      await reserved`BEGIN`;
      const rows = await reserved`SELECT outbox_name FROM tide.consumer_probe('default', ${["probe_busy", "probe_quiet"]}::text[], ${["g", "g"]}::text[])`;
      expect(rows.map((r) => r.outbox_name)).toEqual(["probe_busy"]);
      const [{ assigned }] = await reserved`SELECT pg_current_xact_id_if_assigned() IS NOT NULL AS assigned`;
      expect(assigned).toBe(false);
      await reserved`COMMIT`;
    } finally {
      reserved.release();
    }
    // Drained: nothing to read; a new message: something again.
    const epoch = await claim("probe_busy");
    expect(await commit("probe_busy", await read("probe_busy", 10), epoch)).toBe(true);
    expect((await probe()).length).toBe(0);
    await db.sql`SELECT tide.outbox_publish('probe_quiet', '{"n": 1}'::jsonb)`;
    expect((await probe()).map((r) => r.outbox_name)).toEqual(["probe_quiet"]);
  });

  it("refuses lists of different lengths", async () => {
    await expect(db.sql`SELECT * FROM tide.consumer_probe('default', ARRAY['a', 'b'], ARRAY['g'])`).rejects.toThrow("same length");
  });
});

describe("p_durable := false", () => {
  it("acknowledges as usual, and leaves the session's later transactions durable", async () => {
    await outboxWith("nd", 4);
    const epoch = await claim("nd");
    const reserved = await db.sql.reserve();
    try {
      const batch = await reserved<Row[]>`SELECT id, interval_seq, read_cursor, generation FROM tide.consumer_read_batch('nd', 'g', 2, p_durable := false)`;
      const last = batch[1]!;
      const [{ moved, during }] = await reserved`
        SELECT tide.consumer_commit('nd', 'g', ${last.id}, 2, 'default', ${last.generation}, ${last.interval_seq}, ${last.read_cursor},
                                    ${epoch}, p_durable := false) AS moved, current_setting('synchronous_commit') AS during`;
      expect([moved, during]).toEqual([true, "off"]);
      const [{ after }] = await reserved`SELECT current_setting('synchronous_commit') AS after`;
      expect(after).toBe("on");
    } finally {
      reserved.release();
    }
    expect((await read("nd", 10)).map((r) => r.id).length).toBe(2);
  });
});
