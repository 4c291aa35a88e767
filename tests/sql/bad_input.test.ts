// Bad input gets an error that names the problem, and changes nothing: the catalog (outboxes, inboxes,
// consumer groups, pipelines, the relations of schema tide, the message count) is the same afterwards.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { catalogSnapshot, expectError } from "../support/seeds.ts";

let db: TestDatabase;
beforeAll(async () => {
  db = await createTestDatabase();
  await db.sql.unsafe(`
    SELECT tide.outbox_create('orders');
    SELECT tide.outbox_create('paused');
    SELECT tide.outbox_disable('paused');
    SELECT tide.create_consumer_group('audit', 'orders');
    SELECT tide.inbox_create('payments');
    SELECT tide.relay_set_outbox('orders-kafka', 'orders', 'kafka', '{"brokers": "k:9092", "topic": "orders"}'::jsonb);
    SELECT tide.relay_set_inbox('payments-in', 'payments', '{"url": "nats://n:4222", "subject": "pay"}'::jsonb, p_source := 'nats');
    SELECT tide.outbox_publish('orders', '{"n": 1}'::jsonb);
    SELECT * FROM tide.inbox_insert_batch('payments', '[{"event_id": "e-1", "payload": {"n": 1}}]'::jsonb);`);
});
afterAll(async () => {
  await db.drop();
});

/** Runs the failing call, checks its message for `words`, and that the catalog did not move. */
async function rejects(statement: string, ...words: string[]) {
  const before = await catalogSnapshot(db.sql);
  const error = await expectError(db.sql.unsafe(statement), ...words);
  expect(await catalogSnapshot(db.sql)).toEqual(before);
  return error;
}

const BAD_NAMES: [label: string, literal: string, shown: string][] = [
  ["an injection attempt", `'orders; DROP TABLE x'`, `'orders; DROP TABLE x'`],
  ["a double quote", `'a"b'`, `'a"b'`],
  ["a single quote", `'it''s'`, `'it''s'`],
  ["the empty string", `''`, `''`],
  ["NULL", `NULL`, `NULL`],
  ["a leading digit", `'1orders'`, `'1orders'`],
  ["a space", `'my orders'`, `'my orders'`],
  ["a trailing newline", `E'orders\\n'`, `'orders`],
  ["a dot (schema-qualified)", `'public.orders'`, `'public.orders'`],
  ["64 characters", `'${"o".repeat(64)}'`, `'${"o".repeat(64)}'`],
];

describe("names that are not identifiers", () => {
  for (const [label, literal, shown] of BAD_NAMES) {
    it(`outbox_create refuses ${label}`, async () => {
      await rejects(`SELECT tide.outbox_create(${literal})`, "invalid outbox name", shown);
    });
    it(`inbox_create refuses ${label}`, async () => {
      await rejects(`SELECT tide.inbox_create(${literal})`, "invalid inbox name", shown);
    });
    it(`create_consumer_group refuses ${label}`, async () => {
      await rejects(`SELECT tide.create_consumer_group(${literal}, 'orders')`, "invalid consumer group name", shown);
    });
    it(`relay_set_outbox refuses ${label} as the pipeline name`, async () => {
      await rejects(
        `SELECT tide.relay_set_outbox(${literal}::text, 'orders', 'stdout', '{}'::jsonb)`,
        "invalid pipeline name",
        shown,
      );
    });
  }

  it("inbox_create refuses 58 characters, since the table name adds _inbox", async () => {
    await rejects(`SELECT tide.inbox_create('${"i".repeat(58)}')`, "invalid inbox name", "at most 57 characters");
  });

  it("relay_set_outbox refuses a bad consumer group name, given or in config", async () => {
    await rejects(
      `SELECT tide.relay_set_outbox('p', 'orders', 'g; DROP TABLE x', '{"sink_type": "stdout"}'::jsonb)`,
      "invalid consumer group name", "'g; DROP TABLE x'",
    );
    await rejects(
      `SELECT tide.relay_set_outbox('p', 'orders', '{"sink_type": "stdout", "consumer_group": "a\\"b"}'::jsonb)`,
      "invalid consumer group name", `'a"b'`,
    );
  });

  it("relay_set_inbox refuses a bad pipeline name", async () => {
    await rejects(
      `SELECT tide.relay_set_inbox('x; DROP TABLE y', 'payments', '{"url": "nats://n", "subject": "s"}'::jsonb, p_source := 'nats')`,
      "invalid pipeline name", "'x; DROP TABLE y'",
    );
  });

  it("accepts the longest valid outbox name: 63 characters", async () => {
    const outbox = "o".repeat(63);
    await db.sql`SELECT tide.outbox_create(${outbox})`;
    await db.sql`SELECT tide.outbox_drop(${outbox})`;
  });

  it("accepts the longest valid inbox name: 57 characters, whose table name has 63", async () => {
    const inbox = "i".repeat(57);
    await db.sql`SELECT tide.inbox_create(${inbox})`;
    const [table] = await db.sql`SELECT to_regclass(${`tide.${inbox}_inbox`}) IS NOT NULL AS exists`;
    expect(table.exists).toBe(true);
    await db.sql`SELECT tide.inbox_drop(${inbox})`;
  });
});

