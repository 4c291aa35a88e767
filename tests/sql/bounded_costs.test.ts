// Costs that must not grow with the outbox: what opening an interval, a retention sweep and the exact
// lag read, asserted on plans and on the server's own per-transaction read counters (never on time).
// And the running lag count behind consumer_lag stays exact through everything that moves a position.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import postgres from "postgres";
import type { Sql } from "../../core/db.ts";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { deliver } from "../support/seeds.ts";

let db: TestDatabase;
beforeAll(async () => {
  db = await createTestDatabase();
});
afterAll(async () => {
  await db.drop();
});

/** Heap rows of tide.outbox_messages and entries of its indexes that `action` read, counted by the server. */
async function reads(action: (tx: Sql) => Promise<unknown>): Promise<{ rows: number; entries: number }> {
  return await db.sql.begin(async (tx) => {
    const count = async () => {
      const [row] = await tx`
        SELECT pg_stat_get_xact_tuples_returned('tide.outbox_messages'::regclass)
                 + pg_stat_get_xact_tuples_fetched('tide.outbox_messages'::regclass) AS rows,
               (SELECT sum(pg_stat_get_xact_tuples_returned(i.indexrelid)) FROM pg_index i
                 WHERE i.indrelid = 'tide.outbox_messages'::regclass) AS entries`;
      return { rows: Number(row.rows), entries: Number(row.entries) };
    };
    const before = await count();
    await action(tx as unknown as Sql);
    const after = await count();
    return { rows: after.rows - before.rows, entries: after.entries - before.entries };
  });
}

async function publish(outbox: string, count: number, transactions = 1): Promise<void> {
  for (let t = 0; t < transactions; t++) {
    await db.sql`SELECT tide.outbox_publish(${outbox}, jsonb_build_object('n', n, 'pad', repeat('x', 200)))
                   FROM generate_series(1, ${Math.ceil(count / transactions)}) n`;
  }
}

const lagOf = async (sql: Sql, group: string) =>
  Number((await sql`SELECT lag FROM tide.consumer_lag WHERE group_name = ${group}`)[0].lag);

describe("opening an interval", () => {
  it("reads message ids only: no statement but the batch read itself outputs a payload", async () => {
    await db.sql`SELECT tide.outbox_create('ids')`;
    await db.sql`SELECT tide.create_consumer_group('ids-g', 'ids')`;
    await publish("ids", 30, 3);
    const plans: string[] = [];
    const conn = postgres(db.url, { max: 1, onnotice: (notice) => void plans.push(String(notice.message)) });
    try {
      // Every statement run inside consumer_read_batch, with its plan and output columns.
      await conn.unsafe(`LOAD 'auto_explain'`);
      await conn.unsafe(`SET auto_explain.log_min_duration = 0; SET auto_explain.log_nested_statements = on;
                         SET auto_explain.log_verbose = on; SET client_min_messages = log`);
      const batch = await conn`SELECT id FROM tide.consumer_read_batch('ids', 'ids-g', 5)`;
      expect(batch).toHaveLength(5);
    } finally {
      await conn.end();
    }
    const opening = plans.filter((plan) => plan.includes("interval_messages"));
    expect(opening.length).toBeGreaterThanOrEqual(2); // the idle probe, and the interval's bounds
    // Inlined into the caller's query, not run apart collecting whole rows.
    expect(plans.filter((plan) => /Function Scan on tide\.interval_messages/.test(plan))).toEqual([]);
    const outputsPayload = plans.filter((plan) => /Output: [^\n]*\b(m(_\d+)?\.)?payload\b/.test(plan));
    expect(outputsPayload).toHaveLength(1);
    expect(outputsPayload[0]).toContain("LIMIT");
  });
});

describe("outbox_retention_sweep reads what it deletes, not what it keeps", () => {
  it("stops at the first message inside the retention", async () => {
    await db.sql`SELECT tide.outbox_create('young', p_retention_hours := 1)`;
    await db.sql`SELECT tide.create_consumer_group('young-g', 'young')`;
    await publish("young", 3);
    await db.sql`UPDATE tide.outbox_messages SET created_at = now() - interval '2 hours' WHERE outbox = 'young'`;
    await publish("young", 400, 4);
    await deliver(db.sql, "young", "young-g", { batch: 500 });

    let deleted = 0n;
    const read = await reads(async (tx) => {
      [{ n: deleted }] = await tx`SELECT tide.outbox_retention_sweep('young') AS n`;
    });
    expect(deleted).toBe(3n);
    expect(read.rows).toBeLessThan(150); // what it deletes, and at most one chunk (100) of what it keeps
  });

  it("does not walk the messages a group that never moves holds back", async () => {
    await db.sql`SELECT tide.outbox_create('held', p_retention_hours := 1)`;
    await db.sql`SELECT tide.create_consumer_group('live', 'held')`;
    await db.sql`SELECT tide.create_consumer_group('gone', 'held')`; // a deleted pipeline's group
    await publish("held", 5);
    await deliver(db.sql, "held", "live");
    await deliver(db.sql, "held", "gone");
    await publish("held", 400, 4);
    await deliver(db.sql, "held", "live", { batch: 500 });
    await db.sql`UPDATE tide.outbox_messages SET created_at = now() - interval '2 hours' WHERE outbox = 'held'`;

    let deleted = 0n;
    const read = await reads(async (tx) => {
      [{ n: deleted }] = await tx`SELECT tide.outbox_retention_sweep('held') AS n`;
    });
    expect(deleted).toBe(5n);
    expect(read.rows).toBeLessThan(150);
    const [{ left }] = await db.sql`SELECT count(*)::int AS left FROM tide.outbox_messages WHERE outbox = 'held'`;
    expect(left).toBe(400);
  });
});

