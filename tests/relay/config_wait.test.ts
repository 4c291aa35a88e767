// Config changes you can wait for: every pipeline config has a version, the owning relay records the
// version it runs, and tide.relay_wait_applied returns once the relays run the current one, so that
// a message published after it goes out under the new config. Also: the time of the last error and
// of the last success, and an error the pipeline recovered from shown as past.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Relay } from "../../core/relay.ts";
import { connect } from "../../core/db.ts";
import { createTestDatabase, loginRole, type TestDatabase } from "../support/postgres.ts";
import { startRelay, waitFor } from "../support/relay.ts";

let db: TestDatabase;
let dir: string;
beforeAll(async () => {
  db = await createTestDatabase();
  dir = await mkdtemp(join(tmpdir(), "tide-wait-"));
});
afterAll(() => db.drop());

async function version(name: string): Promise<number> {
  const [row] = await db.sql`SELECT config_version FROM tide.relay_pipelines WHERE name = ${name}`;
  return Number(row.config_version);
}

async function waitApplied(name: string, timeout = "20 seconds"): Promise<boolean> {
  const [row] = await db.sql`SELECT tide.relay_wait_applied(${name}, ${timeout}::interval) AS applied`;
  return row.applied;
}

describe("config versions", () => {
  it("bumps the version only when a call changes the pipeline", async () => {
    await db.sql`SELECT tide.outbox_create('versions')`;
    const file = join(dir, "versions.jsonl");
    await db.sql`SELECT tide.relay_set_outbox('versions', 'versions', 'file', ${db.sql.json({ path: file })})`;
    expect(await version("versions")).toBe(1);
    await db.sql`SELECT tide.relay_set_outbox('versions', 'versions', 'file', ${db.sql.json({ path: file })})`;
    expect(await version("versions")).toBe(1);
    await db.sql`SELECT tide.relay_set_outbox('versions', 'versions', 'file', ${db.sql.json({ path: file, batch_size: 5 })})`;
    expect(await version("versions")).toBe(2);
    await db.sql`SELECT tide.relay_disable('versions')`;
    await db.sql`SELECT tide.relay_disable('versions')`;
    expect(await version("versions")).toBe(3);
    await db.sql`SELECT tide.relay_enable('versions')`;
    expect(await version("versions")).toBe(4);
    const [{ relay_get_config: config }] = await db.sql`SELECT tide.relay_get_config('versions')`;
    expect(config.config_version).toBe(4);

    await db.sql`SELECT tide.inbox_create('versions_in')`;
    const source = { source_type: "webhook", path: "versions" };
    await db.sql`SELECT tide.relay_set_inbox('versions-in', 'versions_in', ${db.sql.json(source)})`;
    await db.sql`SELECT tide.relay_set_inbox('versions-in', 'versions_in', ${db.sql.json(source)})`;
    expect(await version("versions-in")).toBe(1);
    await db.sql`SELECT tide.relay_set_inbox('versions-in', 'versions_in', ${db.sql.json(source)}, p_idempotent := false)`;
    expect(await version("versions-in")).toBe(2);
  });

  it("refuses to wait inside the transaction that made the change, which no relay can see", async () => {
    await db.sql`SELECT tide.outbox_create('same_tx')`;
    await db.sql`SELECT tide.relay_set_outbox('same-tx', 'same_tx', 'stdout', '{}'::jsonb)`;
    const error = await db.sql.begin(async (tx) => {
      await tx`SELECT tide.relay_disable('same-tx')`;
      await tx`SELECT tide.relay_wait_applied('same-tx', '5 seconds')`;
    }).catch((e) => e);
    expect(String(error.message)).toContain(`pipeline "same-tx": its change is not committed yet`);
    expect(error.hint).toContain("commit first");
  });

  it("returns false at the timeout when no relay runs the pipeline, and names a missing one", async () => {
    await db.sql`SELECT tide.outbox_create('nobody')`;
    await db.sql`SELECT tide.relay_set_outbox('nobody', 'nobody', 'stdout', '{}'::jsonb)`;
    expect(await waitApplied("nobody", "0.2 seconds")).toBe(false);
    const error = await db.sql`SELECT tide.relay_wait_applied('no-such-pipeline', '1 second')`.catch((e) => e);
    expect(error.message).toBe('pipeline "no-such-pipeline" does not exist');
  });
});

