// Claiming inbox messages (sql/009_inbox_claims.sql): concurrent workers get disjoint messages, a
// claim that runs out hands its message back and counts as an attempt, a lost claim cannot mark the
// message, ordering by key, inbox_pending with a limit, the inbox_stats view and who may call what.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { connect, type Sql } from "../../core/db.ts";
import { createTestDatabase, loginRole, type TestDatabase } from "../support/postgres.ts";
import { expectError } from "../support/seeds.ts";
import { waitFor } from "../support/relay.ts";

let db: TestDatabase;
beforeAll(async () => {
  db = await createTestDatabase();
});
afterAll(() => db.drop());

let inboxes = 0;
/** A new inbox holding `count` messages (payload {n}, headers from `headers(n)`), oldest first. */
async function inboxWith(count: number, options: { maxRetries?: number; headers?: (n: number) => Record<string, string> } = {}) {
  const name = `claims_${++inboxes}`;
  await db.sql`SELECT tide.inbox_create(${name}, p_max_retries := ${options.maxRetries ?? 3})`;
  if (count > 0) await insert(name, Array.from({ length: count }, (_, n) => n), options.headers);
  return name;
}

async function insert(inbox: string, ns: number[], headers: (n: number) => Record<string, string> = () => ({}), sql: Sql = db.sql) {
  const messages = ns.map((n) => ({ event_id: `${inbox}:${n}`, payload: { n }, headers: headers(n) }));
  await sql`SELECT * FROM tide.inbox_insert_batch(${inbox}, ${sql.json(messages)})`;
}

interface Claimed {
  id: bigint;
  n: number;
  claim_id: bigint;
  retry_count: number;
  last_error: string | null;
}

async function claim(inbox: string, limit = 10, timeout = "1 hour", key: string[] | null = null, sql: Sql = db.sql): Promise<Claimed[]> {
  return await sql<Claimed[]>`
    SELECT id, (payload->>'n')::int AS n, claim_id, retry_count, last_error
      FROM tide.inbox_claim(${inbox}, ${limit}, ${timeout}::interval, ${key}::text[])`;
}

async function row(inbox: string, id: bigint) {
  const [r] = await db.sql.unsafe(
    `SELECT processed_at, retry_count, last_error, dead_lettered_at, claim_id, visible_at FROM tide.${inbox}_inbox WHERE id = $1`,
    [id.toString()],
  );
  return r;
}

/** Claims with a visibility timeout of 1 ms, then waits until another claim may take the messages. */
async function claimAndLetRunOut(inbox: string, limit = 10): Promise<Claimed[]> {
  const claimed = await claim(inbox, limit, "1 millisecond");
  await waitFor("the claim to run out", async () => {
    const [{ held }] = await db.sql.unsafe(`SELECT count(*)::int AS held FROM tide.${inbox}_inbox WHERE visible_at > clock_timestamp()`);
    return held === 0;
  });
  return claimed;
}

describe("inbox_claim", () => {
  it("hands concurrent workers disjoint messages, each batch oldest first", async () => {
    const inbox = await inboxWith(600);
    const workers = Array.from({ length: 6 }, () => connect(db.url, { max: 1 }));
    try {
      const batches = await Promise.all(workers.map(async (sql) => {
        const mine: Claimed[][] = [];
        for (let batch = await claim(inbox, 7, "1 hour", null, sql); batch.length > 0; batch = await claim(inbox, 7, "1 hour", null, sql)) {
          mine.push(batch);
        }
        return mine;
      }));
      const all = batches.flat(2).map((m) => m.n);
      expect(all).toHaveLength(600);
      expect(new Set(all).size).toBe(600);
      for (const batch of batches.flat()) {
        expect(batch.map((m) => m.n)).toEqual([...batch.map((m) => m.n)].sort((a, b) => a - b));
        expect(new Set(batch.map((m) => m.claim_id)).size).toBe(1);
      }
      expect(new Set(batches.flat().map((batch) => batch[0].claim_id)).size).toBe(batches.flat().length);
    } finally {
      await Promise.all(workers.map((sql) => sql.end()));
    }
  });

  it("does not hand out a message while its claim lasts", async () => {
    const inbox = await inboxWith(3);
    expect((await claim(inbox, 2)).map((m) => m.n)).toEqual([0, 1]);
    expect((await claim(inbox, 10)).map((m) => m.n)).toEqual([2]);
    expect(await claim(inbox, 10)).toEqual([]);
  });

  it("hands a message back when its claim runs out, counting a failed attempt", async () => {
    const inbox = await inboxWith(1);
    const [first] = await claimAndLetRunOut(inbox);
    expect(first.retry_count).toBe(0);
    const [again] = await claim(inbox);
    expect(again.id).toBe(first.id);
    expect(again.claim_id).not.toBe(first.claim_id);
    expect(again.retry_count).toBe(1);
    expect(again.last_error).toContain(`claim ${first.claim_id} ran out`);
    expect([...(await db.sql`SELECT pending, claimed, failed FROM tide.inbox_stats WHERE inbox = ${inbox}`)]).toEqual([
      { pending: 1n, claimed: 1n, failed: 1n },
    ]);
  });

  it("dead-letters a message whose claims ran out max_retries times", async () => {
    const inbox = await inboxWith(1, { maxRetries: 2 });
    await claimAndLetRunOut(inbox);
    const [second] = await claimAndLetRunOut(inbox);
    expect(second.retry_count).toBe(1);
    expect(await claim(inbox)).toEqual([]);
    const dead = await row(inbox, second.id);
    expect(dead.dead_lettered_at).not.toBeNull();
    expect(dead.retry_count).toBe(2);
    expect(dead.claim_id).toBeNull();
    expect([...(await db.sql`SELECT pending, dead_lettered FROM tide.inbox_stats WHERE inbox = ${inbox}`)]).toEqual([
      { pending: 0n, dead_lettered: 1n },
    ]);
  });
});

