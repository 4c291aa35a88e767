// Operations on the catalog: retention sweeps (outbox and inbox), the forward dead-letter queue,
// rewinding a consumer group, and inbox dead letters with replay.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { deliver, expectError } from "../support/seeds.ts";

let db: TestDatabase;
beforeAll(async () => {
  db = await createTestDatabase();
});
afterAll(async () => {
  await db.drop();
});

async function ids(outbox: string): Promise<bigint[]> {
  const rows = await db.sql<{ id: bigint }[]>`SELECT id FROM tide.outbox_messages WHERE outbox = ${outbox} ORDER BY id`;
  return rows.map((r) => r.id);
}

describe("outbox_retention_sweep", () => {
  let all: bigint[];
  beforeAll(async () => {
    await db.sql`SELECT tide.outbox_create('ret', p_retention_hours := 1)`;
    await db.sql`SELECT tide.create_consumer_group('fast', 'ret')`;
    await db.sql`SELECT tide.create_consumer_group('slow', 'ret')`;
    for (let i = 0; i < 10; i++) await db.sql`SELECT tide.outbox_publish('ret', ${db.sql.json({ i })})`;
    all = await ids("ret");
    // The first six are past the one-hour retention.
    await db.sql`UPDATE tide.outbox_messages SET created_at = now() - interval '2 hours' WHERE outbox = 'ret' AND id <= ${all[5]}`;
    await deliver(db.sql, "ret", "fast");
    await deliver(db.sql, "ret", "slow", { count: 4 }); // slow has the first four only
    // Another outbox whose old messages nobody has delivered.
    await db.sql`SELECT tide.outbox_create('kept', p_retention_hours := 1)`;
    await db.sql`SELECT tide.create_consumer_group('idle', 'kept')`;
    await db.sql`SELECT tide.outbox_publish('kept', '{}'::jsonb) FROM generate_series(1, 3)`;
    await db.sql`UPDATE tide.outbox_messages SET created_at = now() - interval '2 hours' WHERE outbox = 'kept'`;
  });

  it("a dry run counts only old messages delivered to every group, and deletes nothing", async () => {
    const [{ n }] = await db.sql`SELECT tide.outbox_retention_sweep('ret', p_dry_run := true) AS n`;
    expect(n).toBe(4n);
    const [{ n: everywhere }] = await db.sql`SELECT tide.outbox_retention_sweep(p_dry_run := true) AS n`;
    expect(everywhere).toBe(4n);
    expect(await ids("ret")).toEqual(all);
  });

  it("deletes in bounded batches, oldest first, until nothing eligible is left", async () => {
    const sweep = async () => (await db.sql`SELECT tide.outbox_retention_sweep('ret', p_batch := 3) AS n`)[0].n;
    expect(await sweep()).toBe(3n);
    expect(await ids("ret")).toEqual(all.slice(3));
    expect(await sweep()).toBe(1n);
    expect(await sweep()).toBe(0n);
    expect(await ids("ret")).toEqual(all.slice(4));
  });

  it("keeps old messages that some group has not delivered, and recent ones that all have", async () => {
    await deliver(db.sql, "ret", "slow");
    expect((await db.sql`SELECT tide.outbox_retention_sweep(p_batch := 100) AS n`)[0].n).toBe(2n);
    expect(await ids("ret")).toEqual(all.slice(6)); // delivered everywhere, but recent
    expect(await ids("kept")).toHaveLength(3); // old, but undelivered
  });

  it("a relay group that is behind holds messages back too", async () => {
    await db.sql`SELECT tide.outbox_create('blue', p_retention_hours := 1)`;
    await db.sql`SELECT tide.create_consumer_group('g', 'blue')`;
    await db.sql`SELECT tide.outbox_publish('blue', '{}'::jsonb) FROM generate_series(1, 4)`;
    await db.sql`UPDATE tide.outbox_messages SET created_at = now() - interval '2 hours' WHERE outbox = 'blue'`;
    await deliver(db.sql, "blue", "g");
    await deliver(db.sql, "blue", "g", { count: 1, relayGroupId: "blue-relays" });
    expect((await db.sql`SELECT tide.outbox_retention_sweep('blue') AS n`)[0].n).toBe(1n);
    expect(await ids("blue")).toHaveLength(3);
  });
});

