// The pipeline catalog: the relay_set_outbox forms and how a pipeline is bound to a consumer group,
// relay_set_inbox, redacted reads, NOTIFY tide_relay_config on every change, enabling, disabling and
// deleting pipelines and outboxes. (Retention, DLQ, rewind: catalog_operations.test.ts; roles and
// SECURITY DEFINER: catalog_security.test.ts.)

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { deliver, expectError, listen } from "../support/seeds.ts";

let db: TestDatabase;
beforeAll(async () => {
  db = await createTestDatabase();
});
afterAll(async () => {
  await db.drop();
});

async function configOf(pipeline: string) {
  const [{ relay_get_config: config }] = await db.sql`SELECT tide.relay_get_config(${pipeline})`;
  return config;
}

async function groupsOf(outbox: string): Promise<string[]> {
  const rows = await db.sql`SELECT group_name FROM tide.consumer_groups WHERE outbox_name = ${outbox} ORDER BY 1`;
  return rows.map((r) => r.group_name);
}

describe("relay_set_outbox: the three forms and the consumer group binding", () => {
  beforeAll(async () => {
    await db.sql`SELECT tide.outbox_create('bind')`;
    await db.sql`SELECT tide.outbox_create('other')`;
  });

  it("with config.sink_type, the third argument is the consumer group, created if missing", async () => {
    await db.sql`SELECT tide.relay_set_outbox('explicit', 'bind', 'my-group', '{"sink_type": "stdout"}'::jsonb)`;
    expect(await configOf("explicit")).toMatchObject({ sink_type: "stdout", consumer_group: "my-group", outbox: "bind" });
    expect(await groupsOf("bind")).toEqual(["my-group"]);
  });

  it("a group created for a pipeline starts where config.auto_offset_reset says", async () => {
    await db.sql`SELECT tide.outbox_publish('other', '{"old": true}'::jsonb)`;
    await db.sql`SELECT tide.relay_set_outbox('tail', 'other', 'tail-group', '{"sink_type": "stdout", "auto_offset_reset": "latest"}'::jsonb)`;
    const [group] = await db.sql`SELECT auto_offset_reset FROM tide.consumer_groups WHERE group_name = 'tail-group'`;
    expect(group.auto_offset_reset).toBe("latest");
    const [{ id }] = await db.sql`SELECT tide.outbox_publish('other', '{"new": true}'::jsonb) AS id`;
    expect(await deliver(db.sql, "other", "tail-group")).toEqual([id]);
  });

  it("config.consumer_group names the group when the third argument is the sink type", async () => {
    await db.sql`SELECT tide.relay_set_outbox('configured', 'bind', 'stdout', '{"consumer_group": "from-config"}'::jsonb)`;
    expect(await configOf("configured")).toMatchObject({ sink_type: "stdout", consumer_group: "from-config" });
    await db.sql`SELECT tide.relay_set_outbox('configured3', 'bind', '{"sink_type": "stdout", "consumer_group": "from-config-3"}'::jsonb)`;
    expect(await configOf("configured3")).toMatchObject({ sink_type: "stdout", consumer_group: "from-config-3" });
  });

  it("an existing unbound '<sink>-relay' group on the outbox is taken", async () => {
    await db.sql`SELECT tide.create_consumer_group('file-relay', 'bind')`;
    await db.sql`SELECT tide.relay_set_outbox('to-file', 'bind', 'file', '{"path": "/tmp/out.jsonl"}'::jsonb)`;
    expect((await configOf("to-file")).consumer_group).toBe("file-relay");
  });

  it("once '<sink>-relay' is bound, the next pipeline of that sink gets a group named after itself", async () => {
    await db.sql`SELECT tide.relay_set_outbox('to-file-2', 'bind', 'file', '{"path": "/tmp/out2.jsonl"}'::jsonb)`;
    expect((await configOf("to-file-2")).consumer_group).toBe("to-file-2");
  });

  it("a '<sink>-relay' group on another outbox is not taken", async () => {
    await db.sql`SELECT tide.create_consumer_group('webhook-relay', 'other')`;
    await db.sql`SELECT tide.relay_set_outbox('hook', 'bind', 'webhook', '{"url": "https://example.com/h"}'::jsonb)`;
    expect((await configOf("hook")).consumer_group).toBe("hook");
  });

  it("without any of those, the 3-argument form creates a group named after the pipeline", async () => {
    await db.sql`SELECT tide.relay_set_outbox('plain', 'bind', '{"sink_type": "stdout"}'::jsonb)`;
    expect((await configOf("plain")).consumer_group).toBe("plain");
    expect(await groupsOf("bind")).toContain("plain");
  });

  it("re-setting a pipeline keeps its group and its position, even when a '<sink>-relay' group frees up", async () => {
    await db.sql`SELECT tide.outbox_publish('bind', '{"n": 1}'::jsonb) FROM generate_series(1, 3)`;
    await deliver(db.sql, "bind", "to-file-2", { count: 2 });
    await db.sql`SELECT tide.relay_delete('to-file')`; // file-relay is unbound now
    await db.sql`SELECT tide.relay_set_outbox('to-file-2', 'bind', 'file', '{"path": "/tmp/changed.jsonl"}'::jsonb, p_batch_size := 7)`;
    expect(await configOf("to-file-2")).toMatchObject({
      consumer_group: "to-file-2",
      batch_size: 7,
      config: { path: "/tmp/changed.jsonl" },
    });
    const [lag] = await db.sql`SELECT lag FROM tide.consumer_lag WHERE group_name = 'to-file-2'`;
    expect(lag.lag).toBe(1n);
  });

  it("re-setting keeps batch size and enabled state that the call does not mention", async () => {
    await db.sql`SELECT tide.relay_disable('to-file-2')`;
    await db.sql`SELECT tide.relay_set_outbox('to-file-2', 'bind', 'file', '{"path": "/tmp/again.jsonl"}'::jsonb)`;
    expect(await configOf("to-file-2")).toMatchObject({ batch_size: 7, enabled: false });
  });

  it("takes batch size from p_batch_size, else config.batch_size, else 100; p_enabled := false parks it", async () => {
    await db.sql`SELECT tide.relay_set_outbox('sized', 'bind', 'stdout', '{"batch_size": 25}'::jsonb, p_enabled := false)`;
    expect(await configOf("sized")).toMatchObject({ batch_size: 25, enabled: false });
    await db.sql`SELECT tide.relay_set_outbox('sized', 'bind', 'stdout', '{"batch_size": 25}'::jsonb, p_batch_size := 500)`;
    expect(await configOf("sized")).toMatchObject({ batch_size: 500, enabled: false });
    expect((await configOf("plain")).batch_size).toBe(100);
  });
});

