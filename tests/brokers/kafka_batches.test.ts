// The kafka sink against a real broker's size limits: Kafka refuses a request whose records exceed
// message.max.bytes (1 MiB by default) or a topic's max.message.bytes. A batch larger than that is
// produced in a few requests that fit, never one record per request; a single record larger than
// the limit is dead-lettered with an error that names the limit. The number of produce requests is
// read back from the topic: each request to a partition is stored as one record batch.

import { afterAll, beforeAll, describe, expect, it, setDefaultTimeout } from "bun:test";
import type { Relay } from "../../core/relay.ts";
import { createTopics, KAFKA_BROKER, kafkaClient, unique } from "../support/brokers.ts";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { startRelay, waitFor } from "../support/relay.ts";
import { requireService } from "../support/services.ts";

const kafkaUp = await requireService("kafka", "127.0.0.1", 9092);

setDefaultTimeout(90_000);

let db: TestDatabase;
let relay: Relay;

interface StoredRecord {
  offset: bigint;
  /** The offset of the first record of the record batch (one produce request) that stored it. */
  batch: string;
  value: string;
  headers: Record<string, string>;
}

/** Reads `count` records of a one-partition topic from the beginning, with their record batches. */
async function readTopic(topic: string, count: number): Promise<StoredRecord[]> {
  const consumer = kafkaClient().consumer({ groupId: `tide-test-batches-${unique()}`, maxWaitTimeInMs: 200 });
  const records: StoredRecord[] = [];
  await consumer.connect();
  try {
    await consumer.subscribe({ topics: [topic], fromBeginning: true });
    await consumer.run({
      eachBatch: async ({ batch }) => {
        for (const message of batch.messages) {
          const context = (message as unknown as { batchContext?: { firstOffset?: string } }).batchContext;
          records.push({
            offset: BigInt(message.offset),
            batch: String(context?.firstOffset),
            value: message.value!.toString(),
            headers: Object.fromEntries(Object.entries(message.headers ?? {}).map(([k, v]) => [k, String(v)])),
          });
        }
      },
    });
    await waitFor(`${count} records in ${topic} (have ${records.length})`, () => records.length >= count, 60_000);
  } finally {
    await consumer.disconnect();
  }
  return records.sort((a, b) => (a.offset < b.offset ? -1 : 1));
}

async function lagOf(group: string): Promise<bigint | undefined> {
  const [row] = await db.sql`SELECT lag FROM tide.consumer_lag WHERE group_name = ${group}`;
  return row?.lag;
}

async function deadLetters(pipeline: string): Promise<{ message_id: bigint; error: string }[]> {
  return [...(await db.sql<{ message_id: bigint; error: string }[]>`
    SELECT message_id, error FROM tide.relay_dlq WHERE pipeline = ${pipeline} ORDER BY message_id`)];
}

