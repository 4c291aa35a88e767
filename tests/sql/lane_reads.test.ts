// A lane reads only its own messages (sql/015): tide.consumer_lanes_prepare records on each lane's
// consumer group the lane it is read as, and consumer_read_batch / consumer_read_ahead /
// consumer_commit_read return only that lane's messages, through the unchanged acknowledgement. What a
// relay relies on: every message is read by exactly one lane, each lane in id order, a lane's
// position passes the other lanes' messages without losing any of its own, and no reader can read a
// lane under another rule than the one its position was made with.

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
  key: string | null;
  interval_seq: bigint;
  read_cursor: bigint;
  generation: bigint;
}

const filter = (lane: number, lanes: number, key = "headers.key") => JSON.stringify({ lane, lanes, key: key.split(".") });

async function outboxWith(name: string, count: number, keys: number): Promise<void> {
  await db.sql`SELECT tide.outbox_create(${name})`;
  await db.sql`SELECT tide.create_consumer_group('g', ${name})`;
  // Every 7th message has no key (lane 0).
  await db.sql`INSERT INTO tide.outbox_messages (outbox, payload, headers)
               SELECT ${name}, jsonb_build_object('n', g),
                      CASE WHEN g % 7 = 0 THEN '{}'::jsonb ELSE jsonb_build_object('key', 'k' || (g % ${keys})) END
                 FROM generate_series(1, ${count}) g`;
}

const prepare = async (outbox: string, lanes: number, key = "headers.key", relayGroup = "default") =>
  (await db.sql`SELECT tide.consumer_lanes_prepare(${outbox}, 'g', ${lanes}, ${relayGroup}, ${key}) AS db`)[0]!.db as boolean;

const group = (lane: number, lanes: number) => (lane === 0 ? "g" : `g.lane-${lane}-of-${lanes}`);

const read = (outbox: string, lane: number, lanes: number, limit: number) =>
  db.sql<Row[]>`SELECT id, headers->>'key' AS key, interval_seq, read_cursor, generation
                  FROM tide.consumer_read_batch(${outbox}, ${group(lane, lanes)}, ${limit}, 'default', p_durable := false,
                                                p_lane := ${filter(lane, lanes)}::text::jsonb)`;

async function commit(outbox: string, lane: number, lanes: number, batch: Row[], epoch: bigint): Promise<boolean> {
  const last = batch[batch.length - 1]!;
  const [{ moved }] = await db.sql`
    SELECT tide.consumer_commit(${outbox}, ${group(lane, lanes)}, ${last.id}, ${batch.length}, 'default', ${last.generation},
                                ${last.interval_seq}, ${last.read_cursor}, ${epoch}) AS moved`;
  return moved as boolean;
}

const claim = async (outbox: string, lane: number, lanes: number) =>
  (await db.sql`SELECT tide.consumer_claim(${outbox}, ${group(lane, lanes)}) AS epoch`)[0]!.epoch as bigint;

const lag = async (outbox: string, lane: number, lanes: number) =>
  (await db.sql`SELECT tide.consumer_group_lag(${outbox}, ${group(lane, lanes)}) AS lag`)[0]!.lag as bigint;

/** Drains one lane batch by batch (reading, acknowledging); the ids it read, in order. */
async function drain(outbox: string, lane: number, lanes: number, limit: number): Promise<Row[]> {
  const epoch = await claim(outbox, lane, lanes);
  const seen: Row[] = [];
  for (;;) {
    const batch = await read(outbox, lane, lanes, limit);
    if (batch.length === 0) return seen;
    seen.push(...batch);
    expect(await commit(outbox, lane, lanes, batch, epoch)).toBe(true);
  }
}