describe("outbox_create_if_not_exists", () => {
  it("creates the outbox the first time (true), leaves it as it is after (false)", async () => {
    const [first] = await db.sql`SELECT tide.outbox_create_if_not_exists('once', 24, true) AS created`;
    expect(first.created).toBe(true);
    const [again] = await db.sql`SELECT tide.outbox_create_if_not_exists('once', 48) AS created`;
    expect(again.created).toBe(false);
    const [row] = await db.sql`SELECT retention_hours, notify FROM tide.outboxes WHERE name = 'once'`;
    expect(row).toEqual({ retention_hours: 24, notify: true });
  });
});

describe("relay_set_inbox", () => {
  beforeAll(async () => {
    await db.sql`SELECT tide.inbox_create('events')`;
  });

  it("takes the source from config.source_type", async () => {
    await db.sql`SELECT tide.relay_set_inbox('from-kafka', 'events', '{"source_type": "kafka", "brokers": "k:9092", "topics": ["a", "b"]}'::jsonb)`;
    expect(await configOf("from-kafka")).toMatchObject({
      direction: "reverse", source_type: "kafka", inbox: "events", batch_size: 100, idempotent: true, enabled: true,
    });
  });

  it("takes the source, batch size and idempotence from arguments", async () => {
    await db.sql`SELECT tide.relay_set_inbox('from-nats', 'events', '{"url": "nats://n:4222", "subject": "s.>"}'::jsonb,
                                             p_source := 'nats', p_batch_size := 50, p_idempotent := false)`;
    expect(await configOf("from-nats")).toMatchObject({ source_type: "nats", batch_size: 50, idempotent: false });
    const [row] = await db.sql`SELECT direction, outbox_name, consumer_group, inbox_name FROM tide.relay_pipelines WHERE name = 'from-nats'`;
    expect(row).toEqual({ direction: "reverse", outbox_name: null, consumer_group: null, inbox_name: "events" });
  });

  it("refuses p_source and config.source_type that disagree", async () => {
    await expectError(
      db.sql`SELECT tide.relay_set_inbox('mixed', 'events', '{"source_type": "kafka", "url": "x", "subject": "s"}'::jsonb, p_source := 'nats')`,
      "'nats'", "'kafka'", "disagree",
    );
  });
});

