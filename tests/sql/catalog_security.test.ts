// Roles and grants: an application role (tide_publisher) publishes and works its inbox but cannot read
// the pipeline catalog; a dashboard role (tide_reader) sees the monitoring views and redacted configs;
// the relay role (tide_relay) drives positions. API functions are SECURITY DEFINER with a pinned
// search_path, and nothing in schema tide is open to PUBLIC.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import type { ReservedSql } from "postgres";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { expectError } from "../support/seeds.ts";

let db: TestDatabase;
const suffix = Math.random().toString(36).slice(2, 10);
const users = { publisher: `tide_test_pub_${suffix}`, reader: `tide_test_read_${suffix}`, relay: `tide_test_relay_${suffix}` };

beforeAll(async () => {
  db = await createTestDatabase();
  await db.sql.unsafe(`
    SELECT tide.outbox_create('orders');
    SELECT tide.relay_set_outbox('orders-hook', 'orders', 'webhook',
      '{"url": "https://hooks.example.com", "signing": {"secret": "whsec_top"}}'::jsonb);
    SELECT tide.inbox_create('payments');
    SELECT * FROM tide.inbox_insert_batch('payments', '[{"event_id": "p-1", "payload": {"amount": 5}}]'::jsonb);`);
  for (const [role, user] of [["tide_publisher", users.publisher], ["tide_reader", users.reader], ["tide_relay", users.relay]]) {
    await db.sql.unsafe(`CREATE ROLE ${user} LOGIN; GRANT ${role} TO ${user};`);
  }
});
afterAll(async () => {
  await db.sql`DROP TABLE IF EXISTS pub_orders`;
  for (const user of Object.values(users)) await db.sql.unsafe(`DROP ROLE IF EXISTS ${user}`);
  await db.drop();
});

/** Runs `body` on a connection that has SET ROLE to `user`. */
async function as<T>(user: string, body: (conn: ReservedSql) => Promise<T>): Promise<T> {
  const conn = await db.sql.reserve();
  try {
    await conn.unsafe(`SET ROLE ${user}`);
    return await body(conn);
  } finally {
    await conn.unsafe("RESET ROLE");
    conn.release();
  }
}