describe("inbox_retention_sweep", () => {
  it("deletes processed rows past retention, keeps dead letters when dlq retention is 0", async () => {
    await db.sql`SELECT tide.inbox_create('keepdlq', p_max_retries := 1, p_processed_retention_hours := 24, p_dlq_retention_hours := 0)`;
    await db.sql`SELECT tide.inbox_create('dropdlq', p_max_retries := 1, p_processed_retention_hours := 24, p_dlq_retention_hours := 1)`;
    for (const inbox of ["keepdlq", "dropdlq"]) {
      const rows = ["old-done", "new-done", "dead", "waiting"].map((e) => ({ event_id: e, payload: {} }));
      await db.sql`SELECT * FROM tide.inbox_insert_batch(${inbox}, ${db.sql.json(rows)})`;
      await db.sql`SELECT tide.inbox_mark_processed(${inbox}, e) FROM unnest(ARRAY['old-done', 'new-done']) e`;
      await db.sql`SELECT tide.inbox_mark_failed(${inbox}, 'dead', 'boom')`;
      await db.sql.unsafe(`UPDATE tide.${inbox}_inbox SET processed_at = now() - interval '48 hours' WHERE event_id = 'old-done';
                           UPDATE tide.${inbox}_inbox SET dead_lettered_at = now() - interval '48 hours' WHERE event_id = 'dead'`);
    }
    const [{ n: dry }] = await db.sql`SELECT tide.inbox_retention_sweep(p_dry_run := true) AS n`;
    expect(dry).toBe(3n);
    expect((await db.sql`SELECT tide.inbox_retention_sweep('keepdlq') AS n`)[0].n).toBe(1n);
    expect((await db.sql`SELECT tide.inbox_retention_sweep('dropdlq', p_batch := 1) AS n`)[0].n).toBe(1n);
    expect((await db.sql`SELECT tide.inbox_retention_sweep('dropdlq', p_batch := 1) AS n`)[0].n).toBe(1n);
    const left = async (inbox: string) =>
      (await db.sql.unsafe(`SELECT event_id FROM tide.${inbox}_inbox ORDER BY id`)).map((r) => r.event_id);
    expect(await left("keepdlq")).toEqual(["new-done", "dead", "waiting"]);
    expect(await left("dropdlq")).toEqual(["new-done", "waiting"]);
  });
});

describe("forward dead-letter queue", () => {
  let messageIds: bigint[];
  beforeAll(async () => {
    await db.sql`SELECT tide.outbox_create('dlq')`;
    await db.sql`SELECT tide.relay_set_outbox('dlq-hook', 'dlq', 'webhook', '{"url": "https://example.com"}'::jsonb)`;
    await db.sql`SELECT tide.outbox_publish('dlq', 'orders', ${db.sql.json({ n: 1 })}, '{"event_type": "x"}'::jsonb)`;
    await db.sql`SELECT tide.outbox_publish('dlq', ${db.sql.json({ n: 2 })})`;
    messageIds = await ids("dlq");
  });

  it("relay_dlq_add keeps a copy of the message with the error, listed as open", async () => {
    const [{ id }] = await db.sql`SELECT tide.relay_dlq_add('dlq-hook', ${messageIds[0]}, 'HTTP 410 Gone', 5) AS id`;
    expect(typeof id).toBe("bigint");
    await db.sql`SELECT tide.relay_dlq_add('dlq-hook', ${messageIds[1]}, 'HTTP 400')`;
    const open = await db.sql`SELECT * FROM tide.relay_dlq_list('dlq-hook')`;
    expect(open.map((r) => [r.message_id, r.outbox_name, r.topic, r.payload, r.headers, r.error, r.attempts, r.status])).toEqual([
      [messageIds[0], "dlq", "orders", { n: 1 }, { event_type: "x" }, "HTTP 410 Gone", 5, "open"],
      [messageIds[1], "dlq", null, { n: 2 }, {}, "HTTP 400", 1, "open"],
    ]);
    const [status] = await db.sql`SELECT dlq_depth FROM tide.pipeline_status WHERE pipeline = 'dlq-hook'`;
    expect(status.dlq_depth).toBe(2n);
  });

  it("requeue marks one entry for redelivery once; resolve closes another", async () => {
    const [first, second] = await db.sql`SELECT id FROM tide.relay_dlq_list('dlq-hook')`;
    expect((await db.sql`SELECT tide.relay_dlq_requeue(${first.id}::bigint) AS n`)[0].n).toBe(1);
    await expectError(db.sql`SELECT tide.relay_dlq_requeue(${first.id}::bigint)`, `dead letter ${first.id}`, "already requeued");
    await db.sql`SELECT tide.relay_dlq_resolve(${second.id}::bigint)`;
    const byStatus = async (status: string) =>
      (await db.sql`SELECT id FROM tide.relay_dlq_list('dlq-hook', ${status})`).map((r) => r.id);
    expect(await byStatus("open")).toEqual([]);
    expect(await byStatus("requeued")).toEqual([first.id]);
    expect(await byStatus("resolved")).toEqual([second.id]);
    expect((await db.sql`SELECT * FROM tide.relay_dlq_list(NULL, NULL)`).length).toBe(2);
    await expectError(db.sql`SELECT tide.relay_dlq_resolve(999999::bigint)`, "dead letter 999999 does not exist");
  });

  it("requeue by pipeline takes every open entry of that pipeline", async () => {
    await db.sql`SELECT tide.relay_dlq_add('dlq-hook', id, 'again') FROM tide.outbox_messages WHERE outbox = 'dlq'`;
    expect((await db.sql`SELECT tide.relay_dlq_requeue('dlq-hook') AS n`)[0].n).toBe(2);
    expect(await db.sql`SELECT id FROM tide.relay_dlq_list('dlq-hook')`).toHaveLength(0);
  });

  it("relay_dlq_add refuses a message that does not exist instead of recording nothing", async () => {
    await expectError(db.sql`SELECT tide.relay_dlq_add('dlq-hook', 999999, 'lost')`, "999999");
  });
});

