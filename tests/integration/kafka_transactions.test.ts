// The kafka sink's transactional mode against a real broker: each batch is one Kafka transaction,
// however many produce requests it takes; a consumer reading with isolation read_committed sees a
// batch whole or not at all, while a read_uncommitted one also sees the records of aborted
// transactions. The transactional id is per pipeline and relay group: a sink taking the pipeline
// over fences the one it replaces and aborts its open transaction.

import { describe, expect, it } from "bun:test";
import type { OutboxMessage, PluginContext } from "../../core/plugin.ts";
import { kafkaSink } from "../../plugins/kafka/index.ts";
import { toJson } from "../../plugins/shared.ts";
import { createTopics, KAFKA_BROKER, kafkaClient, unique } from "../support/brokers.ts";
import { parseConfig, pluginContext, validateConfig } from "../support/plugins.ts";
import { waitFor } from "../support/relay.ts";
import { requireService } from "../support/services.ts";

const up = await requireService("kafka", "127.0.0.1", 9092);

function message(id: number, payload: Record<string, unknown> = {}): OutboxMessage {
  const fields = {
    id: BigInt(id),
    outbox: "orders",
    topic: null,
    payload: { order_id: id, ...payload },
    headers: { event_type: "order.created" },
    dedupKey: `orders:${id}`,
    eventType: "order.created",
    op: "publish",
    createdAt: new Date(),
  };
  return { ...fields, payloadText: toJson(fields.payload) };
}

/** Messages 1..count, each with `padding` bytes of payload. */
function batch(count: number, padding = 0): OutboxMessage[] {
  return Array.from({ length: count }, (_, i) => message(i + 1, padding ? { padding: "x".repeat(padding) } : {}));
}

/**
 * A sink context whose kafka.before-commit failpoint holds the transaction open (records sent, not
 * committed) until the test calls release(); `reached` resolves when it is there.
 */
function heldAtCommit(pipeline: string, relayGroupId: string, overrides: Partial<PluginContext> = {}) {
  const reached = Promise.withResolvers<void>();
  const release = Promise.withResolvers<void>();
  const ctx = pluginContext(pipeline, {
    relayGroupId,
    failpoint: async (name) => {
      if (name !== "kafka.before-commit") return;
      reached.resolve();
      await release.promise;
    },
    ...overrides,
  });
  return { ctx, reached: reached.promise, release: () => release.resolve() };
}

interface Stored {
  id: string;
  /** The first offset of the record batch (one produce request) that stored the record. */
  recordBatch: string;
}

/**
 * Every record of a one-partition topic, read from the beginning with the given isolation. A plain
 * record produced first marks the end: it is read once everything before it was (with
 * read_committed, once no transaction before it is open), so nothing is missed and nothing is
 * waited for by time.
 */
async function readAll(topic: string, isolation: "read_committed" | "read_uncommitted"): Promise<Stored[]> {
  const consumer = kafkaClient().consumer({
    groupId: `tide-test-tx-${unique()}`,
    maxWaitTimeInMs: 200,
    readUncommitted: isolation === "read_uncommitted",
  });
  const stored: Stored[] = [];
  let ended = false;
  await consumer.connect();
  try {
    await consumer.subscribe({ topics: [topic], fromBeginning: true });
    await consumer.run({
      eachBatch: async ({ batch: fetched }) => {
        for (const record of fetched.messages) {
          if (record.headers?.["test-end"] !== undefined) {
            ended = true;
            continue;
          }
          const context = (record as unknown as { batchContext?: { firstOffset?: string } }).batchContext;
          stored.push({ id: String(record.headers?.["tide-message-id"]), recordBatch: String(context?.firstOffset) });
        }
      },
    });
    await waitFor(`the end marker of ${topic} (${isolation}; have ${stored.length} records)`, () => ended, 30_000);
  } finally {
    await consumer.disconnect();
  }
  return stored;
}

/** Produces the end marker that readAll waits for (a plain, non-transactional record). */
async function markEnd(topic: string): Promise<void> {
  const producer = kafkaClient().producer();
  await producer.connect();
  try {
    await producer.send({ topic, messages: [{ value: "end", headers: { "test-end": "1" } }] });
  } finally {
    await producer.disconnect();
  }
}

