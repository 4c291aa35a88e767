// A webhook target that fails for a while: 500s and timeouts are retried with backoff until 2xx and
// nothing is lost; a poison message (refused with a 4xx) goes to the dead-letter queue while the
// rest flow on, and comes back when it is requeued.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import type { Relay } from "../../core/relay.ts";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { startRelay, waitFor } from "../support/relay.ts";

let db: TestDatabase;
let relay: Relay;

beforeAll(async () => {
  db = await createTestDatabase();
  relay = await startRelay(db.url);
});
afterAll(async () => {
  await relay.stop();
  await db.drop();
});

/** An HTTP endpoint whose behaviour the test switches: "fail" (500), "hang" (never answers), "ok". */
function flakyEndpoint() {
  const state = { mode: "fail" as "fail" | "hang" | "ok", acceptPoison: false, failures: 0, received: [] as any[] };
  const server = Bun.serve({
    port: 0,
    async fetch(request) {
      const body = await request.json();
      if (body.poison && !state.acceptPoison) return new Response("cannot process this order", { status: 422 });
      if (state.mode === "fail") {
        state.failures += 1;
        return new Response("down for maintenance", { status: 500 });
      }
      if (state.mode === "hang") {
        state.failures += 1;
        return await new Promise<Response>(() => {});
      }
      state.received.push({ body, key: request.headers.get("idempotency-key") });
      return new Response(null, { status: 204 });
    },
  });
  return { state, server, url: `http://127.0.0.1:${server.port}/hook` };
}

