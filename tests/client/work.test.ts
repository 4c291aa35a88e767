// pg-tide/client's work(): several workers on one inbox handle every message exactly once, keep a
// key's messages in order, record failures, roll back a handler whose claim was lost, and stop
// cleanly. Workers are separate postgres.js clients (separate sessions), as separate processes are.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import postgres from "postgres";
import { ClaimLostError, type InboxMessage, work, type Worker, type WorkOptions } from "../../client/index.js";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { waitFor } from "../support/relay.ts";

let db: TestDatabase;
beforeAll(async () => {
  db = await createTestDatabase();
});
afterAll(() => db.drop());

const clients: postgres.Sql[] = [];
/** A worker's own postgres.js client, as an application would open it. */
function client(max: number): postgres.Sql {
  const sql = postgres(db.url, { max, onnotice: () => {} });
  clients.push(sql);
  return sql;
}
afterAll(async () => {
  await Promise.all(clients.map((sql) => sql.end({ timeout: 5 })));
});

let inboxes = 0;
async function inboxWith(count: number, options: { maxRetries?: number; headers?: (n: number) => Record<string, string> } = {}) {
  const name = `work_${++inboxes}`;
  await db.sql`SELECT tide.inbox_create(${name}, p_max_retries := ${options.maxRetries ?? 3})`;
  for (let start = 0; start < count; start += 2000) {
    const messages = Array.from({ length: Math.min(2000, count - start) }, (_, i) => ({
      event_id: `${name}:${start + i}`,
      payload: { n: start + i },
      headers: options.headers?.(start + i) ?? {},
    }));
    await db.sql`SELECT * FROM tide.inbox_insert_batch(${name}, ${db.sql.json(messages)})`;
  }
  return name;
}

async function unprocessed(inbox: string): Promise<number> {
  const [{ n }] = await db.sql.unsafe(`SELECT count(*)::int AS n FROM tide.${inbox}_inbox WHERE processed_at IS NULL`);
  return n;
}

/** Errors the workers reported, to assert on; a test that expects none checks this stays empty. */
function errorLog() {
  const errors: { error: Error; message?: InboxMessage }[] = [];
  return { errors, onError: (error: Error, message?: InboxMessage) => void errors.push({ error, message }) };
}

