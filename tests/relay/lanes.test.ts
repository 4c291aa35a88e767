// Keyed lanes: a pipeline split into N lanes by a key, each lane its own consumer group and its own
// unit of ownership. Per-key order at the sink, lanes spread over relays (a fair share each, handed
// over when a relay stops), the lane of a message, and the configs that are refused with a reason.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { laneConfig, laneOf, fnv1a } from "../../core/engine/lanes.ts";
import { outboxMessage } from "../../core/message.ts";
import { committedMessages, lockHolders, recordingWebhook, RelayProcess, verifyDelivery } from "../support/chaos.ts";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { startRelay, waitFor } from "../support/relay.ts";
import type { Relay } from "../../core/relay.ts";

let db: TestDatabase;
const relays: Relay[] = [];
const processes: RelayProcess[] = [];

beforeAll(async () => {
  db = await createTestDatabase();
});
afterAll(async () => {
  await Promise.all(processes.map((p) => p.kill()));
  for (const relay of relays) await relay.stop();
  await db.drop();
});

const message = (payload: string, headers: Record<string, unknown> = {}) =>
  outboxMessage({ id: 1n, outbox: "o", topic: null, payload, headers, createdAt: new Date() });

/** Lanes' consumer groups of a pipeline's group, with their lag. */
async function laneLags(outbox: string, relayGroup: string): Promise<Map<string, bigint>> {
  const rows = await db.sql<{ group_name: string; lag: bigint }[]>`
    SELECT group_name, lag FROM tide.consumer_lag WHERE outbox_name = ${outbox} AND relay_group_id = ${relayGroup}`;
  return new Map(rows.map((r) => [r.group_name, r.lag]));
}

describe("the lane of a message", () => {
  it("is FNV-1a of the key's text modulo the lane count, the same for the same key", () => {
    expect(fnv1a("")).toBe(0x811c9dc5);
    expect(fnv1a("a")).toBe(0xe40c292c);
    expect(fnv1a("foobar")).toBe(0xbf9cf968);
    const key = laneConfig({ lanes: 8 }, "pipeline \"t\"").key;
    expect(laneOf(message("{}", { key: "customer-42" }), key, 8)).toBe(fnv1a("customer-42") % 8);
  });

  it("reads a payload path, numbers as their exact JSON text", () => {
    const key = laneConfig({ lanes: 64, lane_key: "payload.customer.id" }, "pipeline \"t\"").key;
    expect(laneOf(message('{"customer": {"id": 12345678901234567891}}'), key, 64)).toBe(fnv1a("12345678901234567891") % 64);
    expect(laneOf(message('{"customer": {"id": 1.50}}'), key, 64)).toBe(fnv1a("1.50") % 64);
    expect(laneOf(message('{"customer": {"id": "1.50"}}'), key, 64)).toBe(fnv1a("1.50") % 64);
  });

  it("puts a message without the key (missing or null) in lane 0", () => {
    const key = laneConfig({ lanes: 8, lane_key: "payload.customer_id" }, "pipeline \"t\"").key;
    expect(laneOf(message('{"other": 1}'), key, 8)).toBe(0);
    expect(laneOf(message('{"customer_id": null}'), key, 8)).toBe(0);
    expect(laneOf(message('"a string payload"'), key, 8)).toBe(0);
  });
});

describe("lane config", () => {
  it("names a bad 'lanes' or 'lane_key' with the value seen", () => {
    const where = 'pipeline "t"';
    for (const lanes of [0, 65, 2.5, "4", true]) {
      expect(() => laneConfig({ lanes }, where)).toThrow(`pipeline "t": 'lanes' must be a whole number from 1 to 64 (got ${JSON.stringify(lanes)})`);
    }
    for (const laneKey of ["key", "payload", "body.customer_id", "payload..a", 7]) {
      expect(() => laneConfig({ lanes: 4, lane_key: laneKey }, where)).toThrow(`pipeline "t": 'lane_key' must be a path like "headers.key"`);
    }
  });

  it("reports a bad lane setting as the pipeline's last_error, and runs the others", async () => {
    await db.sql`SELECT tide.outbox_create('bad-lanes')`;
    await db.sql`SELECT tide.relay_set_outbox('bad-lanes', 'bad-lanes', 'stdout', ${db.sql.json({ lanes: 100 })})`;
    await db.sql`SELECT tide.relay_set_outbox('bad-key', 'bad-lanes', 'stdout', ${db.sql.json({ lanes: 2, lane_key: "customer" })})`;
    const relay = await startRelay(db.url, { relayGroupId: "config" });
    try {
      const errors = await waitFor("both errors to be reported", async () => {
        const rows = await db.sql<{ pipeline: string; last_error: string }[]>`
          SELECT pipeline, last_error FROM tide.pipeline_status
           WHERE relay_group_id = 'config' AND lane = 0 AND last_error IS NOT NULL ORDER BY pipeline`;
        return rows.length === 2 && rows;
      });
      expect(errors[0].pipeline).toBe("bad-key");
      expect(errors[0].last_error).toContain(`'lane_key' must be a path like "headers.key" or "payload.customer_id" (got "customer")`);
      expect(errors[1].pipeline).toBe("bad-lanes");
      expect(errors[1].last_error).toContain("'lanes' must be a whole number from 1 to 64 (got 100)");
    } finally {
      await relay.stop();
    }
    await db.sql`SELECT tide.relay_delete(name) FROM tide.relay_pipelines WHERE name IN ('bad-lanes', 'bad-key')`;
  });
});