describe("unknown plugin types", () => {
  it("relay_set_outbox with an unknown sink type lists the known ones", async () => {
    await rejects(
      `SELECT tide.relay_set_outbox('p', 'orders', 'carrier-pigeon', '{}'::jsonb)`,
      "unknown sink type 'carrier-pigeon'", "file, inbox, kafka, mqtt, nats, rabbitmq, redis, stdout, webhook",
    );
  });

  it("relay_set_outbox with an unknown config.sink_type lists the known ones", async () => {
    await rejects(
      `SELECT tide.relay_set_outbox('p', 'orders', '{"sink_type": "s3"}'::jsonb)`,
      "unknown sink type 's3'", "kafka",
    );
  });

  it("relay_set_outbox without any sink type says it needs one", async () => {
    await rejects(`SELECT tide.relay_set_outbox('p', 'orders', '{"topic": "t"}'::jsonb)`, "sink_type", "kafka");
  });

  it("relay_set_inbox with an unknown source type lists the known ones", async () => {
    await rejects(
      `SELECT tide.relay_set_inbox('p', 'payments', '{}'::jsonb, p_source := 'sqs')`,
      "unknown source type 'sqs'", "kafka, mqtt, nats, rabbitmq, redis, webhook",
    );
    await rejects(
      `SELECT tide.relay_set_inbox('p', 'payments', '{"source_type": "stdout"}'::jsonb)`,
      "unknown source type 'stdout'", "kafka, mqtt, nats, rabbitmq, redis, webhook",
    );
  });

  it("relay_set_inbox without any source type says how to name one", async () => {
    await rejects(`SELECT tide.relay_set_inbox('p', 'payments', '{"url": "x"}'::jsonb)`, "p_source", "source_type");
  });
});

describe("configs that are not objects or lack required keys", () => {
  for (const config of ["[]", '"x"', "42", "null"]) {
    it(`relay_set_outbox refuses ${config}`, async () => {
      await rejects(`SELECT tide.relay_set_outbox('p', 'orders', 'stdout', '${config}'::jsonb)`, "config must be a JSON object");
      await rejects(`SELECT tide.relay_set_outbox('p', 'orders', '${config}'::jsonb)`, "config must be a JSON object");
    });
    it(`relay_set_inbox refuses ${config}`, async () => {
      await rejects(`SELECT tide.relay_set_inbox('p', 'payments', '${config}'::jsonb, p_source := 'nats')`, "config must be a JSON object");
    });
  }

  it("kafka without brokers or without topic", async () => {
    await rejects(`SELECT tide.relay_set_outbox('p', 'orders', 'kafka', '{"topic": "t"}'::jsonb)`, "kafka config needs 'brokers'");
    await rejects(`SELECT tide.relay_set_outbox('p', 'orders', 'kafka', '{"brokers": "k:9092"}'::jsonb)`, "kafka config needs", "'topic'");
  });

  it("nats sink without subject, nats source without subject", async () => {
    await rejects(`SELECT tide.relay_set_outbox('p', 'orders', 'nats', '{"url": "nats://n"}'::jsonb)`, "nats config needs", "'subject'");
    await rejects(
      `SELECT tide.relay_set_inbox('p', 'payments', '{"url": "nats://n"}'::jsonb, p_source := 'nats')`,
      "nats config needs 'subject'",
    );
  });

  it("a batch size that is out of range or not a number", async () => {
    await rejects(`SELECT tide.relay_set_outbox('p', 'orders', 'stdout', '{}'::jsonb, p_batch_size := 0)`, "batch_size", "0");
    await rejects(`SELECT tide.relay_set_outbox('p', 'orders', 'stdout', '{"batch_size": "lots"}'::jsonb)`, "batch_size must be an integer");
  });

  it("an auto_offset_reset other than earliest or latest", async () => {
    await rejects(`SELECT tide.create_consumer_group('g', 'orders', p_auto_offset_reset := 'middle')`, "auto_offset_reset", "'middle'");
  });

  it("a retention that is not positive", async () => {
    await rejects(`SELECT tide.outbox_create('short', p_retention_hours := 0)`, "retention hours must be a positive number");
  });
});

