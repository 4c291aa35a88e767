// Arguments the SQL API refuses, with an error that names what was wrong, changing nothing: a NULL
// argument is named (never "RAISE statement option cannot be null", and never read as "no limit" or
// "forced"), a drop-in plugin's required_keys must have the shape the catalog checks against, and
// JSON passed as a topic by mistake is caught even with whitespace around it. The calls are made by a
// LOGIN role that holds only tide_relay, the role with the widest EXECUTE rights.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { connect, type Sql } from "../../core/db.ts";
import { createTestDatabase, loginRole, type TestDatabase } from "../support/postgres.ts";
import { catalogSnapshot, expectError } from "../support/seeds.ts";

let db: TestDatabase;
let relay: Sql;

beforeAll(async () => {
  db = await createTestDatabase();
  await db.sql.unsafe(`
    SELECT tide.outbox_create('orders');
    SELECT tide.create_consumer_group('audit', 'orders');
    SELECT tide.inbox_create('payments');
    SELECT tide.relay_set_outbox('orders-out', 'orders', 'stdout', '{}'::jsonb);
    SELECT tide.outbox_publish('orders', '{"n": 1}'::jsonb);
    SELECT * FROM tide.inbox_insert_batch('payments', '[{"event_id": "e-1", "payload": {"n": 1}}]'::jsonb);
    CREATE TABLE customers (id int PRIMARY KEY);`);
  relay = connect((await loginRole(db, "tide_relay", "inputs_relay")).url, { max: 1 });
});

afterAll(async () => {
  await relay.end();
  await db.drop();
});

/** Runs the failing call as the relay role, checks its message for `words`, and that the catalog did not move. */
async function rejects(statement: string, ...words: string[]) {
  const before = await catalogSnapshot(db.sql);
  const error = await expectError(relay.unsafe(statement), ...words);
  expect(await catalogSnapshot(db.sql)).toEqual(before);
  return error;
}