async function newTopic(name: string): Promise<string> {
  const topic = `tide-tx-${name}-${unique()}`;
  await createTopics(kafkaClient(), [topic]);
  return topic;
}

const ids = (records: Stored[]) => records.map((r) => r.id);
const range = (from: number, to: number) => Array.from({ length: to - from + 1 }, (_, i) => String(from + i));

describe.skipIf(!up)("kafka sink, transactional", () => {
  it("commits a batch sent in several requests as one transaction, which a relay taking the pipeline over aborts whole", async () => {
    const topic = await newTopic("takeover");
    const pipeline = `orders-${unique()}`;
    // 10 records of about 400 bytes in requests of at most 1 KiB: several requests, one transaction.
    const config = await parseConfig(kafkaSink, { brokers: KAFKA_BROKER, topic, transactional: true, max_request_bytes: 1024 });
    const first = heldAtCommit(pipeline, "blue");
    const old = kafkaSink.create(config, first.ctx);
    const next = kafkaSink.create(config, pluginContext(pipeline, { relayGroupId: "blue" }));
    await old.connect();
    try {
      const publishing = old.publish(batch(10, 300));
      await first.reached; // every request acknowledged, the transaction open
      await next.connect(); // same pipeline and relay group: same transactional id, a new epoch
      first.release();
      await expect(publishing).rejects.toThrow(/committing the transaction failed|producing to/);
      expect(await next.publish(batch(10, 300))).toEqual([]);
    } finally {
      await old.close();
      await next.close();
    }
    await markEnd(topic);

    const committed = await readAll(topic, "read_committed");
    expect(ids(committed)).toEqual(range(1, 10));
    expect(new Set(committed.map((r) => r.recordBatch)).size).toBeGreaterThan(1); // it took several requests

    const everything = await readAll(topic, "read_uncommitted");
    expect(ids(everything)).toEqual([...range(1, 10), ...range(1, 10)]); // the aborted copies, then the committed ones
  });

  it("delivers again with a new producer after another producer of its id fenced it (the pipeline came back to this relay)", async () => {
    const topic = await newTopic("comeback");
    const pipeline = `orders-${unique()}`;
    const config = await parseConfig(kafkaSink, { brokers: KAFKA_BROKER, topic, transactional: true });
    const sink = kafkaSink.create(config, pluginContext(pipeline, { relayGroupId: "blue" }));
    await sink.connect();
    try {
      expect(await sink.publish([message(1)])).toEqual([]);
      // Another relay owned the pipeline for a while: its producer took the id's epoch, then went away.
      const other = kafkaSink.create(config, pluginContext(pipeline, { relayGroupId: "blue" }));
      await other.connect();
      await other.close();
      await expect(sink.publish([message(2)])).rejects.toThrow(/epoch/); // fenced: the batch stays in the outbox
      expect(await sink.publish([message(2)])).toEqual([]); // retried, with a producer of the current epoch
      expect(await sink.publish([message(3)])).toEqual([]);
    } finally {
      await sink.close();
    }
    await markEnd(topic);
    expect(ids(await readAll(topic, "read_committed"))).toEqual(["1", "2", "3"]);
  });

  it("aborts instead of committing when the pipeline stops while the batch is in flight", async () => {
    const topic = await newTopic("stopped");
    const stop = new AbortController();
    const held = heldAtCommit(`orders-${unique()}`, "blue", { signal: stop.signal });
    const sink = kafkaSink.create(await parseConfig(kafkaSink, { brokers: KAFKA_BROKER, topic, transactional: true }), held.ctx);
    await sink.connect();
    try {
      const publishing = sink.publish(batch(3));
      await held.reached;
      stop.abort();
      held.release();
      await expect(publishing).rejects.toThrow(/stopped before the transaction was committed/);
    } finally {
      await sink.close();
    }
    await markEnd(topic);
    expect(ids(await readAll(topic, "read_committed"))).toEqual([]);
    expect(ids(await readAll(topic, "read_uncommitted"))).toEqual(range(1, 3));
  });

  it("keeps relay groups apart: a sink of another group does not fence the first", async () => {
    const topic = await newTopic("groups");
    const pipeline = `orders-${unique()}`;
    const config = await parseConfig(kafkaSink, { brokers: KAFKA_BROKER, topic, transactional: true });
    const blue = heldAtCommit(pipeline, "blue");
    const blueSink = kafkaSink.create(config, blue.ctx);
    const greenSink = kafkaSink.create(config, pluginContext(pipeline, { relayGroupId: "green" }));
    await blueSink.connect();
    try {
      const publishing = blueSink.publish([message(1)]);
      await blue.reached;
      await greenSink.connect();
      expect(await greenSink.publish([message(2)])).toEqual([]);
      blue.release();
      expect(await publishing).toEqual([]);
    } finally {
      await blueSink.close();
      await greenSink.close();
    }
    await markEnd(topic);
    expect(ids(await readAll(topic, "read_committed")).sort()).toEqual(["1", "2"]);
  });

  it("sends a record that no retry can fix to the DLQ and commits the rest of the batch", async () => {
    const topic = await newTopic("refused");
    const sink = kafkaSink.create(
      await parseConfig(kafkaSink, { brokers: KAFKA_BROKER, topic, transactional: true }),
      pluginContext(`orders-${unique()}`, { relayGroupId: "blue" }),
    );
    await sink.connect();
    try {
      const failures = await sink.publish([message(1), message(2), message(3, { blob: "x".repeat(2_000_000) }), message(4)]);
      expect(failures.map((f) => [f.id, f.retriable])).toEqual([[3n, false]]);
      expect(failures[0]!.error.message).toContain("message 3: refused by Kafka");
      // The next batch goes out in a new transaction of the same producer.
      expect(await sink.publish([message(5)])).toEqual([]);
    } finally {
      await sink.close();
    }
    await markEnd(topic);
    expect(ids(await readAll(topic, "read_committed"))).toEqual(["1", "2", "4", "5"]);
  });

  it("uses the transactional_id of the config: a sink of another pipeline with the same id fences the first", async () => {
    const topic = await newTopic("explicit-id");
    const config = await parseConfig(kafkaSink, { brokers: KAFKA_BROKER, topic, transactional: true, transactional_id: `tide-test-${unique()}` });
    const held = heldAtCommit(`orders-${unique()}`, "blue");
    const first = kafkaSink.create(config, held.ctx);
    const second = kafkaSink.create(config, pluginContext(`invoices-${unique()}`, { relayGroupId: "green" }));
    await first.connect();
    try {
      const publishing = first.publish([message(1)]);
      await held.reached;
      await second.connect();
      held.release();
      await expect(publishing).rejects.toThrow();
      expect(await second.publish([message(2)])).toEqual([]);
    } finally {
      await first.close();
      await second.close();
    }
    await markEnd(topic);
    expect(ids(await readAll(topic, "read_committed"))).toEqual(["2"]);
  });
});

