// The kafka sink and source against a real broker (scripts/kafka.sh start): what a kafkajs
// consumer reads back from the sink, what the source hands out, and when it commits offsets.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { AclOperationTypes, AclPermissionTypes, AclResourceTypes, Kafka, logLevel, type Producer, ResourcePatternTypes } from "kafkajs";
import type { OutboxMessage, PluginContext, PluginDefinition, SourceInstance } from "../../core/plugin.ts";
import { toJson } from "../../plugins/shared.ts";
import { availableCompressions } from "../../plugins/kafka/codecs.ts";
import { kafkaSink, kafkaSource } from "../../plugins/kafka/index.ts";
import { requireService } from "../support/services.ts";
import { parseConfig, pluginContext, validateConfig } from "../support/plugins.ts";

const context = (overrides: Partial<PluginContext> = {}) => pluginContext("kafka-test", overrides);
const parse = parseConfig;
const validate = validateConfig;

const BROKER = "127.0.0.1:9092";
const ROOT = join(import.meta.dir, "..", "..");
const up = await requireService("kafka", "127.0.0.1", 9092);

function message(id: number, overrides: Partial<OutboxMessage> = {}): OutboxMessage {
  const fields = {
    id: BigInt(id),
    outbox: "orders",
    topic: null,
    payload: { order_id: id, total: id * 10 },
    headers: { event_type: "order.created", schema_version: "1.0", attempt: 3 },
    dedupKey: `orders:${id}`,
    eventType: "order.created",
    op: "publish",
    createdAt: new Date(),
    ...overrides,
  };
  return { ...fields, payloadText: overrides.payloadText ?? toJson(fields.payload) };
}

const unique = (name: string) => `tide-${name}-${Date.now()}-${Math.random().toString(36).slice(2, 8)}`;

const kafka = new Kafka({ clientId: "tide-tests", brokers: [BROKER], logLevel: logLevel.NOTHING });

interface Received {
  topic: string;
  partition: number;
  key: string | null;
  value: string;
  headers: Record<string, string>;
}

/** Reads `count` records of `topics` from the beginning with a fresh group. */
async function consume(topics: string[], count: number, timeoutMs = 20_000): Promise<Received[]> {
  const consumer = kafka.consumer({ groupId: unique("reader") });
  const received: Received[] = [];
  try {
    await consumer.connect();
    await consumer.subscribe({ topics, fromBeginning: true });
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`got ${received.length} of ${count} records`)), timeoutMs);
      consumer.run({
        eachMessage: async ({ topic, partition, message: record }) => {
          const headers = Object.fromEntries(Object.entries(record.headers ?? {}).map(([k, v]) => [k, String(v)]));
          received.push({ topic, partition, key: record.key?.toString() ?? null, value: record.value!.toString(), headers });
          if (received.length >= count) {
            clearTimeout(timer);
            resolve();
          }
        },
      }).catch(reject);
    });
  } finally {
    await consumer.disconnect();
  }
  return received;
}