describe("marking a claimed message", () => {
  it("marks it processed in the caller's transaction, once", async () => {
    const inbox = await inboxWith(1);
    const [m] = await claim(inbox);
    await db.sql.begin(async (tx) => {
      const [{ marked }] = await tx`SELECT tide.inbox_mark_processed(${inbox}, ${m.id}, ${m.claim_id}) AS marked`;
      expect(marked).toBe(true);
    });
    const [{ again }] = await db.sql`SELECT tide.inbox_mark_processed(${inbox}, ${m.id}, ${m.claim_id}) AS again`;
    expect(again).toBe(false);
    expect((await row(inbox, m.id)).processed_at).not.toBeNull();
    await expectError(db.sql`SELECT tide.inbox_mark_failed(${inbox}, ${m.id}, ${m.claim_id}, 'late')`, "already processed");
    expect(await claim(inbox)).toEqual([]);
  });

  it("accepts a claim that ran out when no other worker has claimed the message since", async () => {
    const inbox = await inboxWith(1);
    const [m] = await claimAndLetRunOut(inbox);
    const [{ marked }] = await db.sql`SELECT tide.inbox_mark_processed(${inbox}, ${m.id}, ${m.claim_id}) AS marked`;
    expect(marked).toBe(true);
    expect(await claim(inbox)).toEqual([]);
  });

  it("refuses a claim that another worker took over, and the refusal rolls back the caller's transaction", async () => {
    const inbox = await inboxWith(1);
    await db.sql`CREATE TABLE side_effects (message_id bigint)`;
    const [stale] = await claimAndLetRunOut(inbox);
    const [current] = await claim(inbox);
    expect(current.id).toBe(stale.id);

    const error = await expectError(
      db.sql.begin(async (tx) => {
        await tx`INSERT INTO side_effects VALUES (${stale.id})`;
        await tx`SELECT tide.inbox_mark_processed(${inbox}, ${stale.id}, ${stale.claim_id})`;
      }),
      `claim ${stale.claim_id} no longer holds message ${stale.id}`,
      `claim ${current.claim_id} holds it now`,
    );
    expect(error.code).toBe("TD001");
    expect(await db.sql`SELECT * FROM side_effects`).toHaveLength(0);
    const failed = await expectError(
      db.sql`SELECT tide.inbox_mark_failed(${inbox}, ${stale.id}, ${stale.claim_id}, 'late failure')`,
      `claim ${stale.claim_id} no longer holds message ${stale.id}`,
    );
    expect(failed.code).toBe("TD001");
    await expectError(db.sql`SELECT tide.inbox_extend_claim(${inbox}, ${stale.id}, ${stale.claim_id}, '1 hour')`, "no longer holds");

    const [{ marked }] = await db.sql`SELECT tide.inbox_mark_processed(${inbox}, ${current.id}, ${current.claim_id}) AS marked`;
    expect(marked).toBe(true);
    const done = await row(inbox, current.id);
    expect(done.retry_count).toBe(1);
    await db.sql`DROP TABLE side_effects`;
  });

  it("marks a claimed batch in one call, and refuses the whole batch when the claim lost one of it", async () => {
    const inbox = await inboxWith(4);
    const batch = await claim(inbox, 2);
    const ids = db.sql.array(batch.map((m) => m.id));
    const [{ marked }] = await db.sql`SELECT tide.inbox_mark_processed(${inbox}, ${ids}, ${batch[0].claim_id}) AS marked`;
    expect(marked).toBe(2);
    const [{ again }] = await db.sql`SELECT tide.inbox_mark_processed(${inbox}, ${ids}, ${batch[0].claim_id}) AS again`;
    expect(again).toBe(0);

    const [kept, lost] = await claimAndLetRunOut(inbox, 2);
    const [taken] = await claim(inbox, 1);
    expect(taken.id).toBe(kept.id); // the other worker took the first of the two
    const refused = await expectError(
      db.sql`SELECT tide.inbox_mark_processed(${inbox}, ${db.sql.array([kept.id, lost.id])}, ${kept.claim_id})`,
      `claim ${kept.claim_id} no longer holds message ${kept.id}`,
    );
    expect(refused.code).toBe("TD001");
    expect((await row(inbox, lost.id)).processed_at).toBeNull();
    await expectError(db.sql`SELECT tide.inbox_mark_processed(${inbox}, ARRAY[1, NULL]::bigint[], 1)`, "p_ids must not hold NULL");
  });

  it("records a failure, ends the claim and holds the message back for p_retry_delay", async () => {
    const inbox = await inboxWith(1);
    const [m] = await claim(inbox);
    const [{ count }] = await db.sql`
      SELECT tide.inbox_mark_failed(${inbox}, ${m.id}, ${m.claim_id}, 'card declined', '1 hour') AS count`;
    expect(count).toBe(1);
    expect(await claim(inbox)).toEqual([]);
    const failed = await row(inbox, m.id);
    expect(failed.last_error).toBe("card declined");
    expect(failed.claim_id).toBeNull();
    const [{ ahead }] = await db.sql.unsafe(
      `SELECT visible_at > now() + interval '59 minutes' AS ahead FROM tide.${inbox}_inbox WHERE id = $1`, [m.id.toString()]);
    expect(ahead).toBe(true);
    expect([...(await db.sql`SELECT pending, claimed, failed FROM tide.inbox_stats WHERE inbox = ${inbox}`)]).toEqual([
      { pending: 1n, claimed: 0n, failed: 1n },
    ]);
    // The claim ended with the failure: it can mark nothing any more.
    await expectError(db.sql`SELECT tide.inbox_mark_processed(${inbox}, ${m.id}, ${m.claim_id})`, "it was marked failed or replayed");
  });

  it("makes a failed message claimable at once without a retry delay, and dead-letters it at max_retries", async () => {
    const inbox = await inboxWith(1, { maxRetries: 2 });
    const [first] = await claim(inbox);
    await db.sql`SELECT tide.inbox_mark_failed(${inbox}, ${first.id}, ${first.claim_id}, 'first')`;
    const [second] = await claim(inbox);
    expect(second).toMatchObject({ id: first.id, retry_count: 1, last_error: "first" });
    const [{ count }] = await db.sql`SELECT tide.inbox_mark_failed(${inbox}, ${second.id}, ${second.claim_id}, 'second') AS count`;
    expect(count).toBe(2);
    expect((await row(inbox, first.id)).dead_lettered_at).not.toBeNull();
    expect(await claim(inbox)).toEqual([]);
    // replay_inbox_messages brings a dead letter back as a fresh message.
    await db.sql`SELECT tide.replay_inbox_messages(${inbox}, ARRAY[${`${inbox}:0`}])`;
    expect(await claim(inbox)).toMatchObject([{ id: first.id, retry_count: 0 }]);
  });

  it("extends a claim that still holds its message", async () => {
    const inbox = await inboxWith(1);
    const [m] = await claim(inbox, 1, "1 millisecond");
    const [{ until }] = await db.sql`SELECT tide.inbox_extend_claim(${inbox}, ${m.id}, ${m.claim_id}, '1 hour') AS until`;
    expect(until.getTime()).toBeGreaterThan(Date.now() + 59 * 60_000);
    expect(await claim(inbox)).toEqual([]);
    await db.sql`SELECT tide.inbox_mark_processed(${inbox}, ${m.id}, ${m.claim_id})`;
    const [{ after }] = await db.sql`SELECT tide.inbox_extend_claim(${inbox}, ${m.id}, ${m.claim_id}, '1 hour') AS after`;
    expect(after).toBeNull();
  });
});

