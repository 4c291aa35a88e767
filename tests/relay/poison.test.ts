// Per-key poison isolation (isolate_poison): a message that keeps failing is parked with the later
// messages of its key, every other key keeps flowing, and once the poison message is dead-lettered
// its key's parked messages follow in order.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { startRelay, waitFor } from "../support/relay.ts";
import type { Relay } from "../../core/relay.ts";

let db: TestDatabase;
let relay: Relay | undefined;

beforeAll(async () => {
  db = await createTestDatabase();
});
afterAll(async () => {
  await relay?.stop();
  await db.drop();
});

const KEYS = ["A", "B", "C", "K"];
const ROUNDS = 20;
const POISON = { key: "K", seq: 2 };

describe("poison isolation", () => {
  it("parks a failing message with its key's later ones, delivers every other key, then releases the key in order", async () => {
    // Every request in arrival order, the refused ones too; the poison message is always refused.
    const log: { key: string; seq: number; ok: boolean }[] = [];
    const server = Bun.serve({
      hostname: "127.0.0.1",
      port: 0,
      async fetch(request) {
        const { key, seq } = await request.json();
        const ok = !(key === POISON.key && seq === POISON.seq);
        log.push({ key, seq, ok });
        return ok ? new Response(null, { status: 204 }) : new Response("unprocessable", { status: 422 });
      },
    });
    try {
      await db.sql`SELECT tide.outbox_create('poison')`;
      await db.sql`SELECT tide.relay_set_outbox('poison', 'poison', 'webhook', ${db.sql.json({
        url: `http://127.0.0.1:${server.port}/hook`,
        retry_client_errors: true, // a 422 is the message's own failure: it spends attempts
        isolate_poison: true,
        lanes: 2,
        lane_key: "payload.key",
        retry: { max_attempts: 3, initial_backoff_ms: 2_500, max_backoff_ms: 5_000 }, // K stays parked ~7.5 s: time for the checks below
      })}, p_batch_size := 10)`;
      await db.sql`INSERT INTO tide.outbox_messages (outbox, payload)
                   SELECT 'poison', jsonb_build_object('key', k, 'seq', r)
                     FROM generate_series(1, ${ROUNDS}) r, unnest(${KEYS}::text[]) k ORDER BY r, k`;
      relay = await startRelay(db.url, { relayGroupId: "poison", metricsAddr: "127.0.0.1:0" });
      const page = async () => await (await fetch(`http://127.0.0.1:${relay!.httpPort}/`)).text();

      const delivered = (key: string) => log.filter((a) => a.ok && a.key === key).map((a) => a.seq);
      // While K is parked (visible in pipeline_status), every other key is delivered in full.
      await waitFor("the other keys delivered while K is parked", async () => {
        const [{ held }] = await db.sql<{ held: number }[]>`
          SELECT sum(held)::int AS held FROM tide.pipeline_status WHERE pipeline = 'poison' AND relay_group_id = 'poison'`;
        // ... and on the status page, on the row of K's lane.
        const shown = /data-held="[1-9]\d*"/.test(await page());
        return held > 0 && shown && ["A", "B", "C"].every((key) => delivered(key).length === ROUNDS);
      }, 30_000);
      const html = await page();
      expect(html).toContain("lane 1 of 2");
      expect(html).toContain("lane 2 of 2");
      expect(relay.coordinator.owned().filter((p) => p.name === "poison").length).toBe(2); // both lanes
      expect(delivered("K")).toEqual([1]); // K's later messages wait behind the poison one
      const metrics = await relay.metrics.registry.metrics();
      expect(Number(/pg_tide_relay_held_messages\{pipeline="poison"\} (\d+)/.exec(metrics)?.[1])).toBeGreaterThan(0);

      // After its attempts, the poison message is dead-lettered and K's parked messages follow in order.
      await waitFor("K's later messages to follow", () => delivered("K").length === ROUNDS - 1, 30_000);
      for (const key of ["A", "B", "C"]) expect(delivered(key)).toEqual(Array.from({ length: ROUNDS }, (_, i) => i + 1));
      expect(delivered("K")).toEqual(Array.from({ length: ROUNDS }, (_, i) => i + 1).filter((seq) => seq !== POISON.seq));
      const attempts = log.filter((a) => !a.ok);
      expect(attempts.length).toBe(3);
      const lastAttempt = log.lastIndexOf(attempts[2]);
      const firstLaterK = log.findIndex((a) => a.ok && a.key === "K" && a.seq > POISON.seq);
      expect(firstLaterK).toBeGreaterThan(lastAttempt);

      const dlq = await db.sql`SELECT payload, attempts FROM tide.relay_dlq WHERE pipeline = 'poison'`;
      expect(dlq.map((d) => [d.payload, d.attempts])).toEqual([[{ key: "K", seq: 2 }, 3]]);
      await waitFor("the key to be released", async () => {
        const [{ held }] = await db.sql<{ held: number }[]>`SELECT count(*)::int AS held FROM tide.relay_held WHERE pipeline = 'poison'`;
        return held === 0;
      });
      const [{ lag }] = await db.sql`SELECT sum(lag)::int AS lag FROM tide.pipeline_status WHERE pipeline = 'poison' AND relay_group_id = 'poison'`;
      expect(lag).toBe(0);
    } finally {
      server.stop(true);
    }
  }, 60_000);
});
