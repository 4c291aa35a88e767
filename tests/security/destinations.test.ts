// Rendered destinations against a publisher who controls a message's topic, payload and headers:
// a value substituted into a NATS subject, a Kafka topic or a webhook URL cannot move the message
// somewhere the template was not written for. A topic of "$JS.API.STREAM.DELETE.<stream>" is
// dead-lettered and the stream survives; a "." in a value is refused unless allow_dots_in names its
// placeholder; a Kafka value cannot lead into "_" topics; a URL value cannot change the host or
// climb the path. Each refusal is a permanent failure naming the value (dead-lettered, never
// dropped). Real NATS with JetStream, a real Kafka broker, a real HTTP server; the relay logs in as
// a LOGIN role holding only tide_relay and the publisher as one holding only tide_publisher.

import { afterAll, beforeAll, describe, expect, it, setDefaultTimeout } from "bun:test";
import { connect as connectNats, type NatsConnection } from "@nats-io/transport-node";
import { jetstreamManager, type JetStreamManager } from "@nats-io/jetstream";
import { Kafka, logLevel } from "kafkajs";
import { connect, type Sql } from "../../core/db.ts";
import type { OutboxMessage, PluginContext } from "../../core/plugin.ts";
import { toJson } from "../../plugins/shared.ts";
import type { Relay } from "../../core/relay.ts";
import { kafkaSink } from "../../plugins/kafka/index.ts";
import { natsSink } from "../../plugins/nats/index.ts";
import webhookSink from "../../plugins/webhook/index.ts";
import { collectNats, parseConfig, pluginContext } from "../support/plugins.ts";
import { createTestDatabase, loginRole, type TestDatabase } from "../support/postgres.ts";
import { startRelay, waitFor } from "../support/relay.ts";
import { requireService } from "../support/services.ts";

setDefaultTimeout(60_000);

const NATS_URL = "nats://127.0.0.1:4222";
const BROKER = "127.0.0.1:9092";
const natsUp = await requireService("nats", "127.0.0.1", 4222);
const kafkaUp = await requireService("kafka", "127.0.0.1", 9092);