describe("consumer_group_rewind", () => {
  let all: bigint[];
  beforeAll(async () => {
    await db.sql`SELECT tide.outbox_create('rew')`;
    await db.sql`SELECT tide.relay_set_outbox('rew-out', 'rew', 'stdout', '{}'::jsonb)`;
    for (let i = 1; i <= 6; i++) await db.sql`SELECT tide.outbox_publish('rew', ${db.sql.json({ i })})`;
    all = await ids("rew");
    expect(await deliver(db.sql, "rew", "rew-out")).toEqual(all);
  });

  it("refuses while the group's pipeline is enabled, unless forced", async () => {
    const error = await expectError(
      db.sql`SELECT tide.consumer_group_rewind('rew-out', 'rew', p_to_id := ${all[2]})`,
      `consumer group "rew-out" is in use by enabled pipeline "rew-out"`,
    );
    expect(error.hint).toContain("p_force");
    const [lag] = await db.sql`SELECT lag FROM tide.consumer_lag WHERE group_name = 'rew-out'`;
    expect(lag.lag).toBe(0n);
  });

  it("asks for exactly one of p_to_id and p_to_time", async () => {
    await db.sql`SELECT tide.relay_disable('rew-out')`;
    await expectError(db.sql`SELECT tide.consumer_group_rewind('rew-out', 'rew')`, "exactly one of p_to_id and p_to_time");
    await expectError(db.sql`SELECT tide.consumer_group_rewind('nope', 'rew', p_to_id := 1)`, `consumer group "nope" does not exist`);
  });

  it("rewound to an id on a disabled pipeline, redelivers the messages above it in order", async () => {
    const [{ n }] = await db.sql`SELECT tide.consumer_group_rewind('rew-out', 'rew', p_to_id := ${all[2]}) AS n`;
    expect(n).toBe(3n);
    const [lag] = await db.sql`SELECT lag FROM tide.consumer_lag WHERE group_name = 'rew-out'`;
    expect(lag.lag).toBe(3n);
    expect(await deliver(db.sql, "rew", "rew-out", { batch: 2 })).toEqual(all.slice(3));
    expect(await deliver(db.sql, "rew", "rew-out")).toEqual([]);
  });

  it("with p_force, rewinds an enabled pipeline's group", async () => {
    await db.sql`SELECT tide.relay_enable('rew-out')`;
    await db.sql`SELECT tide.consumer_group_rewind('rew-out', 'rew', p_to_id := ${all[4]}, p_force := true)`;
    expect(await deliver(db.sql, "rew", "rew-out")).toEqual([all[5]]);
  });

  it("rewound to a time, redelivers from the first message created at or after it", async () => {
    await db.sql`UPDATE tide.outbox_messages SET created_at = now() - interval '1 hour' WHERE outbox = 'rew' AND id <= ${all[3]}`;
    await db.sql`SELECT tide.consumer_group_rewind('rew-out', 'rew', p_to_time := now() - interval '1 minute', p_force := true)`;
    expect(await deliver(db.sql, "rew", "rew-out")).toEqual(all.slice(4));
  });

  it("a message committed after the rewind, from a transaction open during it, is delivered after the replay", async () => {
    const writer = await db.sql.reserve();
    try {
      await writer`BEGIN`;
      const [{ id: late }] = await writer`SELECT tide.outbox_publish('rew', '{"late": true}'::jsonb) AS id`;
      await db.sql`SELECT tide.consumer_group_rewind('rew-out', 'rew', p_to_id := ${all[3]}, p_force := true)`;
      const [{ id: after }] = await db.sql`SELECT tide.outbox_publish('rew', '{"after": true}'::jsonb) AS id`;
      await writer`COMMIT`;
      expect(await deliver(db.sql, "rew", "rew-out")).toEqual([...all.slice(4), late, after]);
    } finally {
      writer.release();
    }
  });

  it("consumer_lag shows the rewound position as the committed offset", async () => {
    await db.sql`SELECT tide.consumer_group_rewind('rew-out', 'rew', p_to_id := ${all[1]}, p_force := true)`;
    const [row] = await db.sql`SELECT committed_offset, lag FROM tide.consumer_lag WHERE group_name = 'rew-out'`;
    expect(row.lag).toBe(6n);
    expect(row.committed_offset).toBe(all[1]);
  });

  it("ignores the acknowledgement of a batch read before a rewind, so the rewind is not undone", async () => {
    const [{ top }] = await db.sql`SELECT max(id) AS top FROM tide.outbox_messages WHERE outbox = 'rew'`;
    await db.sql`SELECT tide.consumer_group_rewind('rew-out', 'rew', p_to_id := ${top}, p_force := true)`;
    expect(await deliver(db.sql, "rew", "rew-out")).toEqual([]);
    const [{ id: fresh }] = await db.sql`SELECT tide.outbox_publish('rew', '{"fresh": true}'::jsonb) AS id`;
    const [{ generation }] = await db.sql`SELECT generation FROM tide.consumer_groups WHERE group_name = 'rew-out'`;
    const batch = await db.sql`SELECT id FROM tide.consumer_next_batch('rew', 'rew-out', 100)`;
    expect(batch.map((r) => r.id)).toEqual([fresh]);
    // A relay is delivering that batch when an operator rewinds; its acknowledgement comes after.
    await db.sql`SELECT tide.consumer_group_rewind('rew-out', 'rew', p_to_id := ${top}, p_force := true)`;
    const [{ moved }] = await db.sql`SELECT tide.consumer_commit('rew', 'rew-out', ${fresh}, 1, 'default', ${generation}) AS moved`;
    expect(moved).toBe(false);
    expect(await deliver(db.sql, "rew", "rew-out")).toEqual([fresh]);
  });
});