describe("waiting for a change", () => {
  let relay: Relay;
  let hook: ReturnType<typeof Bun.serve>;
  const received: unknown[] = [];
  beforeAll(async () => {
    hook = Bun.serve({
      hostname: "127.0.0.1",
      port: 0,
      async fetch(request) {
        received.push(await request.json());
        return new Response(null, { status: 204 });
      },
    });
    relay = await startRelay(db.url, { metricsAddr: "127.0.0.1:0" });
  });
  afterAll(async () => {
    await relay.stop();
    hook.stop(true);
  });

  // The issue's scenario: point a pipeline at a dead port, wait, publish: the message stays pending
  // instead of leaving through the old config.
  it("sends every message published after the wait through the new config", async () => {
    await db.sql`SELECT tide.outbox_create('switched')`;
    await db.sql`SELECT tide.relay_set_outbox('switched', 'switched', 'webhook', ${db.sql.json({ url: `http://127.0.0.1:${hook.port}/` })})`;
    expect(await waitApplied("switched")).toBe(true);
    await db.sql`SELECT tide.outbox_publish('switched', '{"n": 1}'::jsonb)`;
    await waitFor("the first message", () => received.length === 1);

    // A port nothing listens on.
    const dead = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: () => new Response() });
    const deadPort = dead.port;
    dead.stop(true);
    await db.sql`SELECT tide.relay_set_outbox('switched', 'switched', 'webhook', ${db.sql.json({ url: `http://127.0.0.1:${deadPort}/` })})`;
    expect(await waitApplied("switched")).toBe(true);
    await db.sql`SELECT tide.outbox_publish('switched', '{"n": 2}'::jsonb)`;

    // The new config tries the dead port and fails; the message waits for it.
    await waitFor("the new config's failed attempt", async () => {
      const response = await fetch(`http://127.0.0.1:${relay.httpPort}/api/v1/pipelines`);
      const p = (await response.json()).pipelines.find((x: any) => x.name === "switched");
      return p.healthy === false && p.last_error !== null;
    });
    const [{ pending }] = await db.sql`SELECT count(*) AS pending FROM tide.outbox_pending WHERE outbox_name = 'switched'`;
    expect(Number(pending)).toBe(1);
    expect(received).toEqual([{ n: 1 }]);
  }, 60_000);

  it("reports the version the relay runs in the catalog, the API and the status page", async () => {
    await db.sql`SELECT tide.outbox_create('reported')`;
    const file = join(dir, "reported.jsonl");
    await db.sql`SELECT tide.relay_set_outbox('reported', 'reported', 'file', ${db.sql.json({ path: file })})`;
    await db.sql`SELECT tide.relay_set_outbox('reported', 'reported', 'file', ${db.sql.json({ path: file, batch_size: 7 })})`;
    expect(await waitApplied("reported")).toBe(true);
    const [state] = await db.sql`SELECT config_version, applied_config_version FROM tide.pipeline_status WHERE pipeline = 'reported'`;
    expect([Number(state.config_version), Number(state.applied_config_version)]).toEqual([2, 2]);

    const api = await (await fetch(`http://127.0.0.1:${relay.httpPort}/api/v1/pipelines`)).json();
    const p = api.pipelines.find((x: any) => x.name === "reported");
    expect([p.config_version, p.applied_version]).toEqual([2, 2]);
    const page = await (await fetch(`http://127.0.0.1:${relay.httpPort}/`)).text();
    expect(page).toMatch(/<tr data-pipeline="reported">[\s\S]*?<td class="num" title="the owner runs the current config">v2<\/td>/);
  });

  it("waits for a disabled pipeline to be released", async () => {
    await db.sql`SELECT tide.outbox_create('paused')`;
    await db.sql`SELECT tide.relay_set_outbox('paused', 'paused', 'file', ${db.sql.json({ path: join(dir, "paused.jsonl") })})`;
    expect(await waitApplied("paused")).toBe(true);
    await db.sql`SELECT tide.relay_disable('paused')`;
    expect(await waitApplied("paused")).toBe(true);
    expect(relay.coordinator.owned().map((o) => o.name)).not.toContain("paused");
    await db.sql`SELECT tide.outbox_publish('paused', '{"n": 1}'::jsonb)`;
    const [{ pending }] = await db.sql`SELECT count(*) AS pending FROM tide.outbox_pending WHERE outbox_name = 'paused'`;
    expect(Number(pending)).toBe(1);
  });

  it("is callable by tide_relay", async () => {
    const role = await loginRole(db, "tide_relay", "waiter");
    const conn = connect(role.url, { max: 1 });
    try {
      await conn`SELECT tide.outbox_create('relay_role')`;
      await conn`SELECT tide.relay_set_outbox('relay-role', 'relay_role', 'stdout', '{}'::jsonb)`;
      const [{ applied }] = await conn`SELECT tide.relay_wait_applied('relay-role', '20 seconds') AS applied`;
      expect(applied).toBe(true);
      const publisher = connect((await loginRole(db, "tide_publisher", "not_waiter")).url, { max: 1 });
      try {
        const error = await publisher`SELECT tide.relay_wait_applied('relay-role', '1 second')`.catch((e) => e);
        expect(error.message).toContain("permission denied");
      } finally {
        await publisher.end();
      }
    } finally {
      await conn.end();
    }
  });
});