describe("roles", () => {
  it("tide_publisher, tide_relay and tide_reader exist and cannot log in", async () => {
    const rows = await db.sql`
      SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname IN ('tide_publisher', 'tide_relay', 'tide_reader') ORDER BY 1`;
    expect(rows.map((r) => [r.rolname, r.rolcanlogin])).toEqual([
      ["tide_publisher", false], ["tide_reader", false], ["tide_relay", false],
    ]);
  });

  it("a login role with only tide_publisher publishes, in its own transaction too", async () => {
    await as(users.publisher, async (conn) => {
      const [{ id }] = await conn`SELECT tide.outbox_publish('orders', '{"n": 1}'::jsonb) AS id`;
      expect(typeof id).toBe("bigint");
      await conn`BEGIN`;
      await conn`SELECT tide.outbox_publish('orders', 'orders.created', '{"n": 2}'::jsonb, '{"h": "v"}'::jsonb)`;
      await conn`ROLLBACK`;
    });
    const [{ n }] = await db.sql`SELECT count(*)::int AS n FROM tide.outbox_messages`;
    expect(n).toBe(1);
  });

  it("the publisher reads its inbox through inbox_pending and marks messages", async () => {
    await as(users.publisher, async (conn) => {
      const pending = await conn`SELECT event_id, payload FROM tide.inbox_pending('payments')`;
      expect([...pending]).toEqual([{ event_id: "p-1", payload: { amount: 5 } }]);
      expect((await conn`SELECT tide.inbox_mark_failed('payments', 'p-1', 'retry later') AS n`)[0].n).toBe(1);
      expect((await conn`SELECT tide.inbox_mark_processed('payments', 'p-1') AS done`)[0].done).toBe(true);
      expect((await conn`SELECT tide.replay_inbox_messages('payments', ARRAY['p-1']) AS n`)[0].n).toBe(1);
    });
  });

  it("the publisher cannot read the pipeline catalog, the messages, or change the catalog", async () => {
    await as(users.publisher, async (conn) => {
      await expectError(conn`SELECT * FROM tide.relay_pipelines`, "permission denied", "relay_pipelines");
      await expectError(conn`SELECT * FROM tide.outbox_messages`, "permission denied", "outbox_messages");
      await expectError(conn`SELECT tide.relay_get_config('orders-hook')`, "permission denied", "relay_get_config");
      await expectError(conn`SELECT tide.relay_set_outbox('x', 'orders', 'stdout', '{}'::jsonb)`, "permission denied");
      await expectError(conn`SELECT tide.outbox_create('mine')`, "permission denied", "outbox_create");
      await expectError(conn`SELECT * FROM tide.consumer_next_batch('orders', 'orders-hook', 10)`, "permission denied");
    });
  });

  it("a tide_reader sees the monitoring views and redacted configs, but not raw configs", async () => {
    await as(users.reader, async (conn) => {
      const lag = await conn`SELECT group_name, lag FROM tide.consumer_lag`;
      expect([...lag]).toEqual([{ group_name: "orders-hook", lag: 1n }]);
      expect(await conn`SELECT id FROM tide.outbox_pending`).toHaveLength(1);
      const [status] = await conn`SELECT pipeline, lag, dlq_depth FROM tide.pipeline_status`;
      expect(status).toEqual({ pipeline: "orders-hook", lag: 1n, dlq_depth: 0n });
      const [{ relay_get_config: config }] = await conn`SELECT tide.relay_get_config('orders-hook')`;
      expect(config.config.signing.secret).toBe("***");
      await expectError(conn`SELECT config FROM tide.relay_pipelines`, "permission denied");
      await expectError(conn`SELECT tide.outbox_publish('orders', '{}'::jsonb)`, "permission denied");
    });
  });

  it("a tide_relay reads raw configs and drives delivery", async () => {
    await as(users.relay, async (conn) => {
      const [row] = await conn`SELECT config FROM tide.relay_pipelines WHERE name = 'orders-hook'`;
      expect(row.config.signing.secret).toBe("whsec_top");
      const batch = await conn`SELECT id FROM tide.consumer_next_batch('orders', 'orders-hook', 10)`;
      expect(batch).toHaveLength(1);
      await conn`SELECT tide.consumer_commit('orders', 'orders-hook', ${batch[0].id}, 1)`;
      const [{ inserted }] = await conn`SELECT * FROM tide.inbox_insert_batch('payments', '[{"event_id": "p-2", "payload": {}}]'::jsonb)`;
      expect(inserted).toBe(1);
    });
    const [lag] = await db.sql`SELECT lag FROM tide.consumer_lag`;
    expect(lag.lag).toBe(0n);
  });

  it("a tide_relay moves dead letters through the DLQ functions only; a tide_reader cannot", async () => {
    const [{ id }] = await db.sql`SELECT tide.relay_dlq_add('orders-hook', (SELECT min(id) FROM tide.outbox_messages), 'HTTP 500') AS id`;
    await db.sql`SELECT tide.relay_dlq_requeue(${id}::bigint)`;
    await as(users.relay, async (conn) => {
      await expectError(conn`UPDATE tide.relay_dlq SET status = 'resolved' WHERE id = ${id}`, "permission denied", "relay_dlq");
      await conn`SELECT tide.relay_dlq_redelivered('{}'::bigint[], ARRAY[${id}]::bigint[])`;
    });
    await as(users.reader, async (conn) => {
      await expectError(conn`SELECT tide.relay_dlq_redelivered(ARRAY[${id}]::bigint[], '{}'::bigint[])`, "permission denied");
    });
    const [entry] = await db.sql`SELECT status, attempts FROM tide.relay_dlq WHERE id = ${id}`;
    expect(entry).toEqual({ status: "open", attempts: 2 });
    await db.sql`SELECT tide.relay_dlq_resolve(${id}::bigint)`;
  });
});