describe("ordering by key", () => {
  const byKey = (n: number): Record<string, string> => (n % 3 === 2 ? {} : { key: n % 3 === 0 ? "a" : "b" });
  const KEY = ["headers", "key"];

  it("hands out each key's oldest message alone, and nothing of a key while one of its messages is held", async () => {
    // n: 0 a, 1 b, 2 (no key), 3 a, 4 b, 5 (no key)
    const inbox = await inboxWith(6, { headers: byKey });
    const first = await claim(inbox, 10, "1 hour", KEY);
    expect(first.map((m) => m.n)).toEqual([0, 1, 2, 5]);
    expect(await claim(inbox, 10, "1 hour", KEY)).toEqual([]);
    const a = first[0];
    await db.sql`SELECT tide.inbox_mark_processed(${inbox}, ${a.id}, ${a.claim_id})`;
    expect((await claim(inbox, 10, "1 hour", KEY)).map((m) => m.n)).toEqual([3]);
  });

  it("keeps a failed message of a key ahead of the key's later messages", async () => {
    const inbox = await inboxWith(2, { headers: () => ({ key: "k" }) });
    const [first] = await claim(inbox, 10, "1 hour", KEY);
    await db.sql`SELECT tide.inbox_mark_failed(${inbox}, ${first.id}, ${first.claim_id}, 'try again', '1 hour')`;
    expect(await claim(inbox, 10, "1 hour", KEY)).toEqual([]);
  });

  it("orders by a payload field", async () => {
    const inbox = await inboxWith(0);
    await db.sql`SELECT * FROM tide.inbox_insert_batch(${inbox}, ${db.sql.json([
      { event_id: "x1", payload: { account: { id: 7 }, n: 1 } },
      { event_id: "x2", payload: { account: { id: 7 }, n: 2 } },
      { event_id: "x3", payload: { account: { id: 8 }, n: 3 } },
    ])})`;
    expect((await claim(inbox, 10, "1 hour", ["payload", "account", "id"])).map((m) => m.n)).toEqual([1, 3]);
  });

  it("does not hand out a key's lower id that committed late while the key's later message is held", async () => {
    const inbox = await inboxWith(0);
    const late = connect(db.url, { max: 1 });
    try {
      const reserved = await late.reserve();
      await reserved`BEGIN`;
      await insert(inbox, [0], () => ({ key: "k" }), reserved as unknown as Sql); // lower id, not committed yet
      await insert(inbox, [1], () => ({ key: "k" }));
      const [held] = await claim(inbox, 10, "1 hour", KEY);
      expect(held.n).toBe(1);
      await reserved`COMMIT`;
      reserved.release();
      expect(await claim(inbox, 10, "1 hour", KEY)).toEqual([]);
      await db.sql`SELECT tide.inbox_mark_processed(${inbox}, ${held.id}, ${held.claim_id})`;
      expect((await claim(inbox, 10, "1 hour", KEY)).map((m) => m.n)).toEqual([0]);
    } finally {
      await late.end();
    }
  });

  it("needs READ COMMITTED", async () => {
    const inbox = await inboxWith(1);
    await expectError(
      db.sql.begin("ISOLATION LEVEL REPEATABLE READ", (tx) => claim(inbox, 1, "1 hour", KEY, tx as unknown as Sql)),
      "need READ COMMITTED", "repeatable read",
    );
  });
});