describe("last error and last success", () => {
  it("shows when a pipeline last failed and last succeeded, and a recovered error as past", async () => {
    let down = true;
    const hook = Bun.serve({
      hostname: "127.0.0.1",
      port: 0,
      fetch: () => (down ? new Response("down for maintenance", { status: 503 }) : new Response(null, { status: 204 })),
    });
    const relay = await startRelay(db.url, { metricsAddr: "127.0.0.1:0" });
    try {
      await db.sql`SELECT tide.outbox_create('recovers')`;
      await db.sql`SELECT tide.relay_set_outbox('recovers', 'recovers', 'webhook', ${db.sql.json({ url: `http://127.0.0.1:${hook.port}/` })})`;
      await db.sql`SELECT tide.outbox_publish('recovers', '{"n": 1}'::jsonb)`;
      const api = async () => (await (await fetch(`http://127.0.0.1:${relay.httpPort}/api/v1/pipelines`)).json()).pipelines
        .find((p: any) => p.name === "recovers");
      const failing = await waitFor("the failure", async () => ((await api()).healthy === false ? await api() : false));
      expect(failing.last_error_at).not.toBeNull();
      expect(failing.error_is_past).toBe(false);
      const page = await (await fetch(`http://127.0.0.1:${relay.httpPort}/`)).text();
      expect(page).toMatch(/<tr data-pipeline="recovers">[\s\S]*?<td class="error" data-error="current">[^<]*<span class="when"><time datetime="/);

      down = false;
      const recovered = await waitFor("the recovery", async () => {
        const p = await api();
        return p.healthy === true && p.lag === 0 && p;
      });
      expect(recovered.last_error).not.toBeNull();
      expect(recovered.error_is_past).toBe(true);
      expect(new Date(recovered.last_success_at).getTime()).toBeGreaterThan(new Date(recovered.last_error_at).getTime());
      const after = await (await fetch(`http://127.0.0.1:${relay.httpPort}/`)).text();
      expect(after).toMatch(/<tr data-pipeline="recovers">[\s\S]*?<td class="past" data-error="past">/);
      expect(after).not.toMatch(/<tr data-pipeline="recovers">[^\n]*\n[^\n]*\n<td class="num">[^\n]*data-error="current"/);

      // The catalog (what pg-tide status and dashboards read) has both times after a heartbeat.
      await waitFor("the heartbeat with the success", async () => {
        const [row] = await db.sql`SELECT last_error_at, last_success_at FROM tide.pipeline_status WHERE pipeline = 'recovers'`;
        return row.last_success_at !== null && row.last_error_at !== null && row.last_success_at > row.last_error_at;
      });
    } finally {
      await relay.stop();
      hook.stop(true);
    }
  }, 60_000);
});

describe("waiting for a laned pipeline", () => {
  let lanesDb: TestDatabase;
  beforeAll(async () => {
    lanesDb = await createTestDatabase();
  });
  afterAll(() => lanesDb.drop());

  it("returns only once every lane runs the current version", async () => {
    const sql = lanesDb.sql;
    await sql`SELECT tide.outbox_create('laned')`;
    const file = join(dir, "laned.jsonl");
    await sql`SELECT tide.relay_set_outbox('laned', 'laned', 'file', ${sql.json({ path: file, lanes: 4 })})`;
    const applied = async (timeout: string) =>
      (await sql`SELECT tide.relay_wait_applied('laned', ${timeout}::interval) AS applied`)[0].applied;
    const owned = async () => Number((await sql`
      SELECT count(*) AS n FROM tide.relay_pipeline_state WHERE pipeline = 'laned' AND owner_id IS NOT NULL`)[0].n);

    // A relay allowed two units runs two of the four lanes: the change is not applied yet.
    const partial = await startRelay(lanesDb.url, { maxPipelines: 2 });
    try {
      await waitFor("two lanes to be owned", async () => (await owned()) === 2);
      expect(await applied("1 second")).toBe(false);
    } finally {
      await partial.stop();
    }
    const whole = await startRelay(lanesDb.url);
    try {
      expect(await applied("20 seconds")).toBe(true);
      expect(await owned()).toBe(4);
    } finally {
      await whole.stop();
    }
  }, 60_000);
});
