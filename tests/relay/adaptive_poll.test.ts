// Without NOTIFY, a pipeline learns of new messages from the relay's shared probe, which checks a
// pipeline that was just busy every few milliseconds: a message that follows a busy moment is
// delivered without waiting out the poll interval, however long it is. And a backlog read ahead
// batch by batch is still delivered whole, in order, once each, even when a batch in flight is
// refused (a rewind) and the batch read ahead of it must be dropped.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Relay } from "../../core/relay.ts";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { heldWebhook, readJsonl, startRelay, waitFor } from "../support/relay.ts";

let db: TestDatabase;
let relay: Relay;
let dir: string;

beforeAll(async () => {
  db = await createTestDatabase();
  dir = await mkdtemp(join(tmpdir(), "tide-adaptive-"));
  // A poll interval far longer than any wait below: only the probe can find the messages in time.
  relay = await startRelay(db.url, { pollIntervalMs: 600_000, reconcileIntervalMs: 200 });
});
afterAll(async () => {
  await relay.stop();
  await db.drop();
});

const worker = (name: string) => relay.coordinator.owned().find((p) => p.name === name);

describe("the shared probe", () => {
  it("delivers a message published without NOTIFY right after a busy moment, long before the poll interval", async () => {
    const path = join(dir, "busy.jsonl");
    await db.sql`SELECT tide.outbox_create('busy')`;
    await db.sql`SELECT tide.outbox_publish('busy', '{"n": 1}'::jsonb)`;
    await db.sql`SELECT tide.relay_set_outbox('busy', 'busy', 'file', ${db.sql.json({ path })})`;
    await waitFor("the first message", async () => (await readJsonl(path)).length === 1);
    // Delivered, acknowledged, read again and found nothing: the worker now waits, and its poll
    // interval is ten minutes.
    await waitFor("the worker to wait after its delivery", () => worker("busy")?.status.delivered === 1 && worker("busy")?.status.waiting);

    await db.sql`SELECT tide.outbox_publish('busy', '{"n": 2}'::jsonb)`;
    const lines = await waitFor("the second message", async () => {
      const lines = await readJsonl(path);
      return lines.length === 2 && lines;
    });
    expect(lines.map((l) => l.payload.n)).toEqual([1, 2]);
  });

  it("keeps finding messages for several pipelines at once, each in order", async () => {
    const names = ["multi_a", "multi_b", "multi_c"];
    for (const name of names) {
      await db.sql`SELECT tide.outbox_create(${name})`;
      await db.sql`SELECT tide.outbox_publish(${name}, '{"n": 0}'::jsonb)`;
      await db.sql`SELECT tide.relay_set_outbox(${name}, ${name}, 'file', ${db.sql.json({ path: join(dir, `${name}.jsonl`) })})`;
    }
    await waitFor("every pipeline busy once, then waiting", () => names.every((n) => worker(n)?.status.delivered === 1 && worker(n)?.status.waiting));
    for (let n = 1; n <= 5; n++) {
      for (const name of names) await db.sql`SELECT tide.outbox_publish(${name}, ${db.sql.json({ n })})`;
    }
    for (const name of names) {
      const lines = await waitFor(`all six messages of ${name}`, async () => {
        const lines = await readJsonl(join(dir, `${name}.jsonl`));
        return lines.length === 6 && lines;
      });
      expect(lines.map((l) => l.payload.n)).toEqual([0, 1, 2, 3, 4, 5]);
    }
  });
});

describe("reading ahead", () => {
  it("delivers a backlog of many batches whole, in order, each message once", async () => {
    const path = join(dir, "backlog.jsonl");
    await db.sql`SELECT tide.outbox_create('backlog')`;
    await db.sql`INSERT INTO tide.outbox_messages (outbox, payload) SELECT 'backlog', jsonb_build_object('n', g) FROM generate_series(1, 1050) g`;
    await db.sql`SELECT tide.relay_set_outbox('backlog', 'backlog', 'file', ${db.sql.json({ path })}, p_batch_size := 100)`;
    // The file holds a batch before its acknowledgement commits: wait for both (lag 0 after the lines).
    const lines = await waitFor("the whole backlog, acknowledged", async () => {
      const lines = await readJsonl(path);
      if (lines.length < 1050) return false;
      const [row] = await db.sql`SELECT lag FROM tide.consumer_lag WHERE outbox_name = 'backlog'`;
      return row?.lag === 0n && lines;
    }, 60_000);
    expect(lines.map((l) => l.payload.n)).toEqual(Array.from({ length: 1050 }, (_, i) => i + 1));
  });

  it("drops the batch read ahead when the batch in flight is refused (a rewind), and delivers again from the rewind", async () => {
    const hook = heldWebhook();
    try {
      await db.sql`SELECT tide.outbox_create('rewound')`;
      await db.sql`INSERT INTO tide.outbox_messages (outbox, payload) SELECT 'rewound', jsonb_build_object('n', g) FROM generate_series(1, 30) g`;
      await db.sql`SELECT tide.relay_set_outbox('rewound', 'rewound', 'webhook', ${db.sql.json({ url: hook.url, mode: "batch" })},
                                                p_batch_size := 10)`;
      await hook.arrived; // the first batch is in flight; the second is read ahead meanwhile
      const [group] = await db.sql`SELECT consumer_group FROM tide.relay_pipelines WHERE name = 'rewound'`;
      await db.sql`SELECT tide.consumer_group_rewind(${group!.consumer_group}, 'rewound', p_to_id := 0, p_force := true)`;
      hook.release();
      // The first batch's acknowledgement is refused (the rewind moved the position), so the batch
      // read ahead of it is never delivered on that fence: everything comes again from the start.
      await waitFor("lag 0 after the rewind", async () => {
        const [{ lag }] = await db.sql`SELECT lag FROM tide.consumer_lag WHERE outbox_name = 'rewound'`;
        return lag === 0n && hook.keys.length >= 4;
      }, 30_000);
      // Requests: the first batch (refused), then batches 1, 2, 3 from the rewind; never batch 2
      // before batch 1 has been delivered again.
      const firstIds = hook.keys.map((key) => key.split("..")[0]);
      expect(firstIds[0]).toBe(firstIds[1]);
      expect(new Set(firstIds.slice(1)).size).toBe(firstIds.length - 1);
    } finally {
      hook.stop();
    }
  });
});