describe("relay_get_config and relay_list_configs redact secrets", () => {
  const SECRETS = ["hunter2", "tok-123", "pw-top", "sasl-pw", "whsec_abc", "Bearer abc", "natspw", "k3y"];
  beforeAll(async () => {
    await db.sql`SELECT tide.outbox_create('secret')`;
    await db.sql`SELECT tide.relay_set_outbox('leaky', 'secret', 'webhook', ${db.sql.json({
      url: "https://svc:hunter2@hooks.example.com/orders",
      token: "tok-123",
      password: "pw-top",
      api_key: "k3y",
      sasl: { mechanism: "scram-sha-256", username: "alice", password: "sasl-pw" },
      signing: { secret: "whsec_abc", algorithm: "hmac-sha256" },
      headers: { Authorization: "Bearer abc", "X-Team": "payments" },
      key: "{event_type}",
      timeout_ms: 5000,
    })}::jsonb)`;
    await db.sql`SELECT tide.relay_set_inbox('leaky-in', 'events', '{"url": "nats://relay:natspw@nats:4222", "subject": "s"}'::jsonb, p_source := 'nats')`;
  });

  it("relay_get_config hides every secret and keeps the other values", async () => {
    const config = await configOf("leaky");
    expect(config.config).toEqual({
      url: "https://svc:***@hooks.example.com/orders",
      token: "***",
      password: "***",
      api_key: "***",
      sasl: { mechanism: "scram-sha-256", username: "alice", password: "***" },
      signing: { secret: "***", algorithm: "hmac-sha256" },
      headers: { Authorization: "***", "X-Team": "payments" },
      key: "{event_type}",
      timeout_ms: 5000,
    });
    expect((await configOf("leaky-in")).config.url).toBe("nats://relay:***@nats:4222");
  });

  it("relay_list_configs shows no secret anywhere", async () => {
    const rows = await db.sql`SELECT * FROM tide.relay_list_configs()`;
    const text = JSON.stringify(rows.map((r) => r.config));
    for (const secret of SECRETS) expect(text).not.toContain(secret);
    const leaky = rows.find((r) => r.name === "leaky");
    expect(leaky).toMatchObject({ direction: "forward", source: "secret", target: "webhook", consumer_group: "leaky" });
    expect(leaky?.config.headers["X-Team"]).toBe("payments");
  });

  it("the catalog table keeps the raw config the relay needs", async () => {
    const [row] = await db.sql`SELECT config FROM tide.relay_pipelines WHERE name = 'leaky'`;
    expect(row.config.sasl.password).toBe("sasl-pw");
  });
});

