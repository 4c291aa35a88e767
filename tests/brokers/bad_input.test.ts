// What a running relay does with broken surroundings and bad input: brokers that do not answer,
// a JetStream-only sink with no stream behind its subject, and inbound messages that are not JSON.
// A failing pipeline says why in tide.pipeline_status, keeps its messages in the outbox, and never
// holds back the other pipelines; a malformed inbound message is stored as it is and never blocks
// the messages after it.

import { afterAll, beforeAll, describe, expect, it, setDefaultTimeout } from "bun:test";
import type { Msg } from "@nats-io/transport-node";
import type { Relay } from "../../core/relay.ts";
import { KAFKA_BROKER, KafkaReader, NATS_URL, NatsTestClient, produceKafka, unique } from "../support/brokers.ts";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { startRelay, waitFor } from "../support/relay.ts";
import { requireService } from "../support/services.ts";

const kafkaUp = await requireService("kafka", "127.0.0.1", 9092);
const natsUp = await requireService("nats", "127.0.0.1", 4222);

// Brokers, relays and consumer-group joins take seconds; bun's default per-test timeout is 5 s.
setDefaultTimeout(60_000);

const RUN = unique();

let db: TestDatabase;
let relay: Relay;
let nats: NatsTestClient;

async function statusOf(pipeline: string) {
  const [row] = await db.sql`SELECT healthy, last_error, lag, dlq_depth FROM tide.pipeline_status WHERE pipeline = ${pipeline}`;
  return row;
}

/** Waits until the pipeline reports a failure in pipeline_status, and returns its row. */
async function failureOf(pipeline: string) {
  return await waitFor(`${pipeline} to report a failure`, async () => {
    const row = await statusOf(pipeline);
    return row?.healthy === false && row.last_error && row;
  }, 45_000);
}

async function lagOf(group: string): Promise<bigint | undefined> {
  const [row] = await db.sql`SELECT lag FROM tide.consumer_lag WHERE group_name = ${group}`;
  return row?.lag;
}

async function inbox(name: string) {
  return await db.sql.unsafe(`SELECT event_id, jsonb_typeof(payload) AS type, payload FROM tide."${name}_inbox" ORDER BY id`);
}

