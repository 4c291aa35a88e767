// The relay delivering outbox messages: gap-free under concurrency, positions written after the
// sink acknowledged, filters, hot reload of pipeline configs.

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
  dir = await mkdtemp(join(tmpdir(), "tide-forward-"));
  relay = await startRelay(db.url);
});
afterAll(async () => {
  await relay.stop();
  await db.drop();
});

async function filePipeline(name: string, outbox: string, extra: Record<string, unknown> = {}): Promise<string> {
  const path = join(dir, `${name}.jsonl`);
  await db.sql`SELECT tide.outbox_create_if_not_exists(${outbox})`;
  await db.sql`SELECT tide.relay_set_outbox(${name}, ${outbox}, 'file', ${db.sql.json({ path, ...extra } as any)})`;
  return path;
}

const ids = (lines: any[]) => lines.map((line) => BigInt(line.id));

describe("forward delivery", () => {
  it("delivers a lower id that commits after a higher one, skipping nothing", async () => {
    const path = await filePipeline("late", "late");
    const early = await db.sql.reserve();
    try {
      await early`BEGIN`;
      const [{ id: lowId }] = await early<{ id: bigint }[]>`SELECT tide.outbox_publish('late', '{"n": 1}'::jsonb) AS id`;
      const [{ id: highId }] = await db.sql<{ id: bigint }[]>`SELECT tide.outbox_publish('late', '{"n": 2}'::jsonb) AS id`;
      await waitFor("the committed higher id", async () => (await readJsonl(path)).length === 1);
      await early`COMMIT`;
      const lines = await waitFor("both messages", async () => {
        const lines = await readJsonl(path);
        return lines.length === 2 && lines;
      });
      expect(ids(lines)).toEqual([highId, lowId]);
      expect(lines.map((l) => l.dedup_key)).toEqual([`late:${highId}`, `late:${lowId}`]);
    } finally {
      early.release();
    }
  });

  it("keeps delivering while an idle-in-transaction publisher holds back only its own message", async () => {
    const path = await filePipeline("idle", "idle");
    const idle = await db.sql.reserve();
    try {
      await idle`BEGIN`;
      const [{ id: idleId }] = await idle<{ id: bigint }[]>`SELECT tide.outbox_publish('idle', '{"idle": true}'::jsonb) AS id`;
      const later: bigint[] = [];
      for (let i = 0; i < 20; i++) {
        const [{ id }] = await db.sql<{ id: bigint }[]>`SELECT tide.outbox_publish('idle', ${db.sql.json({ i })}) AS id`;
        later.push(id);
      }
      const lines = await waitFor("the 20 committed messages", async () => {
        const lines = await readJsonl(path);
        return lines.length === 20 && lines;
      });
      expect(ids(lines)).toEqual(later);
      await idle`COMMIT`;
      const all = await waitFor("the idle message", async () => {
        const lines = await readJsonl(path);
        return lines.length === 21 && lines;
      });
      expect(ids(all).at(-1)).toBe(idleId);
    } finally {
      idle.release();
    }
  });

  it("never makes a publisher wait, even while a batch is being delivered", async () => {
    // A sink that never acknowledges: the relay holds a batch in flight indefinitely.
    const server = Bun.serve({ port: 0, fetch: () => new Promise<Response>(() => {}) });
    try {
      await db.sql`SELECT tide.outbox_create('busy')`;
      await db.sql`SELECT tide.relay_set_outbox('busy', 'busy', 'webhook',
                    ${db.sql.json({ url: `http://127.0.0.1:${server.port}/`, timeout_ms: 60_000 })})`;
      await db.sql`SELECT tide.outbox_publish('busy', '{"first": true}'::jsonb)`;
      await waitFor("the relay to hold a batch in flight", async () => {
        const [row] = await db.sql`SELECT high IS NOT NULL AS open FROM tide.consumer_groups WHERE group_name = 'busy'`;
        return row?.open;
      });
      // Publishing commits under a short lock timeout: any wait on the relay would fail it.
      const publisher = await db.sql.reserve();
      try {
        await publisher`SET lock_timeout = '2s'`;
        await publisher`SET statement_timeout = '5s'`;
        for (let i = 0; i < 50; i++) {
          await publisher`BEGIN`;
          await publisher`SELECT tide.outbox_publish('busy', ${db.sql.json({ i })})`;
          await publisher`COMMIT`;
        }
      } finally {
        publisher.release();
      }
      const [{ n }] = await db.sql`SELECT count(*)::int AS n FROM tide.outbox_messages WHERE outbox = 'busy'`;
      expect(n).toBe(51);
    } finally {
      await db.sql`SELECT tide.relay_disable('busy')`;
      server.stop(true);
    }
  });

  it("writes the position only after the sink acknowledged", async () => {
    let release!: () => void;
    const gate = new Promise<void>((resolve) => (release = resolve));
    const received: unknown[] = [];
    const server = Bun.serve({
      port: 0,
      fetch: async (request) => {
        received.push(await request.json());
        await gate;
        return new Response("ok");
      },
    });
    try {
      await db.sql`SELECT tide.outbox_create('ack')`;
      await db.sql`SELECT tide.relay_set_outbox('ack', 'ack', 'webhook', ${db.sql.json({ url: `http://127.0.0.1:${server.port}/` })})`;
      await db.sql`SELECT tide.outbox_publish('ack', '{"n": 1}'::jsonb)`;
      await waitFor("the request to arrive", () => received.length === 1);
      const [before] = await db.sql`SELECT lag FROM tide.consumer_lag WHERE group_name = 'ack'`;
      expect(before.lag).toBe(1n);
      release();
      await waitFor("the position to move", async () => {
        const [after] = await db.sql`SELECT lag FROM tide.consumer_lag WHERE group_name = 'ack'`;
        return after.lag === 0n;
      });
    } finally {
      server.stop(true);
    }
  });

  it("passes only messages matching the CEL filter, and moves past the others", async () => {
    const path = await filePipeline("filtered", "filtered", { transform: { filter: "payload.event_type == 'order.created'" } });
    await db.sql`SELECT tide.outbox_publish('filtered', '{"event_type": "order.created", "n": 1}'::jsonb)`;
    await db.sql`SELECT tide.outbox_publish('filtered', '{"event_type": "order.cancelled", "n": 2}'::jsonb)`;
    await db.sql`SELECT tide.outbox_publish('filtered', '{"event_type": "order.created", "n": 3}'::jsonb)`;
    await waitFor("the position to pass all three", async () => {
      const [row] = await db.sql`SELECT lag FROM tide.consumer_lag WHERE group_name = 'filtered'`;
      return row.lag === 0n;
    });
    expect((await readJsonl(path)).map((line) => line.payload.n)).toEqual([1, 3]);
  });

  it("applies relay_set_outbox to a running relay without a restart", async () => {
    const first = await filePipeline("moving", "moving");
    await db.sql`SELECT tide.outbox_publish('moving', '{"n": 1}'::jsonb)`;
    await waitFor("the first message in the first file", async () => (await readJsonl(first)).length === 1);
    const second = join(dir, "moving-2.jsonl");
    await db.sql`SELECT tide.relay_set_outbox('moving', 'moving', 'file', ${db.sql.json({ path: second })})`;
    await waitFor("the worker to restart with the new config", async () => {
      const [row] = await db.sql`SELECT acquired_at > updated_at AS restarted FROM tide.relay_pipeline_state s
                                   JOIN tide.relay_pipelines p ON p.name = s.pipeline WHERE p.name = 'moving'`;
      return row?.restarted;
    });
    await db.sql`SELECT tide.outbox_publish('moving', '{"n": 2}'::jsonb)`;
    await waitFor("the second message in the second file", async () => (await readJsonl(second)).length === 1);
    expect((await readJsonl(first)).length).toBe(1);
  });

  it("keeps other pipelines running when one has a broken config", async () => {
    await db.sql`SELECT tide.outbox_create('broken')`;
    // Valid for the catalog (url present), invalid for the plugin (unknown key).
    await db.sql`SELECT tide.relay_set_outbox('broken', 'broken', 'webhook', '{"url": "http://127.0.0.1:1/", "bogus": 1}'::jsonb)`;
    const path = await filePipeline("healthy", "healthy");
    await db.sql`SELECT tide.outbox_publish('healthy', '{"ok": true}'::jsonb)`;
    await waitFor("the healthy pipeline to deliver", async () => (await readJsonl(path)).length === 1);
    const [state] = await waitFor("the broken pipeline's error", async () =>
      (await db.sql`SELECT healthy, last_error FROM tide.relay_pipeline_state WHERE pipeline = 'broken' AND last_error IS NOT NULL`)
        .length && db.sql`SELECT healthy, last_error FROM tide.relay_pipeline_state WHERE pipeline = 'broken'`);
    expect(state.healthy).toBe(false);
    expect(state.last_error).toContain("bogus");
  });
});