describe.skipIf(!up)("kafka sink", () => {
  it("delivers a batch with key, headers and the JSON payload", async () => {
    const topic = unique("sink");
    const sink = kafkaSink.create(await parse(kafkaSink, { brokers: BROKER, topic, key: "{event_type}" }), context());
    await sink.connect();
    try {
      const batch = [1, 2, 3].map((id) => message(id, { payloadText: `{"big": 12345678901234567890, "order_id": ${id}}` }));
      expect(await sink.publish(batch)).toEqual([]);
    } finally {
      await sink.close();
    }
    const records = await consume([topic], 3);
    expect(records.map((r) => r.value)).toEqual([1, 2, 3].map((id) => `{"big": 12345678901234567890, "order_id": ${id}}`));
    expect(records.map((r) => r.key)).toEqual(["order.created", "order.created", "order.created"]);
    expect(records[0]!.headers).toEqual({
      event_type: "order.created",
      schema_version: "1.0",
      attempt: "3",
      "tide-dedup-key": "orders:1",
      "tide-event-type": "order.created",
      "tide-outbox": "orders",
      "tide-message-id": "1",
    });
  });

  it("sends header values that are not strings as JSON text", async () => {
    const topic = unique("headers");
    const sink = kafkaSink.create(await parse(kafkaSink, { brokers: BROKER, topic }), context());
    await sink.connect();
    try {
      const headers = { event_type: "x", n: 3, flag: true, meta: { a: [1, "b"] } };
      expect(await sink.publish([message(1, { headers })])).toEqual([]);
    } finally {
      await sink.close();
    }
    const [record] = await consume([topic], 1);
    expect(record!.headers).toMatchObject({ event_type: "x", n: "3", flag: "true", meta: '{"a":[1,"b"]}' });
  });

  it("keys a record by the message's key header when no key template is set (table capture's primary key)", async () => {
    const topic = unique("keyed");
    const sink = kafkaSink.create(await parse(kafkaSink, { brokers: BROKER, topic }), context());
    await sink.connect();
    try {
      const failures = await sink.publish([
        message(1, { headers: { key: { id: 5 } } }),
        message(2, { headers: { key: "order-2" } }),
        message(3, { headers: {} }),
      ]);
      expect(failures).toEqual([]);
    } finally {
      await sink.close();
    }
    const records = await consume([topic], 3);
    expect(records.map((r) => r.key)).toEqual(['{"id":5}', "order-2", null]);
  });

  it("routes each message to the topic its topic_template renders", async () => {
    const prefix = unique("routed");
    const sink = kafkaSink.create(await parse(kafkaSink, { brokers: [BROKER], topic_template: `${prefix}.{event_type}` }), context());
    await sink.connect();
    try {
      const failures = await sink.publish([
        message(1, { eventType: "created" }),
        message(2, { eventType: "cancelled" }),
        message(3, { eventType: "created" }),
      ]);
      expect(failures).toEqual([]);
    } finally {
      await sink.close();
    }
    const records = await consume([`${prefix}.created`, `${prefix}.cancelled`], 3);
    const byTopic = (t: string) => records.filter((r) => r.topic === t).map((r) => r.headers["tide-message-id"]);
    expect(byTopic(`${prefix}.created`)).toEqual(["1", "3"]);
    expect(byTopic(`${prefix}.cancelled`)).toEqual(["2"]);
  });

  it("sends a record that no retry can fix to the DLQ and delivers the rest", async () => {
    const topic = unique("refused");
    const sink = kafkaSink.create(
      await parse(kafkaSink, { brokers: BROKER, topic_template: "{payload.topic}" }),
      context(),
    );
    await sink.connect();
    try {
      const failures = await sink.publish([
        message(1, { payload: { topic } }),
        message(2, { payload: { topic: "not a topic!" } }),
        message(3, { payload: { topic, blob: "x".repeat(2_000_000) } }),
        message(4, { payload: { topic } }),
      ]);
      expect(failures.map((f) => [f.id, f.retriable])).toEqual([[2n, false], [3n, false]]);
      expect(failures[0]!.error.message).toContain("not a valid Kafka topic name");
      expect(failures[1]!.error.message).toContain("message 3: refused by Kafka");
    } finally {
      await sink.close();
    }
    const records = await consume([topic], 2);
    expect(new Set(records.map((r) => r.headers["tide-message-id"]))).toEqual(new Set(["1", "4"]));
  });

  it("compresses with snappy (its codec package is a dependency of tide)", async () => {
    expect(await availableCompressions()).toContain("snappy");
    const topic = unique("snappy");
    const sink = kafkaSink.create(await parse(kafkaSink, { brokers: BROKER, topic, compression: "snappy" }), context());
    try {
      await sink.connect();
      expect(await sink.publish([message(1), message(2)])).toEqual([]);
    } finally {
      await sink.close();
    }
    const records = await consume([topic], 2);
    expect(records.map((r) => JSON.parse(r.value).order_id)).toEqual([1, 2]);
  });

  it("fails connect() within about ten seconds when no broker answers, naming the brokers", async () => {
    const sink = kafkaSink.create(await parse(kafkaSink, { brokers: "127.0.0.1:1", topic: "t" }), context());
    const started = Date.now();
    const error = await sink.connect().then(() => undefined, (e: Error) => e);
    expect(error?.message).toContain("127.0.0.1:1");
    expect((error as { retriable?: boolean }).retriable).toBe(true);
    expect(Date.now() - started).toBeLessThan(12_000);
    await sink.close();
    await sink.close();
  }, 20_000);
});

