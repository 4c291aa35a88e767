// Operating the relay: the pipeline cap, SIGHUP, pausing on an undeliverable message, the circuit
// breaker, and the inbox sink (outbox → inbox in this or another database).

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import type { Relay } from "../../core/relay.ts";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { spawnRelay, startRelay, waitFor } from "../support/relay.ts";

let db: TestDatabase;
const relays: Relay[] = [];
beforeAll(async () => void (db = await createTestDatabase()));
afterAll(async () => {
  for (const relay of relays) await relay.stop();
  await db.drop();
});

async function start(options: Parameters<typeof startRelay>[1] = {}): Promise<Relay> {
  const relay = await startRelay(db.url, options);
  relays.push(relay);
  return relay;
}

async function lag(group: string, relayGroup = "default"): Promise<bigint> {
  const [row] = await db.sql`SELECT lag FROM tide.consumer_lag WHERE group_name = ${group} AND relay_group_id = ${relayGroup}`;
  return row.lag;
}

describe("ownership cap", () => {
  it("never owns more pipelines than --max-pipelines; another relay takes the rest", async () => {
    for (const name of ["cap-a", "cap-b", "cap-c"]) {
      await db.sql`SELECT tide.outbox_create(${name})`;
      await db.sql`SELECT tide.relay_set_outbox(${name}, ${name}, 'stdout', '{}'::jsonb, p_enabled := false)`;
    }
    const first = await start({ relayGroupId: "cap", maxPipelines: 2 });
    await db.sql`UPDATE tide.relay_pipelines SET enabled = true, updated_at = now() WHERE name LIKE 'cap-%'`;
    await first.coordinator.reconcile();
    expect(first.coordinator.owned().filter((p) => p.name.startsWith("cap-")).length).toBe(2);
    const second = await start({ relayGroupId: "cap", maxPipelines: 2 });
    await waitFor("the second relay to take the third", () =>
      second.coordinator.owned().filter((p) => p.name.startsWith("cap-")).length === 1);
    expect(first.coordinator.owned().filter((p) => p.name.startsWith("cap-")).length).toBe(2);
    // Relays of this group would run the later tests' pipelines too.
    for (const relay of relays.splice(0)) await relay.stop();
  });
});

describe("SIGHUP", () => {
  it("re-reads the catalog at once, even without a NOTIFY", async () => {
    await db.sql`SELECT tide.outbox_create('hup')`;
    const child = spawnRelay(db.url, ["--relay-group-id", "hup", "--reconcile-interval-ms", "600000"]);
    let log = "";
    const decoder = new TextDecoder();
    void (async () => {
      for await (const chunk of child.stderr as unknown as AsyncIterable<Uint8Array>) log += decoder.decode(chunk);
    })();
    try {
      await waitFor("the relay to start", () => log.includes("relay started"));
      // Written behind the API's back: no NOTIFY, so only SIGHUP (or the ten-minute interval) finds it.
      await db.sql`INSERT INTO tide.consumer_groups (outbox_name, group_name, low) VALUES ('hup', 'hup', tide.empty_snapshot())`;
      await db.sql`INSERT INTO tide.relay_pipelines (name, direction, outbox_name, consumer_group, plugin_type, config)
                   VALUES ('hup', 'forward', 'hup', 'hup', 'stdout', '{}')`;
      child.kill("SIGHUP");
      await waitFor("the pipeline to be owned after SIGHUP", async () => (await fetchState("hup")).some((r) => r.pipeline === "hup"));
      expect(log).toContain("SIGHUP: reloading pipelines");
    } finally {
      child.kill("SIGTERM");
      await child.exited;
    }
  }, 30_000);
});

async function fetchState(relayGroup: string) {
  return await db.sql`SELECT pipeline FROM tide.relay_pipeline_state WHERE relay_group_id = ${relayGroup} AND owner_id IS NOT NULL`;
}