// [call, function, argument]
const NULL_ARGUMENTS: [string, string, string][] = [
  ["outbox_publish(NULL, '{}'::jsonb)", "outbox_publish", "p_outbox"],
  ["outbox_publish(NULL, 'orders.created', '{}'::jsonb)", "outbox_publish", "p_outbox"],
  ["outbox_create('fresh', 72, NULL)", "outbox_create", "p_notify"],
  ["outbox_create_if_not_exists('fresh', 72, NULL)", "outbox_create_if_not_exists", "p_notify"],
  ["outbox_enable(NULL)", "outbox_enable", "p_name"],
  ["outbox_disable(NULL)", "outbox_disable", "p_name"],
  ["outbox_drop(NULL)", "outbox_drop", "p_name"],
  ["inbox_create('fresh', 3, NULL)", "inbox_create", "p_processed_retention_hours"],
  ["inbox_create('fresh', 3, 72, NULL)", "inbox_create", "p_dlq_retention_hours"],
  ["inbox_drop(NULL)", "inbox_drop", "p_name"],
  ["inbox_pending(NULL)", "inbox_pending", "p_name"],
  ["inbox_mark_processed(NULL, 'e-1')", "inbox_mark_processed", "p_name"],
  ["inbox_mark_processed('payments', NULL::text)", "inbox_mark_processed", "p_event_id"],
  ["inbox_mark_processed('payments', NULL::bigint)", "inbox_mark_processed", "p_id"],
  ["inbox_mark_failed(NULL, 'e-1', 'boom')", "inbox_mark_failed", "p_name"],
  ["inbox_mark_failed('payments', NULL, 'boom')", "inbox_mark_failed", "p_event_id"],
  ["replay_inbox_messages(NULL, ARRAY['e-1'])", "replay_inbox_messages", "p_name"],
  ["replay_inbox_messages('payments', NULL)", "replay_inbox_messages", "p_event_ids"],
  ["inbox_insert_batch(NULL, '[]'::jsonb)", "inbox_insert_batch", "p_name"],
  ["inbox_insert_batch('payments', NULL)", "inbox_insert_batch", "p_messages"],
  ["relay_set_outbox('p', NULL, 'stdout', '{}'::jsonb)", "relay_set_outbox", "p_outbox"],
  ["relay_set_outbox('p', NULL, '{\"sink_type\": \"stdout\"}'::jsonb)", "relay_set_outbox", "p_outbox"],
  ["relay_set_inbox('p', NULL, '{\"url\": \"nats://n\", \"subject\": \"s\"}'::jsonb, 'nats')", "relay_set_inbox", "p_inbox"],
  ["relay_get_config(NULL)", "relay_get_config", "p_name"],
  ["relay_enable(NULL)", "relay_enable", "p_name"],
  ["relay_disable(NULL)", "relay_disable", "p_name"],
  ["relay_delete(NULL)", "relay_delete", "p_name"],
  ["register_plugin_type('pigeon', 'sink', NULL)", "register_plugin_type", "p_required_keys"],
  ["drop_consumer_group(NULL, 'orders')", "drop_consumer_group", "p_group"],
  ["drop_consumer_group('audit', NULL)", "drop_consumer_group", "p_outbox"],
  ["consumer_group_rewind(NULL, 'orders', 0)", "consumer_group_rewind", "p_group"],
  ["consumer_group_rewind('audit', NULL, 0)", "consumer_group_rewind", "p_outbox"],
  ["consumer_group_rewind('audit', 'orders', 0, p_relay_group_id := NULL)", "consumer_group_rewind", "p_relay_group_id"],
  ["outbox_retention_sweep('orders', 100, NULL)", "outbox_retention_sweep", "p_dry_run"],
  ["inbox_retention_sweep('payments', NULL)", "inbox_retention_sweep", "p_batch"],
  ["inbox_retention_sweep('payments', 100, NULL)", "inbox_retention_sweep", "p_dry_run"],
  ["relay_dlq_add(NULL, 1, 'boom')", "relay_dlq_add", "p_pipeline"],
  ["relay_dlq_add('orders-out', NULL, 'boom')", "relay_dlq_add", "p_message_id"],
  ["relay_dlq_add('orders-out', 1, NULL)", "relay_dlq_add", "p_error"],
  ["relay_dlq_requeue(NULL::bigint)", "relay_dlq_requeue", "p_id"],
  ["relay_dlq_requeue(NULL::text)", "relay_dlq_requeue", "p_pipeline"],
  ["relay_dlq_resolve(NULL)", "relay_dlq_resolve", "p_id"],
  ["capture_table(NULL, 'orders')", "capture_table", "p_table"],
  ["capture_table('customers', NULL)", "capture_table", "p_outbox"],
  ["uncapture_table(NULL, 'orders')", "uncapture_table", "p_table"],
  ["uncapture_table('customers', NULL)", "uncapture_table", "p_outbox"],
  ["capture_backfill_chunk('customers', NULL)", "capture_backfill_chunk", "p_outbox"],
  ["capture_backfill_reset(NULL, 'orders')", "capture_backfill_reset", "p_table"],
];