/** Retries `check` for up to 30 s (ACL changes reach the broker's authorizer asynchronously). */
async function waitForValue(check: () => Promise<boolean>): Promise<boolean> {
  const deadline = Date.now() + 30_000;
  while (Date.now() < deadline) {
    if (await check()) return true;
    await Bun.sleep(250);
  }
  return false;
}

// scripts/kafka.sh also listens with SASL/PLAIN on :9094 (user tide-test), for the sasl options.
const SASL_BROKER = "127.0.0.1:9094";
const saslUp = up && (await requireService("kafka SASL_PLAINTEXT listener (scripts/kafka.sh)", "127.0.0.1", 9094));

describe.skipIf(!saslUp)("kafka sink over SASL", () => {
  // The broker authorizes the SASL user by ACL: it may use topics named tide-sasl-*, nothing else.
  beforeAll(async () => {
    const admin = kafka.admin();
    await admin.connect();
    try {
      await admin.createAcls({
        acl: [{
          resourceType: AclResourceTypes.TOPIC, resourceName: "tide-sasl-", resourcePatternType: ResourcePatternTypes.PREFIXED,
          principal: "User:tide-test", host: "*", operation: AclOperationTypes.ALL, permissionType: AclPermissionTypes.ALLOW,
        }],
      });
    } finally {
      await admin.disconnect();
    }
  });

  it("authenticates with sasl (PLAIN) and delivers", async () => {
    const topic = unique("sasl");
    const config = { brokers: SASL_BROKER, topic, sasl: { mechanism: "plain", username: "tide-test", password: "tide-test-secret" } };
    const sink = kafkaSink.create(await parse(kafkaSink, config), context());
    await sink.connect();
    try {
      expect(await sink.publish([message(1)])).toEqual([]);
    } finally {
      await sink.close();
    }
    const [record] = await consume([topic], 1);
    expect(JSON.parse(record!.value)).toEqual({ order_id: 1, total: 10 });
  });

  it("fails the batch, naming the topic, when the user may not write to it, and delivers once allowed", async () => {
    const topic = unique("denied");
    const config = { brokers: SASL_BROKER, topic, sasl: { mechanism: "plain", username: "tide-test", password: "tide-test-secret" } };
    const sink = kafkaSink.create(await parse(kafkaSink, config), context());
    await sink.connect();
    try {
      const outcome = await sink.publish([message(1)]).then((failures) => failures, (error: Error) => error);
      const text = outcome instanceof Error ? outcome.message : outcome.map((f) => `${f.retriable} ${f.error.message}`).join("\n");
      expect(text).toMatch(/not authorized|authoriz/i);
      expect(text).toContain(topic);
      if (!(outcome instanceof Error)) expect(outcome.every((f) => f.retriable)).toBe(true); // waits in the outbox

      const admin = kafka.admin();
      await admin.connect();
      try {
        await admin.createAcls({
          acl: [{
            resourceType: AclResourceTypes.TOPIC, resourceName: topic, resourcePatternType: ResourcePatternTypes.LITERAL,
            principal: "User:tide-test", host: "*", operation: AclOperationTypes.ALL, permissionType: AclPermissionTypes.ALLOW,
          }],
        });
      } finally {
        await admin.disconnect();
      }
      const delivered = await waitForValue(async () => (await sink.publish([message(1)]).catch(() => [1])).length === 0);
      expect(delivered).toBe(true);
    } finally {
      await sink.close();
    }
    const [record] = await consume([topic], 1);
    expect(JSON.parse(record!.value)).toEqual({ order_id: 1, total: 10 });
  }, 60_000);

  it("refuses a wrong password with an error that says so, without the password", async () => {
    const config = { brokers: SASL_BROKER, topic: unique("sasl"), sasl: { mechanism: "plain", username: "tide-test", password: "Wr0ngPassw0rd" } };
    const sink = kafkaSink.create(await parse(kafkaSink, config), context());
    try {
      const error = await sink.connect().then(() => undefined, (e: Error) => e);
      expect(error?.message).toMatch(/SASL|authenticat/i);
      expect(error?.message).not.toContain("Wr0ngPassw0rd");
    } finally {
      await sink.close();
    }
  }, 30_000);

  it("without sasl, a SASL listener does not let the sink in", async () => {
    const sink = kafkaSink.create(await parse(kafkaSink, { brokers: SASL_BROKER, topic: unique("sasl") }), context());
    try {
      expect(await sink.connect().then(() => "connected", () => "refused")).toBe("refused");
    } finally {
      await sink.close();
    }
  }, 30_000);
});