describe("lanes read in the database", () => {
  it("split the outbox: each message read by exactly one lane, each lane in id order, every key in one lane", async () => {
    await outboxWith("lr_split", 700, 40);
    expect(await prepare("lr_split", 4)).toBe(true);
    const lanes = await Promise.all([0, 1, 2, 3].map((lane) => drain("lr_split", lane, 4, 50)));
    const ids = lanes.flat().map((r) => r.id).sort((a, b) => (a < b ? -1 : 1));
    const [{ all }] = await db.sql`SELECT array_agg(id ORDER BY id) AS all FROM tide.outbox_messages WHERE outbox = 'lr_split'`;
    expect(all.length).toBe(700);
    expect(ids).toEqual(all);
    for (const lane of lanes) {
      expect(lane.map((r) => r.id)).toEqual([...lane.map((r) => r.id)].sort((a, b) => (a < b ? -1 : 1)));
      expect(lane.length).toBeGreaterThan(0);
    }
    const laneOfKey = new Map<string | null, number>();
    lanes.forEach((rows, lane) => rows.forEach((r) => {
      expect(laneOfKey.get(r.key) ?? lane).toBe(lane);
      laneOfKey.set(r.key, lane);
    }));
    expect(laneOfKey.get(null)).toBe(0);
    // What a lane read is what tide.message_lane says.
    const [{ disagree }] = await db.sql`
      SELECT count(*) FILTER (WHERE tide.message_lane(${filter(0, 4)}::text::jsonb, headers, payload) <> ${laneOfKey.get("k1")!}
                                AND headers->>'key' = 'k1') AS disagree FROM tide.outbox_messages WHERE outbox = 'lr_split'`;
    expect(disagree).toBe(0n);
    for (const lane of [0, 1, 2, 3]) expect(await lag("lr_split", lane, 4)).toBe(0n);
    // Every lane's position passed the last message, its own or not (status and tools read this).
    const offsets = await db.sql`SELECT committed_offset FROM tide.consumer_groups WHERE outbox_name = 'lr_split'`;
    expect(offsets.map((r) => r.committed_offset)).toEqual([0, 1, 2, 3].map(() => all[all.length - 1]));
  });

  it("a lane whose messages end before the interval does closes it and reads the next one", async () => {
    await outboxWith("lr_tail", 60, 10);
    expect(await prepare("lr_tail", 2)).toBe(true);
    const epoch = await claim("lr_tail", 1, 2);
    const first = await read("lr_tail", 1, 2, 1000);
    expect(first.length).toBeGreaterThan(0);
    expect(await commit("lr_tail", 1, 2, first, epoch)).toBe(true);
    // Published after the interval opened: the next read closes the drained interval and opens one with these.
    await db.sql`INSERT INTO tide.outbox_messages (outbox, payload, headers)
                 SELECT 'lr_tail', jsonb_build_object('n', g), jsonb_build_object('key', 'k' || g) FROM generate_series(61, 120) g`;
    const second = await read("lr_tail", 1, 2, 1000);
    const [{ expected }] = await db.sql`
      SELECT array_agg(id ORDER BY id) AS expected FROM tide.outbox_messages
       WHERE outbox = 'lr_tail' AND (payload->>'n')::int > 60 AND tide.message_lane(${filter(1, 2)}::text::jsonb, headers, payload) = 1`;
    expect(second.map((r) => r.id)).toEqual(expected);
    expect(second[0]!.interval_seq).toBe(first[0]!.interval_seq + 1n);
  });

  it("read ahead and the acknowledgement that reads return the lane's messages only", async () => {
    await outboxWith("lr_ahead", 200, 30);
    expect(await prepare("lr_ahead", 3)).toBe(true);
    const [{ mine }] = await db.sql`
      SELECT array_agg(id ORDER BY id) AS mine FROM tide.outbox_messages
       WHERE outbox = 'lr_ahead' AND tide.message_lane(${filter(2, 3)}::text::jsonb, headers, payload) = 2`;
    const epoch = await claim("lr_ahead", 2, 3);
    const first = await read("lr_ahead", 2, 3, 10);
    const last = first[first.length - 1]!;
    const ahead = await db.sql`
      SELECT id FROM tide.consumer_read_ahead('lr_ahead', 'g.lane-2-of-3', 10, 'default', ${last.interval_seq}, ${last.generation},
                                              ${last.id}, p_lane := ${filter(2, 3)}::text::jsonb)`;
    const next = await db.sql`
      SELECT moved, id FROM tide.consumer_commit_read('lr_ahead', 'g.lane-2-of-3', ${last.id}, 10, 'default', ${last.generation},
                                                      ${last.interval_seq}, ${last.read_cursor}, ${epoch}, 10,
                                                      p_lane := ${filter(2, 3)}::text::jsonb)`;
    expect(first.map((r) => r.id)).toEqual(mine.slice(0, 10));
    expect(ahead.map((r) => r.id)).toEqual(mine.slice(10, 20));
    expect(next.map((r) => r.id)).toEqual(mine.slice(10, 20));
  });

  it("refuses a reader that does not say which lane it reads, or reads it under another rule", async () => {
    await outboxWith("lr_refuse", 20, 5);
    expect(await prepare("lr_refuse", 2)).toBe(true);
    // A relay older than schema version 15 passes no lane: it would filter again by its own rule.
    const old = await db.sql`SELECT id FROM tide.consumer_read_batch('lr_refuse', 'g.lane-1-of-2', 10, 'default', p_durable := false)`
      .catch((error) => error);
    expect(old.code).toBe("55000");
    expect(old.message).toContain('consumer group "g.lane-1-of-2" on outbox "lr_refuse" is lane 1 of 2, read in the database');
    expect(old.hint).toContain("upgrade it");
    const other = await db.sql`
      SELECT id FROM tide.consumer_read_batch('lr_refuse', 'g.lane-1-of-2', 10, 'default', p_durable := false,
                                              p_lane := ${filter(1, 2, "payload.n")}::text::jsonb)`.catch((error) => error);
    expect(other.code).toBe("55000");
    // And the lanes cannot be prepared again under another key.
    const rekeyed = await prepare("lr_refuse", 2, "payload.n").catch((error) => error);
    expect(rekeyed.code).toBe("55000");
    expect(rekeyed.message).toContain('its lanes ran with lane_key "headers.key"; changing it to "payload.n" is refused');
  });

  it("keeps lanes made before schema version 15 filtered by their relay", async () => {
    await outboxWith("lr_legacy", 20, 5);
    // What a relay of version 14 ran: the groups without a lane filter.
    await db.sql`SELECT tide.consumer_lanes_ensure('lr_legacy', 'g', 2, 'default')`;
    expect(await prepare("lr_legacy", 2)).toBe(false);
    const rows = await db.sql`SELECT id FROM tide.consumer_read_batch('lr_legacy', 'g.lane-1-of-2', 100, 'default', p_durable := false)`;
    expect(rows.length).toBe(20); // every message: the relay picks its lane's
    const [{ filters }] = await db.sql`
      SELECT count(lane_filter) AS filters FROM tide.consumer_groups WHERE outbox_name = 'lr_legacy'`;
    expect(filters).toBe(0n);
  });

  it("a key in the payload: strings by their text, numbers exactly as written, no key in lane 0", async () => {
    const f = (lanes: number) => JSON.stringify({ lane: 0, lanes, key: ["payload", "customer", "id"] });
    const [r] = await db.sql`
      SELECT tide.message_lane(${f(64)}::text::jsonb, '{}', '{"customer": {"id": 12345678901234567891}}') AS big,
             tide.message_lane(${f(64)}::text::jsonb, '{}', '{"customer": {"id": "12345678901234567891"}}') AS big_text,
             tide.message_lane(${f(64)}::text::jsonb, '{}', '{"customer": {"id": 1.50}}') AS scaled,
             tide.message_lane(${f(64)}::text::jsonb, '{}', '{"customer": {"id": "1.50"}}') AS scaled_text,
             tide.message_lane(${f(64)}::text::jsonb, '{}', '{"customer": {}}') AS missing,
             tide.message_lane(${f(64)}::text::jsonb, '{}', '{"customer": {"id": null}}') AS json_null,
             (SELECT count(DISTINCT tide.message_lane(${f(8)}::text::jsonb, '{}', jsonb_build_object('customer', jsonb_build_object('id', 'c' || g))))
                FROM generate_series(1, 200) g) AS spread`;
    expect(r!.big).toBe(r!.big_text); // no rounding through a float
    expect(r!.missing).toBe(0);
    expect(r!.json_null).toBe(0);
    expect(r!.spread).toBe(8n);
    expect(r!.scaled).toBe(r!.scaled_text); // a number is keyed by its text as written: 1.50, not 1.5
  });

  it("with one lane again after the lanes' groups were dropped, reads every message", async () => {
    await outboxWith("lr_back", 30, 5);
    expect(await prepare("lr_back", 3)).toBe(true);
    await db.sql`DELETE FROM tide.consumer_groups WHERE outbox_name = 'lr_back' AND group_name LIKE 'g.lane-%'`;
    expect(await prepare("lr_back", 1)).toBe(false);
    const rows = await db.sql`SELECT id FROM tide.consumer_read_batch('lr_back', 'g', 100, 'default', p_durable := false)`;
    expect(rows.length).toBe(30);
  });
});
