// What a broker's consumers see when the relay is killed with SIGKILL in the middle of a batch and
// started again (TIDE_FAILPOINTS makes the relay process kill itself at a named point):
// - Kafka, transactional, killed while the batch's transaction is open: a read_committed consumer
//   sees every message exactly once (the next relay's producer fences the dead one's transaction
//   and the broker aborts it); a read_uncommitted one also sees the aborted copies.
// - Kafka, transactional, killed after the Kafka commit and before the outbox position moved: the
//   batch is sent again in a new transaction, so read_committed consumers see that one batch twice,
//   with the same tide-dedup-key headers, and nothing else twice.
// - NATS JetStream, killed after the PubAcks and before the position moved: the batch is published
//   again with the same Nats-Msg-Id inside the stream's duplicate window, and the stream stores
//   each message once, while a core subscriber of the subject received the batch twice.

import { afterEach, beforeEach, describe, expect, it, setDefaultTimeout } from "bun:test";
import type { Msg } from "@nats-io/transport-node";
import { createTopics, KAFKA_BROKER, kafkaClient, NATS_URL, NatsTestClient, unique } from "../support/brokers.ts";
import { committedMessages, lagOf, RelayProcess } from "../support/chaos.ts";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { waitFor } from "../support/relay.ts";
import { requireService } from "../support/services.ts";

const kafkaUp = await requireService("kafka", "127.0.0.1", 9092);
const natsUp = await requireService("nats", "127.0.0.1", 4222);

setDefaultTimeout(120_000);

const BATCH = 10;
const MESSAGES = 3 * BATCH;
const GROUP = "crash-redelivery";

let db: TestDatabase;
let relays: RelayProcess[] = [];

beforeEach(async () => {
  db = await createTestDatabase();
});
afterEach(async () => {
  await Promise.all(relays.map((r) => r.kill()));
  relays = [];
  await db.drop();
});

function relay(failpoints?: string): RelayProcess {
  const child = new RelayProcess(db.url, ["--relay-group-id", GROUP, "--reconcile-interval-ms", "300"],
    failpoints ? { TIDE_FAILPOINTS: failpoints } : {});
  relays.push(child);
  return child;
}

/** An outbox and its pipeline (same name), with MESSAGES messages committed before any relay runs. */
async function pipelineWithBacklog(name: string, sinkType: string, config: Record<string, unknown>): Promise<void> {
  await db.sql`SELECT tide.outbox_create(${name})`;
  await db.sql`SELECT tide.relay_set_outbox(${name}, ${name}, ${sinkType},
    ${db.sql.json({ ...config, max_batch_size: BATCH, retry: { initial_backoff_ms: 20, max_backoff_ms: 200 } } as never)}, p_batch_size := ${BATCH})`;
  for (let seq = 1; seq <= MESSAGES; seq++) {
    await db.sql`SELECT tide.outbox_publish(${name}, ${db.sql.json({ key: `${name}-k`, seq })})`;
  }
}

/** Kills a relay at `failpoint`, starts another, and waits until it delivered everything (lag 0). */
async function crashAndRecover(outbox: string, failpoint: string): Promise<void> {
  const crashing = relay(`${failpoint}=crash`);
  expect(await crashing.ended(`the relay to kill itself at ${failpoint}`)).not.toBe(0);
  const next = relay();
  await next.started();
  await waitFor(`every message of ${outbox} to be delivered (lag 0)`, async () => {
    const { groups, lag } = await lagOf(db.sql, GROUP, [outbox]);
    return groups === 1 && lag === 0n;
  }, 60_000).catch((error) => {
    throw new Error(`${(error as Error).message}; the relay's last lines:\n${next.tail()}`);
  });
}

/** The outbox ids of the messages, in order, as tide-message-id header values. */
async function outboxIds(outbox: string): Promise<string[]> {
  return (await committedMessages(db.sql, [outbox])).map((m) => String(m.id));
}

// ---------------------------------------------------------------------------------------------
// Kafka

interface KafkaRecord {
  messageId: string;
  dedupKey: string;
}

/** Produces a plain (non-transactional) record that readKafka stops at. */
async function markEnd(topic: string): Promise<void> {
  const producer = kafkaClient().producer();
  await producer.connect();
  try {
    await producer.send({ topic, messages: [{ value: "end", headers: { "test-end": "1" } }] });
  } finally {
    await producer.disconnect();
  }
}

/**
 * Every record of a one-partition topic before the end marker, read from the beginning with the
 * given isolation: once the marker arrived, everything before it was read.
 */
async function readKafka(topic: string, isolation: "read_committed" | "read_uncommitted"): Promise<KafkaRecord[]> {
  const consumer = kafkaClient().consumer({ groupId: `tide-test-${unique()}`, maxWaitTimeInMs: 200, readUncommitted: isolation === "read_uncommitted" });
  const records: KafkaRecord[] = [];
  let ended = false;
  await consumer.connect();
  try {
    await consumer.subscribe({ topics: [topic], fromBeginning: true });
    await consumer.run({
      eachMessage: async ({ message }) => {
        if (message.headers?.["test-end"] !== undefined) ended = true;
        else records.push({ messageId: String(message.headers?.["tide-message-id"]), dedupKey: String(message.headers?.["tide-dedup-key"]) });
      },
    });
    await waitFor(`the end of ${topic} (${isolation}; have ${records.length} records)`, () => ended, 30_000);
  } finally {
    await consumer.disconnect();
  }
  return records;
}