describe.skipIf(!up)("kafka source", () => {
  let producer: Producer;
  beforeAll(async () => {
    producer = kafka.producer();
    await producer.connect();
  });
  afterAll(async () => {
    await producer.disconnect();
  });

  async function produce(topic: string, values: { value: string; headers?: Record<string, string> }[]) {
    await producer.send({ topic, messages: values });
  }

  async function openSource(topic: string, group: string, overrides: Partial<PluginContext> = {}): Promise<SourceInstance> {
    const source = kafkaSource.create(await parse(kafkaSource, { brokers: BROKER, topic, group_id: group }), context(overrides));
    await source.connect();
    return source;
  }

  const five = (): { value: string; headers?: Record<string, string> }[] => [
    { value: JSON.stringify({ n: 1 }), headers: { event_id: "evt-1" } },
    { value: JSON.stringify({ n: 2 }), headers: { id: "id-2" } },
    { value: JSON.stringify({ n: 3 }), headers: { "tide-dedup-key": "orders:3" } },
    { value: JSON.stringify({ n: 4 }), headers: { ce_id: "ce-4", other: "x" } },
    { value: "plain text, not JSON" },
  ];

  it("hands out the records, commits on ack, and a new member of the group starts after them", async () => {
    const topic = unique("source");
    const group = unique("group");
    await produce(topic, five());
    const first = await openSource(topic, group);
    try {
      const batch = (await first.read())!;
      expect(batch.messages.map((m) => m.transportId)).toEqual(["kafka:0-0", "kafka:0-1", "kafka:0-2", "kafka:0-3", "kafka:0-4"]);
      expect(batch.messages.map((m) => m.eventId)).toEqual(["evt-1", "id-2", "orders:3", "ce-4", undefined]);
      expect(batch.messages.map((m) => JSON.parse(m.payloadText!))).toEqual([{ n: 1 }, { n: 2 }, { n: 3 }, { n: 4 }, "plain text, not JSON"]);
      expect(batch.messages[3]!.headers).toEqual({ ce_id: "ce-4", other: "x" });
      expect(batch.messages[0]!.source).toBe(`kafka:${topic}`);
      await batch.ack();
    } finally {
      await first.close();
    }
    await produce(topic, [{ value: JSON.stringify({ n: 6 }) }]);
    const second = await openSource(topic, group);
    try {
      const batch = (await second.read())!;
      expect(batch.messages.map((m) => JSON.parse(m.payloadText!))).toEqual([{ n: 6 }]);
      await batch.ack();
    } finally {
      await second.close();
    }
  });

  it("takes the id of a structured CloudEvents body as the event id when no header carries one", async () => {
    const topic = unique("cloudevents");
    await produce(topic, [
      { value: JSON.stringify({ specversion: "1.0", id: "ce-structured-1", type: "paid", source: "/pay", data: {} }) },
      { value: JSON.stringify({ specversion: "1.0", id: "ce-structured-2" }), headers: { ce_id: "ce-binary-2" } },
      { value: JSON.stringify({ id: "not-a-cloudevent" }) },
    ]);
    const source = await openSource(topic, unique("group"));
    try {
      const batch = (await source.read())!;
      expect(batch.messages.map((m) => m.eventId)).toEqual(["ce-structured-1", "ce-binary-2", undefined]);
      await batch.ack();
    } finally {
      await source.close();
    }
  });

  it("delivers again after a nack, and to the next member when never acked", async () => {
    const topic = unique("redeliver");
    const group = unique("group");
    await produce(topic, five());
    const first = await openSource(topic, group);
    try {
      const batch = (await first.read())!;
      expect(batch.messages).toHaveLength(5);
      await batch.nack!(new Error("inbox write failed"));
      const again = (await first.read())!;
      expect(again.messages.map((m) => m.transportId)).toEqual(batch.messages.map((m) => m.transportId));
      // Closed without an ack: nothing was committed.
    } finally {
      await first.close();
    }
    const second = await openSource(topic, group);
    try {
      const batch = (await second.read())!;
      expect(batch.messages.map((m) => m.transportId)).toEqual(["kafka:0-0", "kafka:0-1", "kafka:0-2", "kafka:0-3", "kafka:0-4"]);
    } finally {
      await second.close();
    }
  });

  it("slices a fetched batch into ctx.batchSize records, committing slice by slice", async () => {
    const topic = unique("slices");
    const group = unique("group");
    await produce(topic, five());
    const source = await openSource(topic, group, { batchSize: 2 });
    const sizes: number[] = [];
    try {
      for (let i = 0; i < 3; i += 1) {
        const batch = (await source.read())!;
        sizes.push(batch.messages.length);
        await batch.ack();
      }
    } finally {
      await source.close();
    }
    expect(sizes).toEqual([2, 2, 1]);
    const admin = kafka.admin();
    await admin.connect();
    const [offsets] = await admin.fetchOffsets({ groupId: group, topics: [topic] });
    await admin.disconnect();
    expect(offsets!.partitions[0]!.offset).toBe("5");
  });

  it("resolves read() with null once the pipeline stops", async () => {
    const topic = unique("idle");
    await produce(topic, [{ value: "{}" }]);
    const stop = new AbortController();
    const source = await openSource(topic, unique("group"), { signal: stop.signal });
    try {
      const batch = (await source.read())!;
      await batch.ack();
      const pending = source.read();
      setTimeout(() => stop.abort(), 200);
      expect(await pending).toBeNull();
    } finally {
      await source.close();
      await source.close();
    }
  });
});