describe("work()", () => {
  it("4 workers × concurrency 8 handle each of 10,000 messages exactly once, never two at once", async () => {
    const inbox = await inboxWith(10_000);
    await db.sql`CREATE TABLE effects (event_id text NOT NULL, worker int NOT NULL)`;
    const calls = new Map<string, number>();
    const active = new Set<string>();
    let overlaps = 0;
    const perWorker = [0, 0, 0, 0];
    const mostAtOnce = [0, 0, 0, 0];
    const { errors, onError } = errorLog();
    const workers = perWorker.map((_, w) => {
      let running = 0;
      return work(client(10), inbox, async (message, tx) => {
        mostAtOnce[w] = Math.max(mostAtOnce[w], ++running);
        calls.set(message.eventId, (calls.get(message.eventId) ?? 0) + 1);
        if (active.has(message.eventId)) overlaps++;
        active.add(message.eventId);
        try {
          await tx`INSERT INTO effects (event_id, worker) VALUES (${message.eventId}, ${w})`;
          perWorker[w]++;
        } finally {
          active.delete(message.eventId);
          running--;
        }
      }, { concurrency: 8, batchSize: 16, visibilityTimeout: 300_000, onError });
    });
    try {
      await waitFor("every message processed", async () => (await unprocessed(inbox)) === 0, 150_000);
    } finally {
      await Promise.all(workers.map((w) => w.stop()));
    }
    expect(errors).toEqual([]);
    expect(calls.size).toBe(10_000);
    expect([...calls.values()].every((n) => n === 1)).toBe(true);
    expect(overlaps).toBe(0);
    const [effects] = await db.sql`SELECT count(*)::int AS n, count(DISTINCT event_id)::int AS distinct FROM effects`;
    expect(effects).toEqual({ n: 10_000, distinct: 10_000 });
    for (const w of [0, 1, 2, 3]) {
      expect(perWorker[w]).toBeGreaterThan(0);
      expect(mostAtOnce[w]).toBeLessThanOrEqual(8);
    }
    const [stats] = await db.sql`SELECT pending, claimed, failed, dead_lettered FROM tide.inbox_stats WHERE inbox = ${inbox}`;
    expect(stats).toEqual({ pending: 0n, claimed: 0n, failed: 0n, dead_lettered: 0n });
    await db.sql`DROP TABLE effects`;
  }, 180_000);

  it("handles the messages of one key strictly one after another, in order, across workers", async () => {
    const keys = ["k0", "k1", "k2", "k3", "k4"];
    const inbox = await inboxWith(300, { headers: (n) => ({ key: keys[n % keys.length] }) });
    const busy = new Set<string>();
    const violations: string[] = [];
    const order = new Map<string, number[]>();
    const { errors, onError } = errorLog();
    const handler = async (message: InboxMessage<{ n: number }>, tx: postgres.TransactionSql) => {
      const key = message.headers.key as string;
      if (busy.has(key)) violations.push(`${key}: message ${message.payload.n} started while another of its key ran`);
      busy.add(key);
      try {
        await tx`SELECT 1`;
        order.set(key, [...(order.get(key) ?? []), message.payload.n]);
      } finally {
        busy.delete(key);
      }
    };
    const options: WorkOptions = { concurrency: 4, batchSize: 8, orderingKey: "headers.key", onError };
    const workers = [1, 2, 3].map(() => work(client(6), inbox, handler, options));
    try {
      await waitFor("every message processed", async () => (await unprocessed(inbox)) === 0, 60_000);
    } finally {
      await Promise.all(workers.map((w) => w.stop()));
    }
    expect(errors).toEqual([]);
    expect(violations).toEqual([]);
    keys.forEach((key, k) => {
      expect(order.get(key)).toEqual(Array.from({ length: 60 }, (_, i) => i * keys.length + k));
    });
  }, 90_000);

  it("marks a message failed with the handler's error, rolls back its writes, retries it and dead-letters it", async () => {
    const inbox = await inboxWith(2, { maxRetries: 3 });
    await db.sql`CREATE TABLE failing_effects (n int)`;
    const attempts: number[] = [];
    const { errors, onError } = errorLog();
    const worker = work(client(3), inbox, async (message, tx) => {
      await tx`INSERT INTO failing_effects VALUES (${message.payload.n})`;
      if (message.payload.n === 1) {
        attempts.push(message.attempt);
        throw new Error(`card declined (attempt ${message.attempt})`);
      }
    }, { retryDelay: (attempt) => attempt * 10, onError });
    try {
      await waitFor("the failing message to become a dead letter", async () => {
        const [stats] = await db.sql`SELECT pending, dead_lettered FROM tide.inbox_stats WHERE inbox = ${inbox}`;
        return stats.pending === 0n && stats.dead_lettered === 1n;
      });
    } finally {
      await worker.stop();
    }
    expect(attempts).toEqual([1, 2, 3]);
    expect(errors.map((e) => [e.error.message, e.message?.payload])).toEqual([1, 2, 3].map((a) => [`card declined (attempt ${a})`, { n: 1 }]));
    const [dead] = await db.sql.unsafe<{ retry_count: number; last_error: string }[]>(`SELECT retry_count, last_error FROM tide.${inbox}_inbox WHERE dead_lettered_at IS NOT NULL`);
    expect(dead).toEqual({ retry_count: 3, last_error: "card declined (attempt 3)" });
    expect((await db.sql`SELECT n FROM failing_effects`).map((r) => r.n)).toEqual([0]);
    await db.sql`DROP TABLE failing_effects`;
  });

  it("rolls back a handler whose claim another worker took over, and reports ClaimLostError", async () => {
    const inbox = await inboxWith(1);
    await db.sql`CREATE TABLE lost_effects (claim text)`;
    let release!: () => void;
    const released = new Promise<void>((resolve) => (release = resolve));
    let claimId: string | undefined;
    const { errors, onError } = errorLog();
    const worker = work(client(3), inbox, async (message, tx) => {
      claimId = message.claimId;
      await released;
      await tx`INSERT INTO lost_effects VALUES (${message.claimId})`;
    }, { visibilityTimeout: 1, onError });
    try {
      // Another worker takes the message once the first claim has run out.
      const [taken] = await waitFor("the message to be claimable again", async () => {
        if (!claimId) return undefined;
        const rows = await db.sql`SELECT id, claim_id FROM tide.inbox_claim(${inbox}, 1, '1 hour')`;
        return rows.length ? rows : undefined;
      });
      release();
      await waitFor("the lost claim to be reported", () => errors.length > 0);
      expect(errors[0].error).toBeInstanceOf(ClaimLostError);
      expect(errors[0].error.message).toContain(`claim ${claimId} lost message ${taken.id}`);
      expect((errors[0].error as ClaimLostError).claimId).toBe(claimId!);
      expect(await db.sql`SELECT * FROM lost_effects`).toHaveLength(0);
      const [r] = await db.sql.unsafe<{ processed_at: Date | null; claim_id: bigint }[]>(`SELECT processed_at, claim_id FROM tide.${inbox}_inbox`);
      expect(r).toEqual({ processed_at: null, claim_id: taken.claim_id });
    } finally {
      release();
      await worker.stop();
      await db.sql`DROP TABLE lost_effects`;
    }
  });

  it("stop() finishes what the worker claimed, then claims nothing more", async () => {
    const inbox = await inboxWith(3);
    let release!: () => void;
    const released = new Promise<void>((resolve) => (release = resolve));
    const started: number[] = [];
    const worker = work(client(4), inbox, async (message) => {
      started.push(message.payload.n);
      await released;
    }, { concurrency: 1, batchSize: 3 });
    await waitFor("the first handler to start", () => started.length === 1);
    let stopped = false;
    const stopping = worker.stop().then(() => (stopped = true));
    await db.sql`SELECT * FROM tide.inbox_insert_batch(${inbox}, '[{"event_id": "after-stop", "payload": {"n": 99}}]')`;
    expect(stopped).toBe(false);
    release();
    await stopping;
    expect(started).toEqual([0, 1, 2]);
    expect(await unprocessed(inbox)).toBe(1); // the message that arrived after stop()
    await worker.stop(); // a second stop is harmless
  });

  it("stops when its AbortSignal is aborted, and wakes up for messages that arrive while it is idle", async () => {
    const inbox = await inboxWith(0);
    const controller = new AbortController();
    const seen: number[] = [];
    const worker: Worker = work(client(2), inbox, (message) => void seen.push(message.payload.n), {
      signal: controller.signal,
      maxIdleMs: 100,
    });
    await db.sql`SELECT * FROM tide.inbox_insert_batch(${inbox}, '[{"event_id": "later", "payload": {"n": 7}}]')`;
    await waitFor("the message that arrived later", () => seen.length === 1);
    controller.abort();
    await worker.stopped;
    expect(seen).toEqual([7]);
  });

  it("hands the handler the message as stored: exact payload text, headers, attempt and claim", async () => {
    const inbox = await inboxWith(0);
    await db.sql.unsafe(`SELECT * FROM tide.inbox_insert_batch('${inbox}',
      '[{"event_id": "exact", "source": "nats", "payload": {"amount": 12345678901234567890.10}, "headers": {"event_type": "paid"}}]')`);
    let seen: InboxMessage | undefined;
    const worker = work(client(2), inbox, async (message) => {
      seen = message;
      await message.extendClaim(60_000);
    });
    await waitFor("the message", () => seen !== undefined);
    await worker.stop();
    expect(seen).toMatchObject({
      eventId: "exact",
      source: "nats",
      payloadText: '{"amount": 12345678901234567890.10}',
      headers: { event_type: "paid" },
      attempt: 1,
      lastError: null,
    });
    expect(seen!.claimId).toMatch(/^\d+$/);
    expect(seen!.claimedUntil).toBeInstanceOf(Date);
  });

  it("refuses bad options, naming the option", () => {
    const sql = client(1);
    const handler = () => {};
    expect(() => work(sql, "x", handler, { concurrency: 0 })).toThrow("work: concurrency must be a whole number of at least 1 (got 0)");
    expect(() => work(sql, "x", handler, { visibilityTimeout: 1.5 })).toThrow("visibilityTimeout must be a whole number");
    expect(() => work(sql, "x", handler, { orderingKey: "key" })).toThrow('orderingKey must be a path into the payload or the headers');
    expect(() => work(sql, "x", handler, { retryDelay: "1s" as never })).toThrow("retryDelay must be milliseconds");
    expect(() => work(sql, "x", handler, { concurency: 2 } as never)).toThrow('unknown option "concurency"');
    expect(() => work({} as never, "x", handler)).toThrow("work: sql must be a postgres.js client");
    expect(() => work(sql, "", handler)).toThrow("work: inbox must be the name of an inbox");
  });
});