describe("webhook delivery under failures", () => {
  it("retries 500s and timeouts until 2xx, then delivers everything in order", async () => {
    const { state, server, url } = flakyEndpoint();
    try {
      await db.sql`SELECT tide.outbox_create('flaky')`;
      await db.sql`SELECT tide.relay_set_outbox('flaky', 'flaky', 'webhook',
        ${db.sql.json({ url, timeout_ms: 300, retry: { initial_backoff_ms: 20, max_backoff_ms: 200 } })})`;
      for (let n = 1; n <= 20; n++) await db.sql`SELECT tide.outbox_publish('flaky', ${db.sql.json({ n })})`;

      await waitFor("a few 500s", () => state.failures >= 3);
      const [unhealthy] = await waitFor("the pipeline to report the failure", async () =>
        (await db.sql`SELECT healthy, last_error FROM tide.relay_pipeline_state WHERE pipeline = 'flaky' AND NOT healthy`).length
          ? db.sql`SELECT healthy, last_error FROM tide.relay_pipeline_state WHERE pipeline = 'flaky'` : null);
      expect(unhealthy.last_error).toContain("500");

      state.mode = "hang";
      const failuresBefore = state.failures;
      await waitFor("a few timeouts", () => state.failures >= failuresBefore + 2);
      expect(state.received.length).toBe(0);

      state.mode = "ok";
      await waitFor("all 20 messages", () => new Set(state.received.map((r) => r.body.n)).size === 20, 30_000);
      const firstSeen = [...new Set(state.received.map((r) => r.body.n))];
      expect(firstSeen).toEqual(Array.from({ length: 20 }, (_, i) => i + 1));
      expect(state.received[0].key).toMatch(/^flaky:\d+$/);
      await waitFor("the pipeline to be healthy again", async () => {
        const [row] = await db.sql`SELECT healthy FROM tide.relay_pipeline_state WHERE pipeline = 'flaky'`;
        return row.healthy;
      });
    } finally {
      server.stop(true);
    }
  }, 60_000);

  it("with retry_client_errors, retries a 4xx until the endpoint accepts it instead of dead-lettering", async () => {
    const { state, server, url } = flakyEndpoint();
    state.mode = "ok";
    try {
      await db.sql`SELECT tide.outbox_create('patient')`;
      await db.sql`SELECT tide.relay_set_outbox('patient', 'patient', 'webhook', ${db.sql.json({
        url, retry_client_errors: true, retry: { initial_backoff_ms: 10, max_backoff_ms: 50 },
      })})`;
      await db.sql`SELECT tide.outbox_publish('patient', '{"n": 1, "poison": true}'::jsonb)`;
      await db.sql`SELECT tide.outbox_publish('patient', '{"n": 2}'::jsonb)`;
      await waitFor("the 422 to be retried", async () => {
        const [row] = await db.sql`SELECT healthy, last_error FROM tide.relay_pipeline_state WHERE pipeline = 'patient'`;
        return row?.healthy === false && row.last_error.includes("422");
      });
      expect(state.received).toHaveLength(0);
      state.acceptPoison = true;
      await waitFor("both messages", () => state.received.length === 2);
      expect(state.received.map((r) => r.body.n)).toEqual([1, 2]);
      expect(await db.sql`SELECT 1 FROM tide.relay_dlq WHERE pipeline = 'patient'`).toHaveLength(0);
    } finally {
      server.stop(true);
    }
  }, 60_000);

  it("dead-letters a message the target keeps refusing past its retry budget and delivers the ones queued behind it", async () => {
    const { state, server, url } = flakyEndpoint();
    state.mode = "ok";
    const failing = Bun.serve({
      port: 0,
      async fetch(request) {
        const body = await request.json();
        if (body.stuck) return new Response("stuck", { status: 409 });
        return fetch(url, { method: "POST", body: JSON.stringify(body) });
      },
    });
    try {
      await db.sql`SELECT tide.outbox_create('budget')`;
      await db.sql`SELECT tide.relay_set_outbox('budget', 'budget', 'webhook', ${db.sql.json({
        url: `http://127.0.0.1:${failing.port}/hook`,
        retry_client_errors: true,
        retry: { initial_backoff_ms: 10, max_backoff_ms: 20, max_attempts: 3 },
      })})`;
      await db.sql`SELECT tide.outbox_publish('budget', '{"n": 1, "stuck": true}'::jsonb)`;
      for (let n = 2; n <= 5; n++) await db.sql`SELECT tide.outbox_publish('budget', ${db.sql.json({ n })})`;

      await waitFor("the four messages behind the stuck one", () => state.received.length === 4);
      expect(state.received.map((r) => r.body.n)).toEqual([2, 3, 4, 5]);
      await waitFor("the batch to be acknowledged", async () =>
        (await db.sql`SELECT lag FROM tide.consumer_lag WHERE group_name = 'budget'`)[0].lag === 0n);
      const dead = await db.sql`SELECT payload, attempts FROM tide.relay_dlq WHERE pipeline = 'budget'`;
      expect(dead.map((r) => [r.payload.n, r.attempts])).toEqual([[1, 3]]);
    } finally {
      failing.stop(true);
      server.stop(true);
    }
  }, 60_000);

  // An outage is not a bad message: with a retry budget set, a target that answers 500 to everything
  // for a while (then recovers) must not send healthy messages to the dead-letter queue, in single
  // and in batch mode alike.
  for (const mode of ["single", "batch"] as const) {
    it(`spends no retry budget during an outage (${mode} mode): nothing is dead-lettered`, async () => {
      const received: number[] = [];
      let failures = 0;
      const outage = Bun.serve({
        port: 0,
        async fetch(request) {
          const body = await request.json();
          if (failures < 12) {
            failures += 1;
            return new Response("down for maintenance", { status: 500 });
          }
          for (const m of Array.isArray(body) ? body : [{ payload: body }]) received.push(m.payload.n);
          return new Response(null, { status: 204 });
        },
      });
      const name = `outage_${mode}`;
      try {
        await db.sql`SELECT tide.outbox_create(${name})`;
        await db.sql`SELECT tide.relay_set_outbox(${name}, ${name}, 'webhook', ${db.sql.json({
          url: `http://127.0.0.1:${outage.port}/hook`,
          mode,
          retry: { initial_backoff_ms: 5, max_backoff_ms: 10, max_attempts: 3 },
        })})`;
        for (let n = 1; n <= 5; n++) await db.sql`SELECT tide.outbox_publish(${name}, ${db.sql.json({ n })})`;

        await waitFor("every message after the outage", () => received.length >= 5);
        expect(failures).toBe(12);
        expect(received).toEqual([1, 2, 3, 4, 5]);
        await waitFor("the batch to be acknowledged", async () =>
          (await db.sql`SELECT lag FROM tide.consumer_lag WHERE group_name = ${name}`)[0].lag === 0n);
        expect(await db.sql`SELECT message_id FROM tide.relay_dlq WHERE pipeline = ${name}`).toHaveLength(0);
      } finally {
        outage.stop(true);
      }
    }, 60_000);
  }

  it("dead-letters a poison message, delivers the rest, and redelivers it when requeued", async () => {
    const { state, server, url } = flakyEndpoint();
    state.mode = "ok";
    try {
      await db.sql`SELECT tide.outbox_create('poison')`;
      await db.sql`SELECT tide.relay_set_outbox('poison', 'poison', 'webhook', ${db.sql.json({ url })})`;
      await db.sql`SELECT tide.outbox_publish('poison', '{"n": 1}'::jsonb)`;
      await db.sql`SELECT tide.outbox_publish('poison', '{"n": 2, "poison": true}'::jsonb)`;
      await db.sql`SELECT tide.outbox_publish('poison', '{"n": 3}'::jsonb)`;

      await waitFor("the good messages", () => state.received.length === 2);
      expect(state.received.map((r) => r.body.n)).toEqual([1, 3]);
      const dead = await waitFor("the dead letter", async () => {
        const rows = await db.sql`SELECT * FROM tide.relay_dlq_list('poison')`;
        return rows.length === 1 && rows;
      });
      expect(dead[0].payload).toEqual({ n: 2, poison: true });
      expect(dead[0].error).toContain("422");
      const [original] = await db.sql`SELECT created_at FROM tide.outbox_messages WHERE id = ${dead[0].message_id}`;
      expect(dead[0].message_created_at).toEqual(original.created_at); // a redelivery keeps its time
      const [{ lag }] = await db.sql`SELECT lag FROM tide.consumer_lag WHERE group_name = 'poison'`;
      expect(lag).toBe(0n);

      state.acceptPoison = true;
      await db.sql`SELECT tide.relay_dlq_requeue(${dead[0].id})`;
      await waitFor("the requeued message", () => state.received.length === 3);
      expect(state.received[2].body.n).toBe(2);
      // The same message again: its dedup key names its outbox and id, as the first attempt's did.
      expect(state.received[2].key).toBe(`poison:${dead[0].message_id}`);
      await waitFor("the dead letter to be marked redelivered", async () => {
        const [row] = await db.sql`SELECT status FROM tide.relay_dlq WHERE id = ${dead[0].id}`;
        return row.status === "redelivered";
      });
    } finally {
      server.stop(true);
    }
  }, 60_000);
});