describe("redaction agrees with the relay's own (core/redact.ts)", () => {
  // core/redact.ts says relay_get_config masks the same keys; these are the cases where it does not.
  async function redacted(config: Parameters<typeof db.sql.json>[0]) {
    await db.sql`SELECT tide.relay_set_outbox('leaky-2', 'secret', 'stdout', ${db.sql.json(config)}::jsonb)`;
    return (await configOf("leaky-2")).config;
  }

  it("masks a passphrase (e.g. the TLS key passphrase)", async () => {
    const config = await redacted({ ssl: { passphrase: "pp-secret", rejectUnauthorized: true } });
    expect(config.ssl).toEqual({ passphrase: "***", rejectUnauthorized: true });
  });

  it("masks the password of a keyword-form connection string", async () => {
    const config = await redacted({ postgres_url: "host=db user=tide password=kw-secret dbname=app" });
    expect(config.postgres_url).toBe("host=db user=tide password=*** dbname=app");
  });

  it("masks all of a URL password that contains an unencoded @", async () => {
    const config = await redacted({ url: "nats://relay:p@ss@nats:4222" });
    expect(JSON.stringify(config)).not.toContain("ss@nats");
    expect(config.url).toBe("nats://relay:***@nats:4222");
  });
});

describe("NOTIFY tide_relay_config", () => {
  it("announces every pipeline change with the pipeline name, and nothing for a rejected change", async () => {
    await db.sql`SELECT tide.outbox_create('notified')`;
    await db.sql`SELECT tide.inbox_create('notified_in')`;
    const changes = await listen(db.sql, "tide_relay_config");
    try {
      await db.sql`SELECT tide.relay_set_outbox('n-out', 'notified', 'stdout', '{}'::jsonb)`;
      expect(await changes.next()).toBe("n-out");
      await db.sql`SELECT tide.relay_set_inbox('n-in', 'notified_in', '{"path": "/hooks/in"}'::jsonb, p_source := 'webhook')`;
      expect(await changes.next()).toBe("n-in");
      await db.sql`SELECT tide.relay_set_outbox('n-out', 'notified', 'stdout', '{"pretty": true}'::jsonb)`;
      expect(await changes.next()).toBe("n-out");
      await db.sql`SELECT tide.relay_disable('n-out')`;
      expect(await changes.next()).toBe("n-out");
      await db.sql`SELECT tide.relay_enable('n-out')`;
      expect(await changes.next()).toBe("n-out");

      await db.sql`SELECT tide.outbox_publish('notified', '{}'::jsonb)`;
      await db.sql`SELECT tide.consumer_group_rewind('n-out', 'notified', p_to_id := 0, p_force := true)`;
      expect(await changes.next()).toBe("n-out");
      const [{ id }] = await db.sql`SELECT id FROM tide.outbox_messages WHERE outbox = 'notified'`;
      const [{ dlq }] = await db.sql`SELECT tide.relay_dlq_add('n-out', ${id}, 'refused') AS dlq`;
      await db.sql`SELECT tide.relay_dlq_requeue(${dlq}::bigint)`;
      expect(await changes.next()).toBe("n-out");

      await expectError(db.sql`SELECT tide.relay_set_outbox('n-bad', 'notified', 'kafka', '{}'::jsonb)`, "kafka config needs");
      await expectError(db.sql`SELECT tide.relay_disable('n-missing')`, "does not exist");
      await db.sql`SELECT tide.relay_delete('n-in')`;
      expect(await changes.next()).toBe("n-in"); // the rejected calls sent nothing before it
    } finally {
      await changes.close();
    }
  });
});

describe("relay_enable / relay_disable / relay_delete", () => {
  beforeAll(async () => {
    await db.sql`SELECT tide.outbox_create('life')`;
    await db.sql`SELECT tide.relay_set_outbox('life-out', 'life', 'stdout', '{}'::jsonb)`;
  });

  it("disabling and enabling flips the pipeline, visible in relay_get_config and pipeline_status", async () => {
    await db.sql`SELECT tide.relay_disable('life-out')`;
    expect((await configOf("life-out")).enabled).toBe(false);
    const [status] = await db.sql`SELECT enabled, direction, source, target FROM tide.pipeline_status WHERE pipeline = 'life-out'`;
    expect(status).toEqual({ enabled: false, direction: "forward", source: "life", target: "stdout" });
    await db.sql`SELECT tide.relay_enable('life-out')`;
    expect((await configOf("life-out")).enabled).toBe(true);
  });

  it("deleting removes the pipeline but keeps its consumer group and position for a successor", async () => {
    await db.sql`SELECT tide.outbox_publish('life', '{"n": 1}'::jsonb) FROM generate_series(1, 2)`;
    await deliver(db.sql, "life", "life-out", { count: 1 });
    await db.sql`SELECT tide.relay_delete('life-out')`;
    await expectError(db.sql`SELECT tide.relay_get_config('life-out')`, `pipeline "life-out" does not exist`);
    expect(await groupsOf("life")).toEqual(["life-out"]);
    await db.sql`SELECT tide.relay_set_outbox('life-next', 'life', 'life-out', '{"sink_type": "stdout"}'::jsonb)`;
    const [lag] = await db.sql`SELECT lag FROM tide.pipeline_status WHERE pipeline = 'life-next'`;
    expect(lag.lag).toBe(1n);
  });
});

