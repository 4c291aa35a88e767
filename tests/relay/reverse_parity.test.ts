// The reverse worker keeps the forward worker's promises: stopping honours the drain timeout even
// when a source ignores its abort, an error returning a batch to the source is reported rather than
// swallowed, and a batch is acknowledged to the source only after its inbox commit.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import type { PluginDefinition, SourceBatch } from "../../core/plugin.ts";
import { PluginRegistry } from "../../core/plugins.ts";
import { builtinPlugins } from "../../plugins/registry.ts";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { captureLogger, startRelay, waitFor } from "../support/relay.ts";

let db: TestDatabase;

beforeAll(async () => {
  db = await createTestDatabase();
});
afterAll(async () => {
  await db.drop();
});

/** A source scripted by the test: `next` decides what each read() returns. */
function scriptedSource(type: string, next: () => Promise<SourceBatch | null>): PluginDefinition {
  return {
    type,
    kind: "source",
    summary: "test source",
    config: {
      "~standard": { version: 1, vendor: "test", validate: (value: unknown) => ({ value }) },
    },
    example: {},
    create: () => ({ connect: async () => {}, read: next, close: async () => {} }),
  } as unknown as PluginDefinition;
}

describe("reverse worker", () => {
  it("stops within the drain timeout when the source ignores its abort", async () => {
    const reading = Promise.withResolvers<void>();
    const registry = new PluginRegistry([...builtinPlugins, scriptedSource("deaf", () => {
      reading.resolve();
      return new Promise(() => {}); // never answers, never looks at ctx.signal
    })]);
    const { logger, lines } = captureLogger();
    const relay = await startRelay(db.url, { registry, logger, relayGroupId: "deaf", drainTimeoutMs: 100 });
    await db.sql`SELECT tide.inbox_create('deaf_in')`;
    await db.sql`SELECT tide.relay_set_inbox('deaf', 'deaf_in', '{}'::jsonb, 'deaf')`;
    await reading.promise;
    await relay.stop(); // used to wait for the source forever
    expect(lines.some((line) => line.includes("the source did not stop when aborted"))).toBe(true);
  }, 30_000);

  it("reports a failure to return a batch to the source, and acknowledges nothing it did not commit", async () => {
    let acks = 0;
    let reads = 0;
    const registry = new PluginRegistry([...builtinPlugins, scriptedSource("nacky", async () => {
      reads += 1;
      if (reads > 3) return await new Promise(() => {});
      return {
        messages: [{ eventId: `e-${reads}`, transportId: String(reads), payload: { n: reads }, headers: {}, source: "test" }],
        ack: async () => void (acks += 1),
        nack: async () => {
          throw new Error("the broker connection is gone");
        },
      } as SourceBatch;
    })]);
    const { logger, lines } = captureLogger();
    await db.sql`SELECT tide.inbox_create('nacky_in')`;
    const [{ table }] = await db.sql`SELECT tide.inbox_table('nacky_in') AS table`;
    // Every insert into the inbox fails.
    await db.sql.unsafe(`ALTER TABLE tide.${table} ADD CONSTRAINT refuse_all CHECK (event_id = 'never') NOT VALID`);
    const relay = await startRelay(db.url, { registry, logger, relayGroupId: "nacky", drainTimeoutMs: 100 });
    try {
      await db.sql`SELECT tide.relay_set_inbox('nacky', 'nacky_in', ${db.sql.json({ retry: { initial_backoff_ms: 5, max_backoff_ms: 10 } })}, 'nacky')`;
      await waitFor("three failed writes", () => reads >= 3);
      await waitFor("the nack failure in the log", () =>
        lines.some((line) => line.includes("returning the batch to the source failed") && line.includes("the broker connection is gone")));
      expect(acks).toBe(0);
    } finally {
      await relay.stop();
    }
  }, 30_000);
});