describe("kafka configs", () => {
  async function problems(definition: PluginDefinition, input: unknown): Promise<string[]> {
    const result = await validate(definition, input);
    return (result.issues ?? []).map((i) => `${(i.path ?? []).map((p) => (typeof p === "object" ? p.key : p)).join(".")}: ${i.message}`);
  }

  it("accepts the seeds' pipeline configs and the examples", async () => {
    const endToEnd = { brokers: "localhost:9092", topic: "order-events", acks: "all", compression: "snappy", key: "{event_type}" };
    expect(await problems(kafkaSink, endToEnd)).toEqual([]);
    expect(await problems(kafkaSink, { brokers: "kafka:9092", topic: "orders" })).toEqual([]);
    expect(await problems(kafkaSink, kafkaSink.example)).toEqual([]);
    expect(await problems(kafkaSource, kafkaSource.example)).toEqual([]);
    expect(await problems(kafkaSource, { brokers: ["a:9092"], topics: ["x", "y"], event_id: "{payload.id}" })).toEqual([]);
    const parsed = (await parse(kafkaSink, endToEnd)) as { acks: number; idempotent: boolean; brokers: string[] };
    expect([parsed.acks, parsed.idempotent, parsed.brokers]).toEqual([-1, true, ["localhost:9092"]]);
  });

  it("rejects invalid configs, naming the key", async () => {
    expect(await problems(kafkaSink, { brokers: "", topic: "t" })).toEqual([expect.stringMatching(/^brokers: /)]);
    expect(await problems(kafkaSink, { brokers: "a", topic: "t" })).toEqual([expect.stringMatching(/^brokers: "a" is not/)]);
    expect(await problems(kafkaSink, { brokers: "a:1", topic: "t", acks: 2 })).toEqual([expect.stringMatching(/^acks: /)]);
    expect(await problems(kafkaSink, { brokers: "a:1", topic: "t", compression: "brotli" })).toEqual([
      expect.stringMatching(/^compression: /),
    ]);
    expect(await problems(kafkaSink, { brokers: "a:1", topic: "t", topics: ["x"] })).toEqual([expect.stringMatching(/topics/)]);
    expect(await problems(kafkaSink, { brokers: "a:1" })).toEqual([expect.stringMatching(/^topic: required/)]);
    expect(await problems(kafkaSink, { brokers: "a:1", topic: "o.{op}" })).toEqual([expect.stringMatching(/^topic: has a placeholder/)]);
    expect(await problems(kafkaSink, { brokers: "a:1", topic: "t", acks: 1, idempotent: true })).toEqual([
      expect.stringMatching(/^idempotent: needs acks/),
    ]);
    expect(await problems(kafkaSink, { brokers: "a:1", topic: "t", sasl: { mechanism: "gssapi", username: "u", password: "p" } }))
      .toEqual([expect.stringMatching(/^sasl.mechanism: /)]);
    expect(await problems(kafkaSource, { brokers: "a:1" })).toEqual([expect.stringMatching(/^topic: required/)]);
    expect(await problems(kafkaSource, { brokers: "a:1", topic: "t", group_id: "g", consumer_group: "h" })).toEqual([
      expect.stringMatching(/^consumer_group: /),
    ]);
  });

  it("rejects a compression whose codec package is not installed, naming the key and the package", async () => {
    expect(await availableCompressions()).not.toContain("lz4");
    expect(await problems(kafkaSink, { brokers: "a:1", topic: "t", compression: "lz4" })).toEqual([
      expect.stringMatching(/^compression: compression "lz4" is not available: its codec package kafkajs-lz4 is not installed.*npm install kafkajs-lz4/),
    ]);
    expect(await problems(kafkaSink, { brokers: "a:1", topic: "t", compression: "gzip" })).toEqual([]);
  });

  it("makes pg-tide check fail for a pipeline that compresses with a codec that is not installed", async () => {
    const dir = await mkdtemp(join(tmpdir(), "tide-kafka-check-"));
    try {
      const manifest = join(dir, "pg-tide.toml");
      await writeFile(manifest, `
[[pipelines]]
name = "orders-kafka"
outbox = "orders"
sink_type = "kafka"
[pipelines.config]
brokers = "127.0.0.1:9092"
topic = "orders"
compression = "lz4"
`);
      const child = Bun.spawn([process.execPath, "main.ts", "check", "--config", manifest], { cwd: ROOT, stdout: "pipe", stderr: "pipe" });
      const [stdout, code] = await Promise.all([new Response(child.stdout).text(), child.exited]);
      expect(code).toBe(1);
      expect(stdout).toContain("0 of 1 pipeline configs are valid");
      expect(stdout).toContain(`pipeline "orders-kafka": kafka sink config is invalid: 'compression': compression "lz4" is not available`);
      expect(stdout).toContain("npm install kafkajs-lz4");
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it("turns acks 1 into a non-idempotent producer and an unknown placeholder into a config error at create()", async () => {
    const parsed = (await parse(kafkaSink, { brokers: "a:1", topic: "t", acks: "1" })) as { acks: number; idempotent: boolean };
    expect([parsed.acks, parsed.idempotent]).toEqual([1, false]);
    const templated = await parse(kafkaSink, { brokers: "a:1", topic_template: "{nope}" });
    expect(() => kafkaSink.create(templated, context())).toThrow(/nope/);
  });
});