describe("kafka sink, transactional configs", () => {
  it("accepts transactional with the defaults (acks all, idempotent)", async () => {
    const config = await parseConfig(kafkaSink, { brokers: KAFKA_BROKER, topic: "t", transactional: true, transaction_timeout_ms: 30_000 });
    expect(config).toMatchObject({ transactional: true, idempotent: true, acks: -1, transaction_timeout_ms: 30_000 });
  });

  it("refuses combinations a transaction cannot work with, naming the key", async () => {
    const issues = async (input: Record<string, unknown>) =>
      ((await validateConfig(kafkaSink, { brokers: KAFKA_BROKER, topic: "t", ...input })).issues ?? []).map((i) => `${i.path?.join(".")}: ${i.message}`);
    expect(await issues({ transactional: true, acks: 1 })).toEqual(['transactional: needs acks "all"']);
    expect(await issues({ transactional: true, idempotent: false })).toEqual([
      "idempotent: cannot be false with 'transactional' (a transaction needs the idempotent producer)",
    ]);
    expect(await issues({ transactional_id: "x" })).toEqual(["transactional_id: applies to 'transactional: true' only"]);
    expect(await issues({ transaction_timeout_ms: 1000 })).toEqual(["transaction_timeout_ms: applies to 'transactional: true' only"]);
    expect(await issues({ transactional: "yes" })).toHaveLength(1);
  });
});