describe("lanes", () => {
  it("delivers every message, each key in publish order, over four lanes with their own positions", async () => {
    const sink = recordingWebhook();
    try {
      await db.sql`SELECT tide.outbox_create('orders')`;
      await db.sql`SELECT tide.relay_set_outbox('orders', 'orders', 'webhook',
        ${db.sql.json({ url: sink.url, lanes: 4, lane_key: "payload.key" })}, p_batch_size := 25)`;
      // 50 keys, and messages without a key (lane 0).
      await db.sql`INSERT INTO tide.outbox_messages (outbox, payload)
                   SELECT 'orders', jsonb_build_object('key', 'k' || (g % 50), 'seq', g) FROM generate_series(1, 1000) g`;
      await db.sql`INSERT INTO tide.outbox_messages (outbox, payload)
                   SELECT 'orders', jsonb_build_object('seq', g) FROM generate_series(1001, 1010) g`;
      const relay = await startRelay(db.url, { relayGroupId: "lanes" });
      relays.push(relay);
      await waitFor("every lane to be caught up", async () => {
        const lags = await laneLags("orders", "lanes");
        return lags.size === 4 && [...lags.values()].every((lag) => lag === 0n);
      }, 60_000);
      expect([...(await laneLags("orders", "lanes")).keys()].sort())
        .toEqual(["orders", "orders.lane-1-of-4", "orders.lane-2-of-4", "orders.lane-3-of-4"]);
      expect(relay.coordinator.owned().filter((p) => p.name === "orders").map((p) => p.lane).sort()).toEqual([0, 1, 2, 3]);

      const sent = (await committedMessages(db.sql, ["orders"])).map((m) => ({ ...m, key: m.key ?? "none" }));
      const verdict = verifyDelivery(sent, sink.arrivals.map((a) => ({ ...a, body: keyed(a.body) })));
      expect(verdict.missing).toEqual([]);
      expect(verdict.outOfOrder).toEqual([]);
      expect(verdict.altered).toEqual([]);
      expect(verdict.duplicates).toBe(0);

      // The status shows each lane with its group and lag.
      const status = await db.sql`
        SELECT lane, lanes, consumer_group, lag, owner_id IS NOT NULL AS owned FROM tide.pipeline_status
         WHERE pipeline = 'orders' AND relay_group_id = 'lanes' ORDER BY lane`;
      expect(status.map((r) => [r.lane, r.lanes, r.consumer_group, r.lag, r.owned])).toEqual([
        [0, 4, "orders", 0n, true],
        [1, 4, "orders.lane-1-of-4", 0n, true],
        [2, 4, "orders.lane-2-of-4", 0n, true],
        [3, 4, "orders.lane-3-of-4", 0n, true],
      ]);
      // Lane groups are read by their pipeline: not listed as unread.
      await db.sql`INSERT INTO tide.outbox_messages (outbox, payload) VALUES ('orders', '{"key": "k1", "seq": 2000}')`;
      const unread = await db.sql`SELECT group_name FROM tide.unread_consumer_groups WHERE outbox_name = 'orders'`;
      expect(unread.length).toBe(0);
    } finally {
      sink.stop();
    }
  }, 90_000);

  it("keeps delivering lanes made before schema version 15 (the relay picks its lane's messages), every key in order", async () => {
    const sink = recordingWebhook();
    try {
      await db.sql`SELECT tide.outbox_create('legacy')`;
      // Created disabled: the relay of the first test (relay group "lanes") is running.
      await db.sql`SELECT tide.relay_set_outbox('legacy', 'legacy', 'webhook',
                                                ${db.sql.json({ url: sink.url, lanes: 3, lane_key: "payload.key" })},
                                                p_batch_size := 20, p_enabled := false)`;
      await db.sql`INSERT INTO tide.outbox_messages (outbox, payload)
                   SELECT 'legacy', jsonb_build_object('key', 'k' || (g % 17), 'seq', g) FROM generate_series(1, 300) g`;
      // The groups a relay of schema version 14 made: no lane filter recorded.
      await db.sql`SELECT tide.consumer_lanes_ensure('legacy', 'legacy', 3, 'lanes')`;
      await db.sql`SELECT tide.relay_enable('legacy')`;
      await waitFor("every lane to be caught up", async () => {
        const lags = await laneLags("legacy", "lanes");
        return lags.size === 3 && [...lags.values()].every((lag) => lag === 0n);
      }, 60_000);
      await db.sql`SELECT tide.relay_disable('legacy')`;
      const sent = (await committedMessages(db.sql, ["legacy"])).map((m) => ({ ...m, key: m.key ?? "none" }));
      const verdict = verifyDelivery(sent, sink.arrivals.map((a) => ({ ...a, body: keyed(a.body) })));
      expect(verdict.missing).toEqual([]);
      expect(verdict.outOfOrder).toEqual([]);
      expect(verdict.duplicates).toBe(0);
      // Still the relay's rule: no filter was put on groups whose positions were made without one.
      const [{ filters }] = await db.sql`SELECT count(lane_filter) AS filters FROM tide.consumer_groups WHERE outbox_name = 'legacy'`;
      expect(filters).toBe(0n);
    } finally {
      sink.stop();
    }
  }, 90_000);

  it("refuses to change the lanes or lane key of a pipeline whose lanes ran, naming what to do instead", async () => {
    const change = (config: Record<string, unknown>) =>
      db.sql`SELECT tide.relay_set_outbox('orders', 'orders', 'webhook', ${db.sql.json({ url: "http://127.0.0.1:9/hook", ...config })})`;
    await expect(change({ lanes: 8, lane_key: "payload.key" })).rejects.toThrow(
      `pipeline "orders": changing 'lanes' from 4 to 8 of a pipeline whose lanes ran is refused`);
    await expect(change({ lanes: 4, lane_key: "headers.key" })).rejects.toThrow(
      `pipeline "orders": changing 'lane_key' from "payload.key" to "headers.key" of a pipeline whose lanes ran is refused`);
    const error = await change({ lanes: 1 }).catch((e) => e);
    expect(error.hint).toContain("create a new pipeline with a new consumer group");
  });

  it("reports lanes that ran with another count as last_error, when the pipeline was deleted and created again", async () => {
    const [{ lanes }] = await db.sql`SELECT config->'lanes' AS lanes FROM tide.relay_pipelines WHERE name = 'orders'`;
    expect(lanes).toBe(4);
    await db.sql`SELECT tide.relay_delete('orders')`; // keeps the consumer groups
    await db.sql`SELECT tide.relay_set_outbox('orders', 'orders', 'stdout', ${db.sql.json({ lanes: 2 })})`;
    const [row] = await waitFor("the refusal to be reported", async () => {
      const rows = await db.sql<{ last_error: string }[]>`
        SELECT last_error FROM tide.relay_pipeline_state
         WHERE pipeline = 'orders' AND relay_group_id = 'lanes' AND last_error LIKE '%lanes%'`;
      return rows.length > 0 && rows;
    });
    expect(row.last_error).toContain('consumer group "orders" on outbox "orders" ran with 4 lanes; changing the number of lanes to 2 is refused');
    expect(row.last_error).toContain("create a new pipeline with a new consumer group");
    await db.sql`SELECT tide.relay_delete('orders')`;
  }, 30_000);
});