describe("inbox dead letters and replay", () => {
  beforeAll(async () => {
    await db.sql`SELECT tide.inbox_create('work', p_max_retries := 3)`;
    await db.sql`SELECT * FROM tide.inbox_insert_batch('work', '[{"event_id": "a", "payload": {}}, {"event_id": "b", "payload": {}}]'::jsonb)`;
  });

  async function row(eventId: string) {
    const [r] = await db.sql`SELECT retry_count, last_error, dead_lettered_at, processed_at FROM tide.work_inbox WHERE event_id = ${eventId}`;
    return r;
  }
  const pending = async () => (await db.sql`SELECT event_id FROM tide.inbox_pending('work')`).map((r) => r.event_id);

  it("counts failures and keeps the message pending below max_retries", async () => {
    expect((await db.sql`SELECT tide.inbox_mark_failed('work', 'a', 'first') AS n`)[0].n).toBe(1);
    expect((await db.sql`SELECT tide.inbox_mark_failed('work', 'a', 'second') AS n`)[0].n).toBe(2);
    expect(await row("a")).toMatchObject({ retry_count: 2, last_error: "second", dead_lettered_at: null });
    expect(await pending()).toEqual(["a", "b"]);
  });

  it("dead-letters the message at max_retries: dead_lettered_at set, gone from inbox_pending", async () => {
    expect((await db.sql`SELECT tide.inbox_mark_failed('work', 'a', 'third') AS n`)[0].n).toBe(3);
    const dead = await row("a");
    expect(dead.dead_lettered_at).toBeInstanceOf(Date);
    expect(dead.last_error).toBe("third");
    expect(await pending()).toEqual(["b"]);
  });

  it("replay brings it back with a clean slate, and counts only messages that exist", async () => {
    expect((await db.sql`SELECT tide.replay_inbox_messages('work', ARRAY['a', 'missing']) AS n`)[0].n).toBe(1);
    expect(await row("a")).toMatchObject({ retry_count: 0, last_error: null, dead_lettered_at: null, processed_at: null });
    expect(await pending()).toEqual(["a", "b"]);
  });

  it("marking processed is idempotent, and a processed message cannot be marked failed", async () => {
    expect((await db.sql`SELECT tide.inbox_mark_processed('work', 'b') AS done`)[0].done).toBe(true);
    expect((await db.sql`SELECT tide.inbox_mark_processed('work', 'b') AS done`)[0].done).toBe(false);
    await expectError(db.sql`SELECT tide.inbox_mark_failed('work', 'b', 'late')`, "'b' was already processed");
    expect(await pending()).toEqual(["a"]);
  });
});