describe("outbox enable / disable / drop", () => {
  beforeAll(async () => {
    await db.sql`SELECT tide.outbox_create('switch')`;
    await db.sql`SELECT tide.create_consumer_group('g', 'switch')`;
  });

  it("a disabled outbox refuses publishes; enabled again, it accepts them", async () => {
    await db.sql`SELECT tide.outbox_publish('switch', '{"before": true}'::jsonb)`;
    await db.sql`SELECT tide.outbox_disable('switch')`;
    await expectError(db.sql`SELECT tide.outbox_publish('switch', '{}'::jsonb)`, `outbox "switch" is disabled`);
    await db.sql`SELECT tide.outbox_enable('switch')`;
    await db.sql`SELECT tide.outbox_publish('switch', '{"after": true}'::jsonb)`;
    expect(await deliver(db.sql, "switch", "g")).toHaveLength(2);
  });

  it("enable and disable name an outbox that does not exist", async () => {
    await expectError(db.sql`SELECT tide.outbox_disable('nope')`, `outbox "nope" does not exist`);
    await expectError(db.sql`SELECT tide.outbox_enable('nope')`, `outbox "nope" does not exist`);
  });

  it("outbox_drop and drop_consumer_group refuse while a pipeline uses them", async () => {
    await db.sql`SELECT tide.relay_set_outbox('switch-out', 'switch', 'g', '{"sink_type": "stdout"}'::jsonb)`;
    await expectError(db.sql`SELECT tide.outbox_drop('switch')`, `outbox "switch" is used by pipeline "switch-out"`);
    await expectError(db.sql`SELECT tide.drop_consumer_group('g', 'switch')`, `is used by pipeline "switch-out"`);
    const [{ n }] = await db.sql`SELECT count(*)::int AS n FROM tide.outbox_messages WHERE outbox = 'switch'`;
    expect(n).toBe(2);
  });

  it("after the pipeline is deleted, the outbox drops with its messages and groups", async () => {
    await db.sql`SELECT tide.relay_delete('switch-out')`;
    await db.sql`SELECT tide.outbox_drop('switch')`;
    const [state] = await db.sql`
      SELECT (SELECT count(*) FROM tide.outboxes WHERE name = 'switch')::int AS outboxes,
             (SELECT count(*) FROM tide.outbox_messages WHERE outbox = 'switch')::int AS messages,
             (SELECT count(*) FROM tide.consumer_groups WHERE outbox_name = 'switch')::int AS groups`;
    expect(state).toEqual({ outboxes: 0, messages: 0, groups: 0 });
    await expectError(db.sql`SELECT tide.outbox_drop('switch')`, `outbox "switch" does not exist`);
  });

  it("a consumer group no pipeline uses can be dropped; inbox_drop refuses while a pipeline uses the inbox", async () => {
    await db.sql`SELECT tide.create_consumer_group('spare', 'bind')`;
    await db.sql`SELECT tide.drop_consumer_group('spare', 'bind')`;
    expect(await groupsOf("bind")).not.toContain("spare");
    await expectError(db.sql`SELECT tide.drop_consumer_group('spare', 'bind')`, `consumer group "spare" does not exist`);
    await expectError(db.sql`SELECT tide.inbox_drop('events')`, `inbox "events" is used by pipeline`);
  });
});