describe.skipIf(!kafkaUp)("kafka sink and the broker's size limits", () => {
  beforeAll(async () => {
    db = await createTestDatabase();
    relay = await startRelay(db.url);
  });
  afterAll(async () => {
    await relay?.stop();
    await db?.drop();
  });

  it("produces a 1,000-message batch of 1.1 MiB in a few requests that fit, in order, with nothing dead-lettered", async () => {
    const topic = `tide-batches-big-${unique()}`;
    await createTopics(kafkaClient(), [topic]);
    await db.sql`SELECT tide.outbox_create('big_batches')`;
    // Everything is in the outbox before the pipeline exists, so that it is read as one batch.
    await db.sql`SELECT tide.outbox_publish('big_batches', jsonb_build_object('seq', g, 'pad', repeat('x', 1100)))
                   FROM generate_series(1, 1000) g`;
    await db.sql`SELECT tide.relay_set_outbox('big-batches', 'big_batches', 'kafka',
                   ${db.sql.json({ brokers: KAFKA_BROKER, topic })}, p_batch_size := 1000)`;

    const records = await readTopic(topic, 1000);
    expect(records.map((r) => JSON.parse(r.value).seq)).toEqual(Array.from({ length: 1000 }, (_, i) => i + 1));
    // 1.1 MiB against a limit of 1 MiB: two requests (a third or fourth if the relay read it in parts).
    const requests = new Set(records.map((r) => r.batch));
    expect(requests.size).toBeGreaterThanOrEqual(2);
    expect(requests.size).toBeLessThanOrEqual(4);
    await waitFor("big-batches at lag 0", async () => (await lagOf("big-batches")) === 0n);
    expect(await deadLetters("big-batches")).toEqual([]);
  });

  it("splits a batch the topic refuses as too large in halves, and dead-letters the one record over the limit naming it", async () => {
    const topic = `tide-batches-limit-${unique()}`;
    const admin = kafkaClient().admin();
    await admin.connect();
    try {
      await admin.createTopics({
        topics: [{ topic, numPartitions: 1, configEntries: [{ name: "max.message.bytes", value: "16384" }] }],
        waitForLeaders: true,
      });
    } finally {
      await admin.disconnect();
    }
    await db.sql`SELECT tide.outbox_create('limited')`;
    // 60 messages of ~1 KiB (about 64 KiB together, four times the topic's limit) and, as the 31st,
    // one of 40 KiB that no request can carry.
    await db.sql`SELECT tide.outbox_publish('limited', jsonb_build_object('seq', g, 'pad', repeat('x', CASE WHEN g = 31 THEN 40000 ELSE 1000 END)))
                   FROM generate_series(1, 61) g`;
    await db.sql`SELECT tide.relay_set_outbox('limited', 'limited', 'kafka', ${db.sql.json({ brokers: KAFKA_BROKER, topic })}, p_batch_size := 100)`;

    await waitFor("limited at lag 0", async () => (await lagOf("limited")) === 0n, 60_000);
    const dead = await deadLetters("limited");
    const [large] = await db.sql`SELECT id FROM tide.outbox_messages WHERE outbox = 'limited' AND payload->>'seq' = '31'`;
    expect(dead.map((d) => d.message_id)).toEqual([large!.id]);
    expect(dead[0]!.error).toContain("refused by Kafka");
    expect(dead[0]!.error).toContain("max.message.bytes");
    expect(dead[0]!.error).toContain("16384 bytes");

    const records = await readTopic(topic, 60);
    expect(records.map((r) => JSON.parse(r.value).seq)).toEqual(Array.from({ length: 61 }, (_, i) => i + 1).filter((n) => n !== 31));
    // Halving finds the large record in a few requests; one request per record would be 60.
    expect(new Set(records.map((r) => r.batch)).size).toBeLessThanOrEqual(16);
  });

  it("sends requests of at most max_request_bytes when it is set to the topic's limit", async () => {
    const topic = `tide-batches-configured-${unique()}`;
    const admin = kafkaClient().admin();
    await admin.connect();
    try {
      await admin.createTopics({
        topics: [{ topic, numPartitions: 1, configEntries: [{ name: "max.message.bytes", value: "16384" }] }],
        waitForLeaders: true,
      });
    } finally {
      await admin.disconnect();
    }
    await db.sql`SELECT tide.outbox_create('configured')`;
    await db.sql`SELECT tide.outbox_publish('configured', jsonb_build_object('seq', g, 'pad', repeat('x', 1000))) FROM generate_series(1, 60) g`;
    await db.sql`SELECT tide.relay_set_outbox('configured', 'configured', 'kafka',
                   ${db.sql.json({ brokers: KAFKA_BROKER, topic, max_request_bytes: 16384 })}, p_batch_size := 100)`;

    const records = await readTopic(topic, 60);
    expect(records.map((r) => JSON.parse(r.value).seq)).toEqual(Array.from({ length: 60 }, (_, i) => i + 1));
    // About 64 KiB in requests of at most 16 KiB: five of them, never refused, so never split further.
    const requests = new Set(records.map((r) => r.batch));
    expect(requests.size).toBeGreaterThanOrEqual(4);
    expect(requests.size).toBeLessThanOrEqual(6);
    await waitFor("configured at lag 0", async () => (await lagOf("configured")) === 0n);
    expect(await deadLetters("configured")).toEqual([]);
  });
});