describe("lanes over several relays", () => {
  it("gives no relay more than its fair share, and hands a stopped relay's lanes to the others within 5 s", async () => {
    for (const relay of relays.splice(0)) await relay.stop();
    await db.sql`SELECT tide.outbox_create('spread')`;
    await db.sql`SELECT tide.relay_set_outbox('spread', 'spread', 'stdout', ${db.sql.json({ lanes: 8 })})`;
    const units = Array.from({ length: 8 }, (_, lane) => `spread#${lane}`);
    const args = ["--relay-group-id", "spread", "--reconcile-interval-ms", "500"];
    const started = [0, 1, 2].map(() => new RelayProcess(db.url, args));
    processes.push(...started);
    await Promise.all(started.map((p) => p.started()));

    const perBackend = (holders: Map<string, number[]>) => {
      const counts = new Map<number, number>();
      for (const pids of holders.values()) for (const pid of pids) counts.set(pid, (counts.get(pid) ?? 0) + 1);
      return counts;
    };
    const spread = await waitFor("8 lanes owned, at most 3 by any relay", async () => {
      const holders = await lockHolders(db.sql, "spread", units);
      const counts = perBackend(holders);
      return holders.size === 8 && [...holders.values()].every((pids) => pids.length === 1) &&
        counts.size === 3 && [...counts.values()].every((n) => n <= 3) && counts;
    }, 30_000);
    expect([...spread.values()].sort()).toEqual([2, 3, 3]);

    started[0].child.kill("SIGTERM");
    expect(await started[0].exited).toBe(0);
    const after = await waitFor("the two others to own all 8 lanes", async () => {
      const holders = await lockHolders(db.sql, "spread", units);
      return holders.size === 8 && perBackend(holders);
    }, 5_000);
    expect([...after.values()].sort()).toEqual([4, 4]);
  }, 90_000);
});

/** The webhook body with "key" filled in for messages published without one (as committedMessages reports them). */
function keyed(body: string): string {
  const parsed = JSON.parse(body);
  return JSON.stringify({ ...parsed, key: parsed.key ?? "none" });
}