const token = () => `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;
const context = (overrides: Partial<PluginContext> = {}) => pluginContext("destinations-test", overrides);

function message(id: number, overrides: Partial<OutboxMessage> = {}): OutboxMessage {
  const fields = {
    id: BigInt(id),
    outbox: "orders",
    topic: null,
    payload: { order_id: id },
    headers: {},
    dedupKey: `orders:${id}`,
    eventType: "order.created",
    op: "publish",
    createdAt: new Date(),
    ...overrides,
  };
  return { ...fields, payloadText: overrides.payloadText ?? toJson(fields.payload) };
}

describe.skipIf(!natsUp)("NATS subjects rendered by a running relay", () => {
  const suffix = token();
  const prefix = `guard${suffix}`;
  const stream = `TIDE_GUARD_${suffix}`;
  let db: TestDatabase;
  let publisher: Sql;
  let relay: Relay;
  let nc: NatsConnection;
  let jsm: JetStreamManager;

  beforeAll(async () => {
    nc = await connectNats({ servers: NATS_URL });
    jsm = await jetstreamManager(nc);
    await jsm.streams.add({ name: stream, subjects: [`${prefix}.>`] });
    db = await createTestDatabase();
    await db.sql`SELECT tide.outbox_create('events')`;
    // As configured today: the message's topic is the subject.
    await db.sql`SELECT tide.relay_set_outbox('events-out', 'events', 'nats', ${db.sql.json({ url: NATS_URL, subject_template: "{topic}" })})`;
    publisher = connect((await loginRole(db, "tide_publisher", "dest_pub")).url, { max: 1 });
    relay = await startRelay((await loginRole(db, "tide_relay", "dest_relay")).url);
  });

  afterAll(async () => {
    await relay?.stop();
    await publisher?.end();
    await jsm?.streams.delete(stream).catch(() => {});
    await nc?.close();
    await db.drop();
  });

  it("dead-letters a topic of $JS.API.STREAM.DELETE.<stream>, and the stream survives to store the next message", async () => {
    const attack = `$JS.API.STREAM.DELETE.${stream}`;
    await publisher`SELECT tide.outbox_publish('events', ${attack}, '{"n": 1}'::jsonb)`;
    // A dotted topic still becomes a multi-token subject.
    await publisher`SELECT tide.outbox_publish('events', ${`${prefix}.orders.created`}, '{"n": 2}'::jsonb)`;

    const [dead] = await waitFor("the dead letter", async () =>
      await db.sql`SELECT topic, error FROM tide.relay_dlq WHERE pipeline = 'events-out'`.then((rows) => rows.length > 0 && rows));
    expect(dead!.topic).toBe(attack);
    expect(dead!.error).toContain(`it rendered "${attack}"`);
    expect(dead!.error).toContain('subjects starting with "$" are the NATS server\'s own APIs');
    expect(dead!.error).toContain("start subject_template with it");

    await waitFor("the next message in the stream", async () => (await jsm.streams.info(stream)).state.messages === 1);
    const stored = await jsm.streams.getMessage(stream, { seq: 1 });
    expect(stored!.subject).toBe(`${prefix}.orders.created`);
    expect(stored!.json()).toEqual({ n: 2 });
  });
});

describe.skipIf(!natsUp)("NATS subject_template values", () => {
  let nc: NatsConnection;
  beforeAll(async () => {
    nc = await connectNats({ servers: NATS_URL });
  });
  afterAll(async () => {
    await nc?.close();
  });

  it("refuses a value whose \".\" would add subject tokens, naming it and allow_dots_in; delivers the others", async () => {
    const prefix = `tenants${token()}`;
    const sink = natsSink.create(await parseConfig(natsSink, { url: NATS_URL, subject_template: `${prefix}.{payload.tenant}.orders` }), context());
    const received = collectNats(nc, `${prefix}.>`, 2);
    await nc.flush();
    await sink.connect();
    try {
      const failures = await sink.publish([
        message(1, { payload: { tenant: "acme" } }),
        message(2, { payload: { tenant: "globex.orders.audit" } }),
        message(3, { payload: { tenant: "initech" } }),
      ]);
      expect(failures.map((f) => [f.id, f.retriable])).toEqual([[2n, false]]);
      expect(failures[0]!.error.message).toContain('{payload.tenant} is "globex.orders.audit"');
      expect(failures[0]!.error.message).toContain(`add "payload.tenant" to 'allow_dots_in'`);
    } finally {
      await sink.close();
    }
    expect((await received).map((m) => m.subject)).toEqual([`${prefix}.acme.orders`, `${prefix}.initech.orders`]);
  });

  it("lets a value span several tokens when allow_dots_in names its placeholder", async () => {
    const prefix = `spans${token()}`;
    const config = { url: NATS_URL, subject_template: `${prefix}.{payload.path}`, allow_dots_in: ["payload.path"] };
    const sink = natsSink.create(await parseConfig(natsSink, config), context());
    const received = collectNats(nc, `${prefix}.>`, 1);
    await nc.flush();
    await sink.connect();
    try {
      expect(await sink.publish([message(1, { payload: { path: "eu.west.orders" } })])).toEqual([]);
    } finally {
      await sink.close();
    }
    expect((await received).map((m) => m.subject)).toEqual([`${prefix}.eu.west.orders`]);
  });

  it("refuses a value that leads the subject into \"$\", unless the template itself starts with \"$\"", async () => {
    const sink = natsSink.create(await parseConfig(natsSink, { url: NATS_URL, subject_template: "{payload.service}", mode: "core" }), context());
    await sink.connect();
    try {
      const failures = await sink.publish([message(1, { payload: { service: "$SYS" } })]);
      expect(failures.map((f) => [f.id, f.retriable])).toEqual([[1n, false]]);
      expect(failures[0]!.error.message).toContain('it rendered "$SYS"');
    } finally {
      await sink.close();
    }

    const own = `$tide${token()}`;
    const received = collectNats(nc, `${own}.>`, 1);
    await nc.flush();
    const configured = natsSink.create(await parseConfig(natsSink, { url: NATS_URL, subject_template: `${own}.{payload.key}`, mode: "core" }), context());
    await configured.connect();
    try {
      expect(await configured.publish([message(2, { payload: { key: "k1" } })])).toEqual([]);
    } finally {
      await configured.close();
    }
    expect((await received).map((m) => m.subject)).toEqual([`${own}.k1`]);
  });

  it("rejects an allow_dots_in entry that is not a placeholder of the template, when the sink is created", async () => {
    const config = await parseConfig(natsSink, { url: NATS_URL, subject_template: "orders.{payload.region}", allow_dots_in: ["payload.regoin"] });
    expect(() => natsSink.create(config, context())).toThrow(/has no placeholder \{payload.regoin\} named in 'allow_dots_in' \(its placeholders: "payload.region"\)/);
  });
});

describe.skipIf(!kafkaUp)("Kafka topic_template values", () => {
  const kafka = new Kafka({ clientId: "tide-destinations-test", brokers: [BROKER], logLevel: logLevel.NOTHING });

  it("refuses a value with \".\" and a value leading into \"_\" topics; creates neither topic and delivers the others", async () => {
    const prefix = `tenant.${token()}`;
    const internal = `_tide_internal_${token()}`;
    const sink = kafkaSink.create(await parseConfig(kafkaSink, { brokers: BROKER, topic_template: "{payload.tenant}-orders" }), context());
    const dotted = kafkaSink.create(await parseConfig(kafkaSink, { brokers: BROKER, topic_template: `${prefix}.{payload.tenant}` }), context());
    await sink.connect();
    await dotted.connect();
    try {
      const leading = await sink.publish([message(1, { payload: { tenant: internal } })]);
      expect(leading.map((f) => [f.id, f.retriable])).toEqual([[1n, false]]);
      expect(leading[0]!.error.message).toContain(`it rendered "${internal}-orders"`);
      expect(leading[0]!.error.message).toContain('topics starting with "_" belong to Kafka');

      const failures = await dotted.publish([
        message(2, { payload: { tenant: "acme" } }),
        message(3, { payload: { tenant: "globex.audit" } }),
      ]);
      expect(failures.map((f) => [f.id, f.retriable])).toEqual([[3n, false]]);
      expect(failures[0]!.error.message).toContain('{payload.tenant} is "globex.audit"');
      expect(failures[0]!.error.message).toContain(`add "payload.tenant" to 'allow_dots_in'`);
    } finally {
      await sink.close();
      await dotted.close();
    }
    const admin = kafka.admin();
    await admin.connect();
    try {
      const topics = await admin.listTopics();
      expect(topics).toContain(`${prefix}.acme`);
      expect(topics).not.toContain(`${prefix}.globex.audit`);
      expect(topics).not.toContain(`${internal}-orders`);
      await admin.deleteTopics({ topics: [`${prefix}.acme`] }).catch(() => {});
    } finally {
      await admin.disconnect();
    }
  });

  it("keeps delivering a dotted message topic ({topic}) as a dotted Kafka topic", async () => {
    const topic = `orders.${token()}.created`;
    const sink = kafkaSink.create(await parseConfig(kafkaSink, { brokers: BROKER, topic_template: "{topic}" }), context());
    await sink.connect();
    try {
      expect(await sink.publish([message(1, { topic })])).toEqual([]);
    } finally {
      await sink.close();
    }
    const admin = kafka.admin();
    await admin.connect();
    try {
      expect(await admin.listTopics()).toContain(topic);
      await admin.deleteTopics({ topics: [topic] }).catch(() => {});
    } finally {
      await admin.disconnect();
    }
  });
});

describe("webhook url_template values", () => {
  const received: string[] = [];
  let server: ReturnType<typeof Bun.serve>;

  beforeAll(() => {
    server = Bun.serve({
      hostname: "127.0.0.1",
      port: 0,
      fetch(request) {
        const url = new URL(request.url);
        received.push(url.pathname + url.search);
        return new Response("ok");
      },
    });
  });
  afterAll(() => {
    server?.stop(true);
  });

  it("fill one path segment or one query value: no \"/\", \"?\", \"&\" or \"..\" from a value reaches the request", async () => {
    const config = { url_template: `http://127.0.0.1:${server.port}/hooks/{payload.tenant}/events?source={payload.source}` };
    const sink = webhookSink.create(await parseConfig(webhookSink, config), context());
    received.length = 0;
    const failures = await sink.publish([
      message(1, { payload: { tenant: "acme", source: "shop" } }),
      message(2, { payload: { tenant: "../../admin", source: "shop" } }),
      message(3, { payload: { tenant: "acme", source: "shop&admin=1#x" } }),
      message(4, { payload: { tenant: "..", source: "shop" } }),
      message(5, { payload: { tenant: "a/../../admin?x=", source: "shop" } }),
    ]);
    await sink.close();
    expect(failures.map((f) => [f.id, f.retriable])).toEqual([[4n, false]]);
    expect(failures[0]!.error.message).toContain('{payload.tenant} is "..", which would move up the URL path');
    expect(received).toEqual([
      "/hooks/acme/events?source=shop",
      "/hooks/..%2F..%2Fadmin/events?source=shop",
      "/hooks/acme/events?source=shop%26admin%3D1%23x",
      "/hooks/a%2F..%2F..%2Fadmin%3Fx%3D/events?source=shop",
    ]);
  });

  it("may not choose the host or port: a placeholder before the path is a config error when the sink is created", async () => {
    for (const url_template of [
      `http://127.0.0.1:{payload.port}/hook`,
      `http://{payload.host}/hook`,
      `http://127.0.0.1:${server.port}{payload.path}`,
      `{payload.url}`,
    ]) {
      const config = await parseConfig(webhookSink, { url_template });
      expect(() => webhookSink.create(config, context()), url_template).toThrow(/'url_template' .*a placeholder may not choose the scheme, host or port/);
    }
  });
});