describe("failures", () => {
  it("pauses at an undeliverable message with on_failure = pause, and resumes when the config changes", async () => {
    const received: number[] = [];
    const server = Bun.serve({
      port: 0,
      async fetch(request) {
        const body = await request.json();
        if (body.poison) return new Response("no", { status: 400 });
        received.push(body.n);
        return new Response("ok");
      },
    });
    try {
      const url = `http://127.0.0.1:${server.port}/`;
      await start();
      await db.sql`SELECT tide.outbox_create('paused')`;
      await db.sql`SELECT tide.relay_set_outbox('paused', 'paused', 'webhook', ${db.sql.json({ url, on_failure: "pause" })})`;
      await db.sql`SELECT tide.outbox_publish('paused', '{"n": 1}'::jsonb)`;
      await db.sql`SELECT tide.outbox_publish('paused', '{"n": 2, "poison": true}'::jsonb)`;
      await db.sql`SELECT tide.outbox_publish('paused', '{"n": 3}'::jsonb)`;
      await waitFor("the pipeline to report the pause", async () => {
        const [row] = await db.sql`SELECT healthy, last_error FROM tide.pipeline_status WHERE pipeline = 'paused'`;
        return row?.healthy === false && row.last_error?.includes("400");
      });
      // The position stops at the poison message; message 3, sent in the same batch, counts as not
      // delivered and comes again after the resume.
      expect(received).not.toContain(2);
      await waitFor("the position to stop before the poison message", async () => (await lag("paused")) === 2n);
      const [{ n }] = await db.sql`SELECT count(*)::int AS n FROM tide.relay_dlq WHERE pipeline = 'paused'`;
      expect(n).toBe(0);

      await db.sql`SELECT tide.relay_set_outbox('paused', 'paused', 'webhook', ${db.sql.json({ url, on_failure: "dlq" })})`;
      await waitFor("the rest to flow", async () => (await lag("paused")) === 0n);
      expect(received[0]).toBe(1);
      expect(received.at(-1)).toBe(3);
      await waitFor("the poison message in the DLQ", async () =>
        (await db.sql`SELECT 1 FROM tide.relay_dlq WHERE pipeline = 'paused'`).length === 1);
    } finally {
      server.stop(true);
    }
  }, 30_000);

  it("opens the circuit after repeated failures and shows it in pipeline_status", async () => {
    await start();
    await db.sql`SELECT tide.outbox_create('tripped')`;
    await db.sql`SELECT tide.relay_set_outbox('tripped', 'tripped', 'webhook', ${db.sql.json({
      url: "http://127.0.0.1:1/unreachable", timeout_ms: 200, retry: { initial_backoff_ms: 10, max_backoff_ms: 300 },
    })})`;
    await db.sql`SELECT tide.outbox_publish('tripped', '{"n": 1}'::jsonb)`;
    const [row] = await waitFor("the circuit to open", async () => {
      const rows = await db.sql`SELECT circuit, retry_attempt FROM tide.pipeline_status WHERE pipeline = 'tripped'`;
      return rows[0]?.circuit !== "closed" && rows[0]?.circuit != null && rows;
    }, 30_000);
    expect(["open", "half-open"]).toContain(row.circuit);
    expect(row.retry_attempt).toBeGreaterThanOrEqual(5);
    expect(await lag("tripped")).toBe(1n); // nothing lost while the target is down
    await db.sql`SELECT tide.relay_disable('tripped')`;
  }, 40_000);
});

describe("errors in the catalog", () => {
  it("are stored with secrets masked, since dashboards read them", async () => {
    await start();
    await db.sql`SELECT tide.outbox_create('leaky')`;
    // A sink error that quotes a URL with a password: the relay cannot create this file.
    await db.sql`SELECT tide.relay_set_outbox('leaky', 'leaky', 'file',
      '{"path": "/dev/null/postgres://tide:Sup3rSecret@db.internal/out.jsonl"}'::jsonb)`;
    await db.sql`SELECT tide.outbox_publish('leaky', '{"n": 1}'::jsonb)`;
    const [row] = await waitFor("the failure to be recorded", async () => {
      const rows = await db.sql`SELECT last_error FROM tide.relay_pipeline_state WHERE pipeline = 'leaky' AND last_error IS NOT NULL`;
      return rows.length > 0 && rows;
    });
    expect(row.last_error).toContain("postgres://tide:***@db.internal");
    expect(row.last_error).not.toContain("Sup3rSecret");
    await db.sql`SELECT tide.relay_disable('leaky')`;
  });
});

describe("inbox sink", () => {
  it("delivers an outbox into an inbox of the same database, and of another one, without duplicates", async () => {
    const other = await createTestDatabase();
    try {
      await start();
      await db.sql`SELECT tide.outbox_create('handoff')`;
      await db.sql`SELECT tide.inbox_create('local_in')`;
      await other.sql`SELECT tide.inbox_create('remote_in')`;
      await db.sql`SELECT tide.relay_set_outbox('to-local', 'handoff', 'inbox', '{"inbox": "local_in"}'::jsonb)`;
      await db.sql`SELECT tide.relay_set_outbox('to-remote', 'handoff', 'inbox', ${db.sql.json({ inbox: "remote_in", postgres_url: other.url })})`;
      for (let n = 1; n <= 5; n++) {
        await db.sql`SELECT tide.outbox_publish('handoff', ${db.sql.json({ n })}, '{"event_type": "handoff.made"}'::jsonb)`;
      }
      await waitFor("both inboxes filled", async () =>
        (await db.sql`SELECT count(*)::int AS n FROM tide.local_in_inbox`)[0].n === 5 &&
        (await other.sql`SELECT count(*)::int AS n FROM tide.remote_in_inbox`)[0].n === 5);
      const rows = await other.sql`SELECT event_id, source, payload, headers FROM tide.inbox_pending('remote_in')`;
      expect(rows[0].event_id).toMatch(/^handoff:\d+$/);
      expect(rows[0].source).toBe("outbox:handoff");
      expect(rows[0].payload).toEqual({ n: 1 });
      expect(rows[0].headers.event_type).toBe("handoff.made");

      // Redeliver everything: the inbox keeps one row per message.
      await db.sql`SELECT tide.consumer_group_rewind('to-remote', 'handoff', p_to_id := 0, p_force := true)`;
      await waitFor("the replay to finish", async () => (await lag("to-remote")) === 0n);
      const [{ n }] = await other.sql`SELECT count(*)::int AS n FROM tide.remote_in_inbox`;
      expect(n).toBe(5);
    } finally {
      await other.drop();
    }
  }, 30_000);
});
