// Wake-up on LISTEN: with the fallback poll set to ten minutes, a message published to an outbox
// created with p_notify is delivered at once, because its NOTIFY wakes the pipeline's worker.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Relay } from "../../core/relay.ts";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { readJsonl, startRelay, waitFor } from "../support/relay.ts";

let db: TestDatabase;
let relay: Relay;
let path: string;

beforeAll(async () => {
  db = await createTestDatabase();
  path = join(await mkdtemp(join(tmpdir(), "tide-wakeup-")), "woken.jsonl");
  await db.sql`SELECT tide.outbox_create('woken', p_notify := true)`;
  await db.sql`SELECT tide.relay_set_outbox('woken', 'woken', 'file', ${db.sql.json({ path })})`;
  relay = await startRelay(db.url, { pollIntervalMs: 600_000, reconcileIntervalMs: 600_000 });
});
afterAll(async () => {
  await relay.stop();
  await db.drop();
});

describe("LISTEN wake-up", () => {
  it("delivers a notifying outbox's message while the worker sleeps out a ten-minute poll", async () => {
    await db.sql`SELECT tide.outbox_publish('woken', '{"n": 1}'::jsonb)`;
    await waitFor("the first message", async () => (await readJsonl(path)).length === 1);
    // Once it has acknowledged that one and read again (finding nothing), the worker sleeps: only
    // a wake-up can make it read again within the next ten minutes.
    const worker = relay.coordinator.owned().find((p) => p.name === "woken")!;
    await waitFor("the worker to wait after its delivery", () => worker.status.delivered === 1 && worker.status.waiting);

    await db.sql`SELECT tide.outbox_publish('woken', '{"n": 2}'::jsonb)`;
    const lines = await waitFor("the second message", async () => {
      const lines = await readJsonl(path);
      return lines.length === 2 && lines;
    });
    expect(lines.map((l) => l.payload.n)).toEqual([1, 2]);
  });
});
