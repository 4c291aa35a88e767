// While a backlog lasts the relay reads larger batches than batch_size, up to max_batch_size, for
// sinks that take batches of any size; it never does so for a webhook in batch mode unless asked,
// because there a batch is a request the receiver sees. Either way every message arrives once, in
// order.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Relay } from "../../core/relay.ts";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { readJsonl, startRelay, waitFor } from "../support/relay.ts";

let db: TestDatabase;
let relay: Relay;
let dir: string;

beforeAll(async () => {
  db = await createTestDatabase();
  dir = await mkdtemp(join(tmpdir(), "tide-growth-"));
  relay = await startRelay(db.url, { reconcileIntervalMs: 200 });
});
afterAll(async () => {
  await relay.stop();
  await db.drop();
});

/** A webhook in batch mode that notes how many messages each request held, and their order. */
function countingWebhook() {
  const sizes: number[] = [];
  const ids: number[] = [];
  const server = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(request) {
      const batch = (await request.json()) as { payload: { n: number } }[];
      sizes.push(batch.length);
      ids.push(...batch.map((m) => m.payload.n));
      return new Response("ok");
    },
  });
  return { url: `http://127.0.0.1:${server.port}/hook`, sizes, ids, stop: () => server.stop(true) };
}

async function backlog(outbox: string, count: number): Promise<void> {
  await db.sql`SELECT tide.outbox_create(${outbox})`;
  await db.sql`INSERT INTO tide.outbox_messages (outbox, payload) SELECT ${outbox}, jsonb_build_object('n', g) FROM generate_series(1, ${count}) g`;
}

const lagOf = async (outbox: string) => (await db.sql`SELECT lag FROM tide.consumer_lag WHERE outbox_name = ${outbox}`)[0]?.lag;

describe("batches during a backlog", () => {
  it("keeps a webhook's batches at batch_size: each one is a request its receiver sees", async () => {
    const hook = countingWebhook();
    try {
      await backlog("fixed", 120);
      await db.sql`SELECT tide.relay_set_outbox('fixed', 'fixed', 'webhook', ${db.sql.json({ url: hook.url, mode: "batch" })}, p_batch_size := 10)`;
      await waitFor("the backlog delivered", async () => hook.ids.length >= 120 && (await lagOf("fixed")) === 0n);
      expect(Math.max(...hook.sizes)).toBe(10);
      expect(hook.ids).toEqual(Array.from({ length: 120 }, (_, i) => i + 1));
    } finally {
      hook.stop();
    }
  });

  it("grows a webhook's batches up to max_batch_size when the pipeline asks for it, doubling from batch_size", async () => {
    const hook = countingWebhook();
    try {
      await backlog("grown", 300);
      await db.sql`SELECT tide.relay_set_outbox('grown', 'grown', 'webhook',
                      ${db.sql.json({ url: hook.url, mode: "batch", max_batch_size: 40 })}, p_batch_size := 10)`;
      await waitFor("the backlog delivered", async () => hook.ids.length >= 300 && (await lagOf("grown")) === 0n);
      expect(hook.sizes.slice(0, 3)).toEqual([10, 20, 40]);
      expect(Math.max(...hook.sizes)).toBe(40);
      expect(hook.ids).toEqual(Array.from({ length: 300 }, (_, i) => i + 1));
    } finally {
      hook.stop();
    }
  });

  it("grows a broker-like sink's batches by default, and delivers the backlog whole and in order", async () => {
    const path = join(dir, "file.jsonl");
    await backlog("file_sink", 3000);
    await db.sql`SELECT tide.relay_set_outbox('file-sink', 'file_sink', 'file', ${db.sql.json({ path })}, p_batch_size := 10)`;
    const lines = await waitFor("the backlog in the file", async () => {
      const lines = await readJsonl(path);
      return lines.length >= 3000 && lines;
    }, 60_000);
    expect(lines.map((l) => l.payload.n)).toEqual(Array.from({ length: 3000 }, (_, i) => i + 1));
    // 3,000 messages in batches of 10 would be 300 batches; grown (10, 20, ..., 640, 1000, ...), a handful.
    const batches = Number(/pg_tide_relay_batches_delivered_total\{pipeline="file-sink"\} (\d+)/.exec(await relay.metrics.text())?.[1]);
    expect(batches).toBeGreaterThan(0);
    expect(batches).toBeLessThan(30);
  });

  it("refuses a max_batch_size below batch_size, or one that is not a whole number, naming the pipeline", async () => {
    await db.sql`SELECT tide.outbox_create('bad_max')`;
    await db.sql`SELECT tide.outbox_publish('bad_max', '{"n": 1}'::jsonb)`;
    await db.sql`SELECT tide.relay_set_outbox('bad-max', 'bad_max', 'file', ${db.sql.json({ path: join(dir, "bad.jsonl"), max_batch_size: 5 })},
                                              p_batch_size := 10)`;
    const status = await waitFor("bad-max to report its config", async () => {
      const [row] = await db.sql`SELECT healthy, last_error FROM tide.pipeline_status WHERE pipeline = 'bad-max'`;
      return row?.last_error && row;
    });
    expect(status.last_error).toContain(`'max_batch_size' (5) is below its batch_size (10)`);

    await db.sql`SELECT tide.relay_set_outbox('bad-max-2', 'bad_max', 'file', ${db.sql.json({ path: join(dir, "bad2.jsonl"), max_batch_size: 2.5 })})`;
    const second = await waitFor("bad-max-2 to report its config", async () => {
      const [row] = await db.sql`SELECT healthy, last_error FROM tide.pipeline_status WHERE pipeline = 'bad-max-2'`;
      return row?.last_error && row;
    });
    expect(second.last_error).toContain(`pipeline "bad-max-2": 'max_batch_size' must be a whole number from 1 to 100000 (got 2.5)`);
  });
});