describe("capture with the caller's own rights", () => {
  beforeAll(async () => {
    await db.sql.unsafe(`
      CREATE TABLE pub_orders (id int PRIMARY KEY, total int);
      INSERT INTO pub_orders SELECT g, g * 10 FROM generate_series(1, 5) g;
      ALTER TABLE pub_orders OWNER TO ${users.publisher};
      CREATE TABLE private_people (id int PRIMARY KEY, ssn text);
      INSERT INTO private_people VALUES (1, '123-45-6789');
      SELECT tide.outbox_create('captured');`);
  });
  const messages = async () =>
    (await db.sql`SELECT payload FROM tide.outbox_messages WHERE outbox = 'captured' ORDER BY id`).map((r) => r.payload);

  it("a table owner with only tide_publisher captures, backfills and uncaptures its table", async () => {
    await as(users.publisher, async (conn) => {
      await conn`SELECT tide.capture_table('pub_orders', 'captured')`;
      await conn`INSERT INTO pub_orders VALUES (6, 60)`;
      await conn`CALL tide.capture_backfill('pub_orders', 'captured', 4)`;
      await conn`CALL tide.capture_backfill('pub_orders', 'captured', p_restart => true)`;
      await conn`SELECT tide.uncapture_table('pub_orders', 'captured')`;
      await conn`INSERT INTO pub_orders VALUES (7, 70)`;
    });
    const payloads = await messages();
    expect(payloads.map((p) => `${p.action}:${p.record.id}`)).toEqual([
      "insert:6", ...[1, 2, 3, 4, 5, 6].map((id) => `read:${id}`), ...[1, 2, 3, 4, 5, 6].map((id) => `read:${id}`),
    ]);
    expect(await db.sql`SELECT * FROM tide.captures`).toHaveLength(0);
    expect(await db.sql`SELECT tgname FROM pg_trigger WHERE tgrelid = 'pub_orders'::regclass`).toHaveLength(0);
  });

  it("refuses to capture or backfill someone else's table", async () => {
    await as(users.publisher, async (conn) => {
      await expectError(conn`SELECT tide.capture_table('private_people', 'captured')`, "only the table's owner can capture it");
      await expectError(conn`CALL tide.capture_backfill('private_people', 'captured')`, "only the table's owner can backfill it");
      await expectError(conn`SELECT tide.capture_backfill_chunk('private_people', 'captured', 10)`, "only the table's owner can backfill it");
      await expectError(conn`SELECT tide.capture_register('private_people', 'captured', ARRAY['insert'], ARRAY['t'])`,
        "only the table's owner can capture it");
    });
    await db.sql`INSERT INTO private_people VALUES (2, '987-65-4321')`;
    expect(JSON.stringify(await messages())).not.toContain("ssn");
    expect(await db.sql`SELECT * FROM tide.captures`).toHaveLength(0);
  });

  it("the owner of a captured table cannot forget the capture while its triggers run", async () => {
    await db.sql`SELECT tide.capture_table('private_people', 'captured', ARRAY['insert'])`;
    await expectError(db.sql`SELECT tide.capture_unregister('private_people', 'captured')`, "its triggers still exist");
    await db.sql`SELECT tide.uncapture_table('private_people', 'captured')`;
  });
});

describe("SECURITY DEFINER functions", () => {
  // Every function of DESIGN §2, and the operations beyond the seeds.
  const API = [
    "outbox_create", "outbox_create_if_not_exists", "outbox_publish", "create_consumer_group",
    "relay_set_outbox", "relay_set_inbox", "relay_get_config", "relay_enable", "relay_disable", "relay_delete",
    "relay_list_configs", "inbox_create", "inbox_pending", "inbox_mark_processed", "inbox_mark_failed",
    "replay_inbox_messages", "consumer_next_batch", "consumer_commit", "inbox_insert_batch",
    "outbox_drop", "outbox_enable", "outbox_disable", "drop_consumer_group", "consumer_group_rewind", "inbox_drop",
    "outbox_retention_sweep", "inbox_retention_sweep",
    "relay_dlq_add", "relay_dlq_list", "relay_dlq_requeue", "relay_dlq_resolve", "relay_dlq_redelivered",
    "relay_state_acquired", "relay_state_start_failed", "relay_state_released", "relay_heartbeat",
  ];

  it("every API function (each overload) is SECURITY DEFINER with search_path pinned to pg_catalog, pg_temp", async () => {
    const rows = await db.sql`
      SELECT p.proname, p.oid::regprocedure::text AS signature, p.prosecdef, p.proconfig
        FROM pg_proc p WHERE p.pronamespace = 'tide'::regnamespace AND p.proname = ANY (${API}::text[])
       ORDER BY 2`;
    expect(new Set(rows.map((r) => r.proname))).toEqual(new Set(API));
    const unsafe = rows.filter((r) => !r.prosecdef || !(r.proconfig ?? []).includes("search_path=pg_catalog, pg_temp"));
    expect(unsafe.map((r) => r.signature)).toEqual([]);
  });

  it("no SECURITY DEFINER function in schema tide leaves search_path open or searches pg_temp first", async () => {
    const rows = await db.sql`
      SELECT p.oid::regprocedure::text AS signature,
             (SELECT c FROM unnest(p.proconfig) c WHERE c LIKE 'search_path=%') AS path
        FROM pg_proc p WHERE p.pronamespace = 'tide'::regnamespace AND p.prosecdef ORDER BY 1`;
    const bad = rows.filter((r) => !r.path || !/pg_temp$/.test(r.path) || /public|\$user/.test(r.path));
    expect(bad.map((r) => `${r.signature} ${r.path}`)).toEqual([]);
  });

  it("nothing in schema tide is executable or readable by PUBLIC", async () => {
    const functions = await db.sql`
      SELECT p.oid::regprocedure::text AS signature FROM pg_proc p
       WHERE p.pronamespace = 'tide'::regnamespace AND has_function_privilege('public', p.oid, 'EXECUTE')`;
    expect(functions.map((r) => r.signature)).toEqual([]);
    const relations = await db.sql`
      SELECT c.relname FROM pg_class c
       WHERE c.relnamespace = 'tide'::regnamespace AND c.relkind IN ('r', 'v')
         AND has_table_privilege('public', c.oid, 'SELECT')`;
    expect(relations.map((r) => r.relname)).toEqual([]);
  });
});