describe("arguments", () => {
  it("names what is wrong and claims nothing", async () => {
    const inbox = await inboxWith(1);
    const cases: [string, string[]][] = [
      [`SELECT * FROM tide.inbox_claim('${inbox}', NULL)`, ["tide.inbox_claim: p_limit must not be NULL"]],
      [`SELECT * FROM tide.inbox_claim('${inbox}', 0)`, ["p_limit must be at least 1 (got 0)"]],
      [`SELECT * FROM tide.inbox_claim('${inbox}', 1, NULL)`, ["p_visibility_timeout must not be NULL"]],
      [`SELECT * FROM tide.inbox_claim('${inbox}', 1, '0 seconds')`, ["p_visibility_timeout must be positive"]],
      [`SELECT * FROM tide.inbox_claim('${inbox}', 1, '1 minute', '{key}')`, ["p_ordering_key must be a path", "'{key}'"]],
      [`SELECT * FROM tide.inbox_claim('${inbox}', 1, '1 minute', '{body,key}')`, ["p_ordering_key must be a path"]],
      [`SELECT * FROM tide.inbox_claim('${inbox}', 1, '1 minute', '{headers,NULL}')`, ["p_ordering_key must be a path"]],
      [`SELECT * FROM tide.inbox_claim(NULL)`, ["tide.inbox_claim: p_name must not be NULL"]],
      [`SELECT * FROM tide.inbox_claim('no_such_inbox')`, [`inbox "no_such_inbox" does not exist`]],
      [`SELECT tide.inbox_mark_processed('${inbox}', 1, NULL::bigint)`, ["p_claim_id must not be NULL"]],
      [`SELECT tide.inbox_mark_processed('${inbox}', 999, 1)`, [`inbox "${inbox}" has no message with id 999`]],
      [`SELECT tide.inbox_mark_failed('${inbox}', 1, 1, 'x', NULL)`, ["p_retry_delay must not be NULL"]],
      [`SELECT tide.inbox_mark_failed('${inbox}', 1, 1, 'x', '-1 second')`, ["p_retry_delay must not be negative"]],
      [`SELECT tide.inbox_extend_claim('${inbox}', 1, 1, '0 seconds')`, ["p_visibility_timeout must be positive"]],
      [`SELECT * FROM tide.inbox_pending('${inbox}', NULL)`, ["tide.inbox_pending: p_limit must not be NULL"]],
      [`SELECT * FROM tide.inbox_pending('${inbox}', 0)`, ["p_limit must be at least 1"]],
    ];
    for (const [statement, words] of cases) await expectError(db.sql.unsafe(statement), ...words);
    expect((await claim(inbox)).map((m) => m.n)).toEqual([0]);
  });
});