describe("the exact lag", () => {
  it("reads no more than what arrived since the last checkpoint, however long the backlog", async () => {
    await db.sql`SELECT tide.outbox_create('backlog')`;
    await db.sql`SELECT tide.create_consumer_group('backlog-g', 'backlog')`;
    await publish("backlog", 2000, 20);
    await deliver(db.sql, "backlog", "backlog-g", { count: 10, batch: 10 }); // an interval of 2,000, 10 delivered

    let lag = 0;
    const open = await reads(async (tx) => void (lag = await lagOf(tx, "backlog-g")));
    expect(lag).toBe(1990);
    expect(open.entries + open.rows).toBeLessThan(50);

    await publish("backlog", 300, 3); // committed after the interval opened
    expect(await lagOf(db.sql, "backlog-g")).toBe(2290);
    await db.sql`SELECT tide.consumer_lag_checkpoint()`;
    const counted = await reads(async (tx) => void (lag = await lagOf(tx, "backlog-g")));
    expect(lag).toBe(2290);
    expect(counted.entries + counted.rows).toBeLessThan(50);
  });

  it("matches a full count through deliveries, late commits, checkpoints and rewinds", async () => {
    await db.sql`SELECT tide.outbox_create('exact')`;
    for (const group of ["exact-a", "exact-b", "exact-c"]) await db.sql`SELECT tide.create_consumer_group(${group}, 'exact')`;
    let seed = 12345;
    const random = (n: number) => (seed = (seed * 1103515245 + 12345) % 2 ** 31) % n;
    const late = await db.sql.reserve(); // a writer whose transaction commits while others go on
    let lateOpen = false;
    const check = async (step: string) => {
      const rows = await db.sql`
        SELECT g.group_name, g.relay_group_id, tide.consumer_group_lag(g.outbox_name, g.group_name, g.relay_group_id) AS lag,
               tide.undelivered_count(g.outbox_name, g.low, g.high, g.cursor_id) AS counted
          FROM tide.consumer_groups g WHERE g.outbox_name = 'exact' ORDER BY 1, 2`;
      for (const row of rows) expect({ step, group: `${row.group_name}/${row.relay_group_id}`, lag: row.lag })
        .toEqual({ step, group: `${row.group_name}/${row.relay_group_id}`, lag: row.counted });
    };
    try {
      for (let step = 0; step < 120; step++) {
        const group = ["exact-a", "exact-b", "exact-c"][random(3)];
        const relayGroupId = random(4) === 0 ? "blue" : "default";
        const action = random(8);
        let name: string;
        if (action === 0) {
          name = "publish";
          await publish("exact", 1 + random(5));
        } else if (action === 1) {
          name = lateOpen ? "late commit" : "late publish";
          if (lateOpen) await late`COMMIT`;
          else {
            await late`BEGIN`;
            await late`SELECT tide.outbox_publish('exact', '{"late": true}'::jsonb)`;
          }
          lateOpen = !lateOpen;
        } else if (action <= 4) {
          name = "deliver";
          await deliver(db.sql, "exact", group, { count: 1 + random(4), batch: 1 + random(3), relayGroupId });
        } else if (action === 5) {
          name = "read without acknowledging";
          await db.sql`SELECT id FROM tide.consumer_read_batch('exact', ${group}, 2, ${relayGroupId})`;
        } else if (action === 6) {
          name = "checkpoint";
          await db.sql`SELECT tide.consumer_lag_checkpoint()`;
        } else {
          name = "rewind";
          const [{ id }] = await db.sql`SELECT coalesce(max(id), 0) - ${random(6)} AS id FROM tide.outbox_messages WHERE outbox = 'exact'`;
          await db.sql`SELECT tide.consumer_group_rewind(${group}, 'exact', p_to_id := ${id}, p_relay_group_id := 'default')`;
        }
        await check(`${step}: ${name} (${group}, ${relayGroupId})`);
      }
    } finally {
      if (lateOpen) await late`COMMIT`;
      late.release();
    }
  });
});