describe.skipIf(!kafkaUp || !natsUp)("bad surroundings and bad input", () => {
  beforeAll(async () => {
    db = await createTestDatabase();
    nats = await NatsTestClient.connect();
    relay = await startRelay(db.url);
  });
  afterAll(async () => {
    await relay?.stop();
    await nats?.close();
    await db?.drop();
  });

  describe("unreachable brokers", () => {
    it("marks the Kafka and NATS sinks unhealthy naming the broker, keeps their messages, and delivers the others", async () => {
      const goodSubject = `bad.${RUN}.reachable`;
      const goodTopic = `bad-reachable-${RUN}`;
      const onNats: Msg[] = [];
      nats.nc.subscribe(goodSubject, { callback: (_error, msg) => void onNats.push(msg) });
      await nats.nc.flush();
      const kafka = await KafkaReader.start([goodTopic]);
      try {
        await db.sql`SELECT tide.outbox_create('orders')`;
        await db.sql`SELECT tide.relay_set_outbox('kafka-down', 'orders', 'kafka',
                       ${db.sql.json({ brokers: "127.0.0.1:1", topic: "never" })})`;
        await db.sql`SELECT tide.relay_set_outbox('nats-down', 'orders', 'nats',
                       ${db.sql.json({ url: "nats://127.0.0.1:1", subject: "never" })})`;
        await db.sql`SELECT tide.relay_set_outbox('kafka-up', 'orders', 'kafka', ${db.sql.json({ brokers: KAFKA_BROKER, topic: goodTopic })})`;
        await db.sql`SELECT tide.relay_set_outbox('nats-up', 'orders', 'nats', ${db.sql.json({ url: NATS_URL, subject: goodSubject })})`;
        await db.sql`SELECT tide.outbox_publish('orders', jsonb_build_object('n', g)) FROM generate_series(1, 3) g`;

        await waitFor("3 messages on NATS", () => onNats.length === 3);
        expect((await kafka.waitForCount(3)).map((r) => JSON.parse(r.value!).n)).toEqual([1, 2, 3]);
        await waitFor("the reachable pipelines at lag 0", async () => (await lagOf("kafka-up")) === 0n && (await lagOf("nats-up")) === 0n);

        const kafkaDown = await failureOf("kafka-down");
        expect(kafkaDown.last_error).toContain("127.0.0.1:1");
        expect(kafkaDown.last_error).toContain("Kafka");
        const natsDown = await failureOf("nats-down");
        expect(natsDown.last_error).toContain("nats://127.0.0.1:1");

        // Nothing left the outbox for them, and an outage dead-letters nothing.
        expect([kafkaDown.lag, natsDown.lag]).toEqual([3n, 3n]);
        expect([await lagOf("kafka-down"), await lagOf("nats-down")]).toEqual([3n, 3n]);
        expect([kafkaDown.dlq_depth, natsDown.dlq_depth]).toEqual([0n, 0n]);
        const pending = await db.sql`SELECT id, pending_groups FROM tide.outbox_pending ORDER BY id`;
        expect(pending.map((p) => [p.id, [...p.pending_groups].sort()])).toEqual(
          [1n, 2n, 3n].map((id) => [id, ["kafka-down", "nats-down"]]),
        );
      } finally {
        await kafka.stop();
        await db.sql`SELECT tide.relay_disable(name) FROM tide.relay_pipelines WHERE outbox_name = 'orders'`;
      }
    }, 90_000);

    it("marks Kafka and NATS sources unhealthy naming the broker", async () => {
      await db.sql`SELECT tide.inbox_create('unreachable')`;
      await db.sql`SELECT tide.relay_set_inbox('kafka-source-down', 'unreachable',
                     ${db.sql.json({ source_type: "kafka", brokers: "127.0.0.1:1", topic: "never" })})`;
      await db.sql`SELECT tide.relay_set_inbox('nats-source-down', 'unreachable',
                     ${db.sql.json({ source_type: "nats", url: "nats://127.0.0.1:1", subject: "never" })})`;
      try {
        expect((await failureOf("kafka-source-down")).last_error).toContain("127.0.0.1:1");
        expect((await failureOf("nats-source-down")).last_error).toContain("nats://127.0.0.1:1");
      } finally {
        await db.sql`SELECT tide.relay_disable('kafka-source-down')`;
        await db.sql`SELECT tide.relay_disable('nats-source-down')`;
      }
    }, 90_000);
  });

  describe("a JetStream-only NATS sink without a stream", () => {
    it("reports the missing stream, keeps the messages, and delivers them once a stream exists", async () => {
      const subject = `bad.${RUN}.nostream`;
      await db.sql`SELECT tide.outbox_create('js_only')`;
      await db.sql`SELECT tide.relay_set_outbox('js-only', 'js_only', 'nats',
                     ${db.sql.json({ url: NATS_URL, subject, mode: "jetstream", retry: { max_backoff_ms: 1000 } })})`;
      const [{ id }] = await db.sql`SELECT tide.outbox_publish('js_only', '{"n": 1}'::jsonb) AS id`;

      const status = await failureOf("js-only");
      expect(status.last_error).toContain(`no JetStream stream covers subject "${subject}"`);
      expect(status.last_error).toContain('mode "jetstream"');
      expect(status.lag).toBe(1n);
      expect(status.dlq_depth).toBe(0n);

      const stream = await nats.createStream(`TIDE_BAD_JS_${RUN}`, [subject]);
      await waitFor("the message in the new stream", async () => (await nats.jsm.streams.info(stream)).state.messages === 1);
      await waitFor("js-only at lag 0", async () => (await lagOf("js-only")) === 0n);
      const stored = await nats.jsm.streams.getMessage(stream, { seq: 1 });
      expect(stored!.json()).toEqual({ n: 1 });
      expect(stored!.header.get("Nats-Msg-Id")).toBe(`js_only:${id}`);
    }, 60_000);

    it("keeps a templated message whose subject no stream stores, saying which subject, until a stream exists", async () => {
      const prefix = `bad.${RUN}.nostream-tpl`;
      await db.sql`SELECT tide.outbox_create('js_tpl')`;
      await db.sql`SELECT tide.relay_set_outbox('js-tpl', 'js_tpl', 'nats',
                     ${db.sql.json({ url: NATS_URL, subject_template: `${prefix}.{event_type}`, mode: "jetstream",
                                     retry: { max_backoff_ms: 1000 } })})`;
      await db.sql`SELECT tide.outbox_publish('js_tpl', '{"event_type": "created"}'::jsonb)`;
      const status = await failureOf("js-tpl");
      expect(status.last_error).toContain(`no JetStream stream stores subject "${prefix}.created"`);
      expect(status.lag).toBe(1n);
      expect(status.dlq_depth).toBe(0n);
      const stream = await nats.createStream(`TIDE_BAD_TPL_${RUN}`, [`${prefix}.>`]);
      await waitFor("the message in the new stream", async () => (await nats.jsm.streams.info(stream)).state.messages === 1);
      await waitFor("js-tpl at lag 0", async () => (await lagOf("js-tpl")) === 0n);
    }, 60_000);
  });

  describe("a JetStream-only NATS source without a stream", () => {
    it("reports the missing stream, then connects by itself once a stream exists and reports healthy again", async () => {
      const subject = `bad.${RUN}.source-nostream`;
      await db.sql`SELECT tide.inbox_create('late_stream')`;
      await db.sql`SELECT tide.relay_set_inbox('late-stream', 'late_stream',
                     ${db.sql.json({ source_type: "nats", url: NATS_URL, subject, mode: "jetstream", durable_name: "late-stream",
                                     // Retries at most a second apart: the wait below is for the reconnect, not the backoff.
                                     retry: { max_backoff_ms: 1000 } })})`;
      const status = await failureOf("late-stream");
      expect(status.last_error).toContain(`no JetStream stream covers subject "${subject}"`);

      const stream = await nats.createStream(`TIDE_BAD_LATE_${RUN}`, [subject]);
      // The source has connected once its durable consumer exists on the new stream.
      await waitFor("the durable consumer", async () => (await nats.jsm.consumers.info(stream, "late-stream").catch(() => undefined)) !== undefined);
      // Connected and idle is healthy: a pipeline must not look broken until traffic happens to arrive.
      await waitFor("late-stream to report healthy", async () => (await statusOf("late-stream"))?.healthy === true, 10_000);

      await nats.publish(subject, '{"late": true}');
      await waitFor("the message in the inbox", async () => (await inbox("late_stream")).length === 1);
    });
  });

  describe("malformed inbound messages", () => {
    it("NATS: a body that is not JSON is stored as a JSON string, and the next message still arrives", async () => {
      const subject = `bad.${RUN}.nats-in`;
      await nats.createStream(`TIDE_BAD_NATS_IN_${RUN}`, [subject]);
      await db.sql`SELECT tide.inbox_create('nats_in')`;
      await db.sql`SELECT tide.relay_set_inbox('nats-in', 'nats_in', ${db.sql.json({ source_type: "nats", url: NATS_URL, subject })})`;
      await nats.publish(subject, "this is {not json");
      await nats.publish(subject, "");
      await nats.publish(subject, new Uint8Array([0xff, 0xfe, 0x41]));
      await nats.publish(subject, '{"valid": true}');

      const rows = await waitFor("four rows", async () => {
        const rows = await inbox("nats_in");
        return rows.length === 4 && rows;
      });
      expect(rows.map((r) => [r.event_id, r.type, r.payload])).toEqual([
        ["nats_in:nats:seq-1", "string", "this is {not json"],
        ["nats_in:nats:seq-2", "string", ""],
        ["nats_in:nats:seq-3", "string", "\ufffd\ufffdA"],
        ["nats_in:nats:seq-4", "object", { valid: true }],
      ]);
      expect((await statusOf("nats-in")).healthy).toBe(true);
    });

    it("Kafka: a value that is not JSON is a JSON string, a tombstone is null, and the next record still arrives", async () => {
      const topic = `bad-kafka-in-${RUN}`;
      await produceKafka(topic, [{ value: "<<not json>>" }, { key: "k", value: null }, { value: '{"valid": true}' }]);
      await db.sql`SELECT tide.inbox_create('kafka_in')`;
      await db.sql`SELECT tide.relay_set_inbox('kafka-in', 'kafka_in', ${db.sql.json({ source_type: "kafka", brokers: KAFKA_BROKER, topic })})`;
      const rows = await waitFor("three rows", async () => {
        const rows = await inbox("kafka_in");
        return rows.length === 3 && rows;
      }, 30_000);
      expect(rows.map((r) => [r.event_id, r.type, r.payload])).toEqual([
        ["kafka_in:kafka:0-0", "string", "<<not json>>"],
        ["kafka_in:kafka:0-1", "null", null],
        ["kafka_in:kafka:0-2", "object", { valid: true }],
      ]);
      expect((await statusOf("kafka-in")).healthy).toBe(true);
    }, 45_000);

    // PostgreSQL's jsonb cannot hold U+0000. A message carrying one (as a JSON escape or as a raw
    // byte) must not make the whole batch fail forever and hold back everything behind it.
    it("NATS: a message containing U+0000 does not block the messages after it", async () => {
      const subject = `bad.${RUN}.nats-nul`;
      await nats.createStream(`TIDE_BAD_NATS_NUL_${RUN}`, [subject]);
      await db.sql`SELECT tide.inbox_create('nats_nul')`;
      await db.sql`SELECT tide.relay_set_inbox('nats-nul', 'nats_nul', ${db.sql.json({ source_type: "nats", url: NATS_URL, subject })})`;
      await nats.publish(subject, '{"note": "a\\u0000b"}');
      await nats.publish(subject, "raw\u0000byte");
      await nats.publish(subject, '{"valid": true}');
      const rows = await waitFor("the valid message after the U+0000 ones", async () => {
        const rows = await inbox("nats_nul");
        if (rows.some((r) => r.payload?.valid === true)) return rows;
        throw new Error(`nats-nul has ${rows.length} rows; last_error: ${(await statusOf("nats-nul"))?.last_error}`);
      });
      expect(rows.map((r) => r.event_id)).toEqual(["nats_nul:nats:seq-1", "nats_nul:nats:seq-2", "nats_nul:nats:seq-3"]);
    });

    it("Kafka: a record containing U+0000 does not block the records after it", async () => {
      const topic = `bad-kafka-nul-${RUN}`;
      await produceKafka(topic, [{ value: '{"note": "a\\u0000b"}' }, { value: '{"valid": true}' }]);
      await db.sql`SELECT tide.inbox_create('kafka_nul')`;
      await db.sql`SELECT tide.relay_set_inbox('kafka-nul', 'kafka_nul', ${db.sql.json({ source_type: "kafka", brokers: KAFKA_BROKER, topic })})`;
      const rows = await waitFor("the valid record after the U+0000 one", async () => {
        const rows = await inbox("kafka_nul");
        if (rows.some((r) => r.payload?.valid === true)) return rows;
        throw new Error(`kafka-nul has ${rows.length} rows; last_error: ${(await statusOf("kafka-nul"))?.last_error}`);
      }, 30_000);
      expect(rows.map((r) => r.event_id)).toEqual(["kafka_nul:kafka:0-0", "kafka_nul:kafka:0-1"]);
    }, 45_000);
  });
});