function countBy(values: string[]): Map<string, number> {
  const counts = new Map<string, number>();
  for (const value of values) counts.set(value, (counts.get(value) ?? 0) + 1);
  return counts;
}

describe.skipIf(!kafkaUp)("kafka sink, transactional, when the relay is killed", () => {
  it("while the batch's transaction is open: read_committed consumers see every message once, read_uncommitted ones the aborted copies too", async () => {
    const outbox = `kafka_tx_open_${unique()}`;
    const topic = `tide-crash-${unique()}`;
    await createTopics(kafkaClient(), [topic]);
    await pipelineWithBacklog(outbox, "kafka", { brokers: KAFKA_BROKER, topic, transactional: true });

    // The second batch's records are on the broker, its transaction not committed, when the relay dies.
    await crashAndRecover(outbox, "kafka.before-commit@2");
    await markEnd(topic);

    const ids = await outboxIds(outbox);
    const committed = await readKafka(topic, "read_committed");
    expect(committed.map((r) => r.messageId)).toEqual(ids);
    expect(committed.map((r) => r.dedupKey)).toEqual(ids.map((id) => `${outbox}:${id}`));

    const everything = await readKafka(topic, "read_uncommitted");
    const secondBatch = ids.slice(BATCH, 2 * BATCH);
    expect(everything.map((r) => r.messageId)).toEqual([...ids.slice(0, 2 * BATCH), ...secondBatch, ...ids.slice(2 * BATCH)]);
  });

  it("between the Kafka commit and the outbox commit: read_committed consumers see that batch twice, with the same dedup keys, and nothing else twice", async () => {
    const outbox = `kafka_tx_committed_${unique()}`;
    const topic = `tide-crash-${unique()}`;
    await createTopics(kafkaClient(), [topic]);
    await pipelineWithBacklog(outbox, "kafka", { brokers: KAFKA_BROKER, topic, transactional: true });

    await crashAndRecover(outbox, "forward.after-publish@2");
    await markEnd(topic);

    const ids = await outboxIds(outbox);
    const committed = await readKafka(topic, "read_committed");
    const secondBatch = ids.slice(BATCH, 2 * BATCH);
    expect(committed.map((r) => r.messageId)).toEqual([...ids.slice(0, 2 * BATCH), ...secondBatch, ...ids.slice(2 * BATCH)]);
    const repeated = [...countBy(committed.map((r) => r.dedupKey))].filter(([, n]) => n > 1);
    expect(repeated).toEqual(secondBatch.map((id) => [`${outbox}:${id}`, 2]));
  });
});

// ---------------------------------------------------------------------------------------------
// NATS JetStream

describe.skipIf(!natsUp)("nats sink, JetStream, when the relay is killed", () => {
  let nats: NatsTestClient;
  beforeEach(async () => {
    nats = await NatsTestClient.connect();
  });
  afterEach(async () => {
    await nats.close();
  });

  it("between the PubAcks and the outbox commit: the stream stores each message once although the batch was published twice", async () => {
    const outbox = `nats_dedup_${unique()}`;
    const subject = `tide.crash.${unique()}`;
    const stream = await nats.createStream(`TIDE_CRASH_${unique()}`, [subject]);
    // Every publish on the subject, repeats included: JetStream drops a repeat in the stream, not on the wire.
    const published: Msg[] = [];
    nats.nc.subscribe(subject, { callback: (_error, msg) => void published.push(msg) });
    await nats.nc.flush();
    await pipelineWithBacklog(outbox, "nats", { url: NATS_URL, subject, mode: "jetstream" });

    await crashAndRecover(outbox, "forward.after-publish@2");

    const ids = await outboxIds(outbox);
    const keys = ids.map((id) => `${outbox}:${id}`);
    await waitFor(`${MESSAGES + BATCH} publishes on ${subject} (have ${published.length})`, () => published.length >= MESSAGES + BATCH);
    expect(published.length).toBe(MESSAGES + BATCH);
    const repeated = [...countBy(published.map((m) => m.headers!.get("Nats-Msg-Id")))].filter(([, n]) => n > 1).map(([key]) => key);
    expect(repeated).toEqual(keys.slice(BATCH, 2 * BATCH));

    const info = await nats.jsm.streams.info(stream);
    expect(info.config.duplicate_window).toBe(120_000_000_000); // the default: two minutes, in nanoseconds
    expect(info.state.messages).toBe(MESSAGES);
    const stored: string[] = [];
    for (let seq = 1; seq <= MESSAGES; seq++) stored.push((await nats.jsm.streams.getMessage(stream, { seq }))!.header.get("Nats-Msg-Id"));
    expect(stored).toEqual(keys);
  });
});