describe("NULL arguments", () => {
  for (const [call, fn, argument] of NULL_ARGUMENTS) {
    it(`${call} names ${argument}`, async () => {
      const error = await rejects(`SELECT tide.${call}`, `tide.${fn}: ${argument} must not be NULL`);
      expect(error.code).toBe("22004"); // null_value_not_allowed
    });
  }

  it("CALL capture_backfill names p_restart instead of doing nothing", async () => {
    await rejects(`CALL tide.capture_backfill('customers', 'orders', 10, NULL)`, "tide.capture_backfill: p_restart must not be NULL");
  });

  it("a NULL p_force does not rewind the group of an enabled pipeline", async () => {
    await db.sql`SELECT tide.outbox_publish('orders', '{"n": 2}'::jsonb)`;
    const position = async () => (await db.sql`SELECT cursor_id, generation FROM tide.consumer_groups WHERE group_name = 'orders-out'`)[0];
    const before = await position();
    await rejects(`SELECT tide.consumer_group_rewind('orders-out', 'orders', 0, p_force := NULL)`,
      "tide.consumer_group_rewind: p_force must not be NULL");
    expect(await position()).toEqual(before);
  });

  it("a NULL batch size is not read as no limit, and a NULL dry run does not delete", async () => {
    await db.sql`SELECT tide.outbox_create('expired', p_retention_hours := 1)`;
    await db.sql`SELECT tide.outbox_publish('expired', '{"n": 1}'::jsonb)`;
    await db.sql`UPDATE tide.outbox_messages SET created_at = now() - interval '2 hours' WHERE outbox = 'expired'`;
    await rejects(`SELECT tide.outbox_retention_sweep('expired', NULL)`, "tide.outbox_retention_sweep: p_batch must not be NULL");
    await rejects(`SELECT tide.outbox_retention_sweep('expired', 100, NULL)`, "tide.outbox_retention_sweep: p_dry_run must not be NULL");
    await rejects(`SELECT tide.outbox_retention_sweep('expired', 0)`, "p_batch must be at least 1 (got 0)");
    // The message was eligible all along.
    expect((await relay`SELECT tide.outbox_retention_sweep('expired', 100, true) AS n`)[0].n).toBe(1n);
  });
});

describe("register_plugin_type", () => {
  for (const [label, keys] of [
    ["a flat list of keys", `'["url", "path"]'`],
    ["an object", `'{"url": true}'`],
    ["a list with an empty group", `'[["url"], []]'`],
    ["a group with a key that is not a string", `'[["url", 1]]'`],
    ["a group with an empty key", `'[[""]]'`],
    ["JSON null", `'null'`],
  ]) {
    it(`refuses required_keys given as ${label}`, async () => {
      await rejects(`SELECT tide.register_plugin_type('pigeon', 'sink', ${keys}::jsonb)`,
        `plugin type "pigeon": required_keys must be a list of non-empty lists of key names`);
    });
  }

  it("refuses a kind other than sink or source, naming the value", async () => {
    await rejects(`SELECT tide.register_plugin_type('pigeon', 'sideways')`, `kind must be 'sink' or 'source' (got 'sideways')`);
    await rejects(`SELECT tide.register_plugin_type('pigeon', NULL)`, `kind must be 'sink' or 'source' (got NULL)`);
  });

  it("registers valid required_keys, which then guard the type's pipelines", async () => {
    await relay`SELECT tide.register_plugin_type('pigeon', 'sink', '[["loft"], ["ring", "ring_template"]]'::jsonb)`;
    await rejects(`SELECT tide.relay_set_outbox('by-air', 'orders', 'pigeon', '{"loft": "north"}'::jsonb)`,
      `pigeon config needs 'ring' or 'ring_template'`);
    await relay`SELECT tide.relay_set_outbox('by-air', 'orders', 'pigeon', '{"loft": "north", "ring": "r1"}'::jsonb)`;
  });
});

describe("JSON passed as the topic", () => {
  for (const [label, topic] of [
    ["leading spaces", `'  {"a": 1}'`],
    ["a leading newline and a trailing one", `E'\\n[1, 2]\\n'`],
    ["tabs and carriage returns", `E'\\t\\r{"a": 1}\\r\\t'`],
  ]) {
    it(`is refused with ${label}`, async () => {
      const error = await rejects(`SELECT tide.outbox_publish('orders', ${topic}, '{}')`, `outbox "orders": the topic looks like JSON`);
      expect(error.hint).toContain("::jsonb");
    });
  }

  it("a topic that only contains braces or starts with a space is still a topic", async () => {
    const rows = await relay`
      SELECT tide.outbox_publish('orders', t, '{}'::jsonb) AS id FROM unnest(ARRAY['orders.{region}', ' orders', '[eu] orders']) t`;
    expect(rows).toHaveLength(3);
  });
});