describe("publishing and marking what does not exist", () => {
  it("publishing to an outbox that does not exist", async () => {
    await rejects(`SELECT tide.outbox_publish('nope', '{}'::jsonb)`, `outbox "nope" does not exist`);
    await rejects(`SELECT tide.outbox_publish('nope', 'topic', '{}'::jsonb)`, `outbox "nope" does not exist`);
  });

  it("publishing to a disabled outbox", async () => {
    const error = await rejects(`SELECT tide.outbox_publish('paused', '{}'::jsonb)`, `outbox "paused" is disabled`);
    expect(error.hint).toContain("tide.outbox_enable('paused')");
  });

  it("publishing headers that are not an object", async () => {
    await rejects(`SELECT tide.outbox_publish('orders', '{}'::jsonb, '[1]'::jsonb)`, "headers must be a JSON object");
  });

  it("publishing JSON without ::jsonb casts, which would make the payload the topic", async () => {
    const count = async () => (await db.sql`SELECT count(*)::int AS n FROM tide.outbox_messages WHERE outbox = 'orders'`)[0].n;
    const before = await count();
    const error = await rejects(`SELECT tide.outbox_publish('orders', '{"a": 1}', '{"event_type": "x"}')`,
      `outbox "orders": the topic looks like JSON`, `{"a": 1}`);
    expect(error.hint).toContain("::jsonb");
    await rejects(`SELECT tide.outbox_publish('orders', '[1, 2]', '{}')`, "the topic looks like JSON");
    expect(await count()).toBe(before);
    // A plain topic with braces inside is still a topic.
    const [{ id }] = await db.sql`SELECT tide.outbox_publish('orders', 'orders.{region}', '{}'::jsonb) AS id`;
    await db.sql`DELETE FROM tide.outbox_messages WHERE id = ${id}`;
  });

  it("marking an event that does not exist processed, by event_id or by id", async () => {
    await rejects(`SELECT tide.inbox_mark_processed('payments', 'e-404')`, `inbox "payments" has no message`, "'e-404'");
    await rejects(`SELECT tide.inbox_mark_processed('payments', 404)`, `inbox "payments" has no message with id`, "404");
  });

  it("marking an event that does not exist failed", async () => {
    await rejects(`SELECT tide.inbox_mark_failed('payments', 'e-404', 'boom')`, `inbox "payments" has no message`, "'e-404'");
  });

  it("marking in an inbox that does not exist", async () => {
    await rejects(`SELECT tide.inbox_mark_processed('nope', 'e-1')`, `inbox "nope" does not exist`);
    await rejects(`SELECT tide.inbox_mark_failed('nope', 'e-1', 'boom')`, `inbox "nope" does not exist`);
    await rejects(`SELECT * FROM tide.inbox_pending('nope')`, `inbox "nope" does not exist`);
  });

  it("a consumer group on an outbox that does not exist", async () => {
    await rejects(`SELECT tide.create_consumer_group('g', 'nope')`, `outbox "nope" does not exist`);
  });

  it("a pipeline on an outbox that does not exist", async () => {
    await rejects(`SELECT tide.relay_set_outbox('p', 'nope', 'stdout', '{}'::jsonb)`, `outbox "nope" does not exist`);
  });
});

describe("duplicates and conflicts", () => {
  it("an outbox that exists", async () => {
    await rejects(`SELECT tide.outbox_create('orders')`, `outbox "orders" already exists`);
  });

  it("an inbox that exists", async () => {
    await rejects(`SELECT tide.inbox_create('payments')`, `inbox "payments" already exists`);
  });

  it("a consumer group that exists on the outbox", async () => {
    await rejects(`SELECT tide.create_consumer_group('audit', 'orders')`, `consumer group "audit" already exists on outbox "orders"`);
  });

  it("relay_set_inbox for an inbox that does not exist", async () => {
    await rejects(
      `SELECT tide.relay_set_inbox('p', 'nope', '{"url": "nats://n", "subject": "s"}'::jsonb, p_source := 'nats')`,
      `inbox "nope" does not exist`,
    );
  });

  it("relay_set_outbox reusing a consumer group bound to another pipeline", async () => {
    // orders-kafka is bound to the group named after it.
    const error = await rejects(
      `SELECT tide.relay_set_outbox('orders-copy', 'orders', 'orders-kafka', '{"sink_type": "stdout"}'::jsonb)`,
      `consumer group "orders-kafka"`, `already used by pipeline "orders-kafka"`,
    );
    expect(error.hint).toContain("own consumer group");
    await rejects(
      `SELECT tide.relay_set_outbox('orders-copy', 'orders', '{"sink_type": "stdout", "consumer_group": "orders-kafka"}'::jsonb)`,
      `already used by pipeline "orders-kafka"`,
    );
  });

  it("a forward pipeline name reused for a reverse one, and the other way round", async () => {
    await rejects(
      `SELECT tide.relay_set_inbox('orders-kafka', 'payments', '{"url": "nats://n", "subject": "s"}'::jsonb, p_source := 'nats')`,
      `pipeline "orders-kafka" already exists as a forward pipeline`,
    );
    await rejects(
      `SELECT tide.relay_set_outbox('payments-in', 'orders', 'stdout', '{}'::jsonb)`,
      `pipeline "payments-in" already exists as a reverse pipeline`,
    );
  });

  it("managing a pipeline that does not exist", async () => {
    for (const fn of ["relay_get_config", "relay_enable", "relay_disable", "relay_delete"]) {
      await rejects(`SELECT tide.${fn}('nope')`, `pipeline "nope" does not exist`);
    }
  });
});