describe("inbox_pending with a limit", () => {
  it("returns the oldest pending rows, at most the limit; without a limit, all of them", async () => {
    const inbox = await inboxWith(5);
    const [m] = await claim(inbox, 1);
    await db.sql`SELECT tide.inbox_mark_processed(${inbox}, ${m.id}, ${m.claim_id})`;
    const page = await db.sql`SELECT (payload->>'n')::int AS n FROM tide.inbox_pending(${inbox}, 2)`;
    expect(page.map((r) => r.n)).toEqual([1, 2]);
    const named = await db.sql`SELECT (payload->>'n')::int AS n FROM tide.inbox_pending(${inbox}, p_limit := 3)`;
    expect(named.map((r) => r.n)).toEqual([1, 2, 3]);
    const all = await db.sql`SELECT (payload->>'n')::int AS n FROM tide.inbox_pending(${inbox})`;
    expect(all.map((r) => r.n)).toEqual([1, 2, 3, 4]);
  });
});

describe("who may claim", () => {
  it("an application (tide_publisher) works its inbox; a dashboard (tide_reader) only reads the counts", async () => {
    const inbox = await inboxWith(2);
    const app = await loginRole(db, "tide_publisher", "claims_app");
    const dashboard = await loginRole(db, "tide_reader", "claims_dash");
    const asApp = connect(app.url, { max: 1 });
    const asDashboard = connect(dashboard.url, { max: 1 });
    try {
      const [m] = await claim(inbox, 1, "1 minute", null, asApp);
      await asApp`SELECT tide.inbox_extend_claim(${inbox}, ${m.id}, ${m.claim_id}, '5 minutes')`;
      await asApp`SELECT tide.inbox_mark_processed(${inbox}, ${m.id}, ${m.claim_id})`;
      const [f] = await claim(inbox, 1, "1 minute", ["headers", "key"], asApp);
      await asApp`SELECT tide.inbox_mark_failed(${inbox}, ${f.id}, ${f.claim_id}, 'no', '1 hour')`;
      expect([...(await asApp`SELECT count(*)::int AS n FROM tide.inbox_pending(${inbox}, 10)`)]).toEqual([{ n: 1 }]);

      expect([...(await asDashboard`SELECT pending, claimed, failed, dead_lettered FROM tide.inbox_stats WHERE inbox = ${inbox}`)])
        .toEqual([{ pending: 1n, claimed: 0n, failed: 1n, dead_lettered: 0n }]);
      expect([...(await asDashboard`SELECT count(*)::int AS n FROM tide.inbox_pending(${inbox}, 10)`)]).toEqual([{ n: 1 }]);
      await expectError(claim(inbox, 1, "1 minute", null, asDashboard), "permission denied for function inbox_claim");
      await expectError(asDashboard`SELECT tide.inbox_mark_processed(${inbox}, ${m.id}, ${m.claim_id})`, "permission denied");
      await expectError(asApp`SELECT nextval('tide.inbox_claim_ids')`, "permission denied");
    } finally {
      await asApp.end();
      await asDashboard.end();
    }
  });
});
