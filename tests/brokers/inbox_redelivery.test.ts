// Reverse pipelines while the inbox cannot be written: a BEFORE INSERT trigger raises as long as a
// flag says so. Messages arrive over NATS JetStream and Kafka before and during the failure; the
// relay must not acknowledge any of them to the broker (no ack floor, no committed offset), and once
// the failure is gone every message is in the inbox exactly once and acknowledged.

import { afterAll, beforeAll, describe, expect, it, setDefaultTimeout } from "bun:test";
import { jetstream } from "@nats-io/jetstream";
import type { Relay } from "../../core/relay.ts";
import { kafkaClient, KAFKA_BROKER, NATS_URL, NatsTestClient, produceKafka, unique } from "../support/brokers.ts";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { captureLogger, startRelay, waitFor } from "../support/relay.ts";
import { requireService } from "../support/services.ts";

const up = (await requireService("nats", "127.0.0.1", 4222)) && (await requireService("kafka", "127.0.0.1", 9092));

// Brokers, relays and consumer-group joins take seconds; bun's default per-test timeout is 5 s.
setDefaultTimeout(60_000);

const RUN = unique();
const SUBJECT = `tide.redelivery.${RUN}`;
const STREAM = `TIDE_REDELIVERY_${RUN}`;
const TOPIC = `tide-redelivery-${RUN}`;
const GROUP = `tide-redelivery-${RUN}`;
/** Messages per broker, half before the relay starts and half while the inbox fails. */
const COUNT = 20;

const FAILING_INBOX = `
CREATE TABLE public.inbox_failure (failing boolean NOT NULL);
INSERT INTO public.inbox_failure VALUES (true);
CREATE FUNCTION public.fail_inbox_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF (SELECT failing FROM public.inbox_failure) THEN RAISE EXCEPTION 'the inbox is unavailable (test)'; END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER fail_insert BEFORE INSERT ON tide.received_inbox FOR EACH ROW EXECUTE FUNCTION public.fail_inbox_insert();`;

let db: TestDatabase;
let nats: NatsTestClient;
let relay: Relay | undefined;
const log = captureLogger();

/** Failed inbox writes the relay logged for `pipeline`, by attempt number. */
function failedWrites(pipeline: string): number[] {
  return log.lines
    .map((line) => JSON.parse(line))
    .filter((entry) => entry.pipeline === pipeline && String(entry.message).startsWith("writing to the inbox failed"))
    .map((entry) => entry.attempt);
}

async function publishNats(from: number, to: number): Promise<void> {
  const js = jetstream(nats.nc);
  for (let n = from; n <= to; n += 1) await js.publish(SUBJECT, JSON.stringify({ broker: "nats", n }));
}

async function produce(from: number, to: number): Promise<void> {
  const messages = [];
  for (let n = from; n <= to; n += 1) messages.push({ value: JSON.stringify({ broker: "kafka", n }) });
  await produceKafka(TOPIC, messages);
}

async function committedKafkaOffset(): Promise<string> {
  const admin = kafkaClient().admin();
  await admin.connect();
  try {
    const [offsets] = await admin.fetchOffsets({ groupId: GROUP, topics: [TOPIC] });
    return offsets!.partitions[0]!.offset;
  } finally {
    await admin.disconnect();
  }
}

describe.skipIf(!up)("reverse pipelines while the inbox insert fails", () => {
  beforeAll(async () => {
    db = await createTestDatabase();
    nats = await NatsTestClient.connect();
    await nats.createStream(STREAM, [SUBJECT]);
    await db.sql`SELECT tide.inbox_create('received')`;
    await db.sql.unsafe(FAILING_INBOX);
    await db.sql`SELECT tide.relay_set_inbox('nats-in', 'received',
      ${db.sql.json({ source_type: "nats", url: NATS_URL, subject: SUBJECT, durable_name: "redelivery", mode: "jetstream" })})`;
    await db.sql`SELECT tide.relay_set_inbox('kafka-in', 'received',
      ${db.sql.json({ source_type: "kafka", brokers: KAFKA_BROKER, topic: TOPIC, group_id: GROUP })})`;
  });
  afterAll(async () => {
    await relay?.stop();
    await nats?.close();
    await db?.drop();
  });

  it("acknowledges nothing to the brokers while the inbox rows cannot commit", async () => {
    await publishNats(1, COUNT / 2);
    await produce(1, COUNT / 2);
    relay = await startRelay(db.url, { logger: log.logger });
    await waitFor("a first failed inbox write of each pipeline", () => failedWrites("nats-in").length > 0 && failedWrites("kafka-in").length > 0);
    await publishNats(COUNT / 2 + 1, COUNT);
    await produce(COUNT / 2 + 1, COUNT);
    // A second failure means the source delivered the batch again after the first.
    await waitFor("a second failed inbox write of each pipeline", () =>
      failedWrites("nats-in").includes(2) && failedWrites("kafka-in").includes(2));

    const [{ n: stored }] = await db.sql`SELECT count(*)::int AS n FROM tide.received_inbox`;
    expect(stored).toBe(0);
    const consumer = await nats.jsm.consumers.info(STREAM, "redelivery");
    expect(consumer.ack_floor.stream_seq).toBe(0);
    expect(Number(await committedKafkaOffset())).toBeLessThan(0);
  });

  it("stores every message exactly once after the failure is gone, and only then acknowledges them", async () => {
    await db.sql`UPDATE public.inbox_failure SET failing = false`;
    // Past five failures a pipeline's circuit opens and waits up to 30 s before its next probe.
    const rows = await waitFor(`${2 * COUNT} rows in the inbox`, async () => {
      const rows = await db.sql`SELECT event_id, payload FROM tide.received_inbox ORDER BY id`;
      return rows.length >= 2 * COUNT && rows;
    }, 45_000);
    const received = (broker: string) =>
      rows.filter((r) => r.payload.broker === broker).map((r) => r.payload.n as number).sort((a, b) => a - b);
    const all = Array.from({ length: COUNT }, (_, i) => i + 1);
    expect(received("nats")).toEqual(all);
    expect(received("kafka")).toEqual(all);
    expect(new Set(rows.map((r) => r.event_id)).size).toBe(2 * COUNT);

    await waitFor("the JetStream consumer to acknowledge everything", async () => {
      const info = await nats.jsm.consumers.info(STREAM, "redelivery");
      return info.ack_floor.stream_seq === COUNT && info.num_ack_pending === 0 && info.num_pending === 0;
    });
    await waitFor("the Kafka group to commit past the last record", async () => (await committedKafkaOffset()) === String(COUNT));
    const [{ n: stored }] = await db.sql`SELECT count(*)::int AS n FROM tide.received_inbox`;
    expect(stored).toBe(2 * COUNT);
  });
});
