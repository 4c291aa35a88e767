// Source "kafka": a kafkajs consumer-group member that hands each fetched batch to the engine in
// slices of up to ctx.batchSize records and commits a slice's offsets only when the engine acks it
// (after the inbox commit). The batch handler waits for that ack, so kafkajs fetches nothing new
// from a partition before the previous slice is committed; a nack seeks back for redelivery.

import type { Consumer, EachBatchPayload, KafkaMessage } from "kafkajs";
import { z } from "zod";
import type { InboundMessage, PluginContext, SourceBatch, SourceDefinition } from "../../core/plugin.ts";
import { availableCompressions } from "./codecs.ts";
import { connectionShape, connectWithin, describeKafkaError, kafkaClient, TOPIC_NAME } from "./connection.ts";
import { cloudEventId, inboundPayload, keyOrInstead } from "../shared.ts";

const topicName = z.string().regex(TOPIC_NAME, "must be a Kafka topic name (letters, digits, '.', '_', '-')");

const configSchema = z
  .strictObject({
    ...connectionShape,
    topic: topicName.optional(),
    topics: z.array(topicName).min(1).optional(),
    /** Consumer group; default `pg-tide-<pipeline>`. `consumer_group` is accepted as another name for it. */
    group_id: z.string().min(1).optional(),
    consumer_group: z.string().min(1).optional(),
    /** Where a group without committed offsets starts: the oldest record (default) or new ones only. */
    from_beginning: z.boolean().default(true),
    /** Handled by the engine (inbox event_id template); accepted here so that the key validates. */
    event_id: z.string().optional(),
    /** Handled by the engine (filter); accepted here so that the key validates. */
    transform: z.unknown().optional(),
  })
  .apply(keyOrInstead, "topic", "topics")
  .superRefine((config, issues) => {
    const problem = (path: string, message: string) => issues.addIssue({ code: "custom", path: [path], message });
    if (config.group_id && config.consumer_group) problem("consumer_group", "cannot be combined with 'group_id'");
  })
  .transform(({ topic, topics, consumer_group, ...config }) => ({
    ...config,
    topics: topics ?? [topic!],
    group_id: config.group_id ?? consumer_group,
  }));

export type KafkaSourceConfig = z.output<typeof configSchema>;

export const kafkaSource: SourceDefinition<KafkaSourceConfig> = {
  type: "kafka",
  kind: "source",
  summary: "Consumes Kafka topics as a consumer group; offsets are committed after the inbox commit",
  config: configSchema,
  example: { brokers: "localhost:9092", topic: "payments", group_id: "pg-tide-payments", from_beginning: true },
  create: createKafkaSource,
};

/** How long the broker holds an empty fetch; close() waits for the fetch in flight, so keep it short. */
const FETCH_WAIT_MS = 1_000;

/** How often a slice waiting for its ack heartbeats, so that the group keeps the member. */
const HEARTBEAT_INTERVAL_MS = 3_000;

type Outcome = "ack" | "nack" | "abandon";

/** A slice of one fetched batch, offered to read() and waiting to be settled. */
interface Slice {
  topic: string;
  partition: number;
  records: KafkaMessage[];
  payload: EachBatchPayload;
  settled: boolean;
  settle(outcome: Outcome): void;
}

function createKafkaSource(config: KafkaSourceConfig, ctx: PluginContext) {
  const where = `kafka source "${ctx.pipeline}"`;
  const groupId = config.group_id ?? `pg-tide-${ctx.pipeline}`;
  // With one topic the id is `<partition>-<offset>` as documented; with several, the topic is part
  // of it, since the same partition and offset exist in each topic.
  const qualifyTopic = config.topics.length > 1;
  const kafka = kafkaClient(config, ctx);
  let consumer: Consumer | undefined;
  let connected = false;
  let crashed: Error | undefined;
  let closing: Promise<void> | undefined;
  let ready: Slice | undefined;
  let outstanding: Slice | undefined;
  let wakeReader: (() => void) | undefined;

  async function start(): Promise<void> {
    await availableCompressions(); // registers every installed codec, to read what producers compressed
    const candidate = (await kafka()).consumer({ groupId, maxWaitTimeInMs: FETCH_WAIT_MS });
    candidate.on(candidate.events.CRASH, (event) => {
      const { error, restart } = event.payload as { error: Error; restart: boolean };
      ctx.logger.warn(`${where}: consumer crashed${restart ? ", kafkajs restarts it" : ""}`, { error: describeKafkaError(error) });
      if (restart) return;
      crashed = error;
      wakeReader?.();
    });
    await connectWithin(where, config.brokers, () => candidate.connect(), () => candidate.disconnect(), ctx);
    try {
      await candidate.subscribe({ topics: config.topics, fromBeginning: config.from_beginning });
      await candidate.run({ autoCommit: false, eachBatchAutoResolve: false, eachBatch: handleBatch });
    } catch (error) {
      await candidate.disconnect().catch(() => {});
      throw ctx.errors.transient(`${where}: cannot consume ${config.topics.join(",")}: ${describeKafkaError(error)}`, error);
    }
    consumer = candidate;
    crashed = undefined;
  }

  async function handleBatch(payload: EachBatchPayload): Promise<void> {
    const { batch } = payload;
    for (let start = 0; start < batch.messages.length; start += ctx.batchSize) {
      if (closing || !payload.isRunning() || payload.isStale()) return;
      const records = batch.messages.slice(start, start + ctx.batchSize);
      // Anything but an ack ends the batch unresolved: kafkajs fetches again from the last ack.
      if ((await offer(batch.topic, batch.partition, records, payload)) !== "ack") return;
    }
  }

  function offer(topic: string, partition: number, records: KafkaMessage[], payload: EachBatchPayload): Promise<Outcome> {
    return new Promise((resolve) => {
      if (closing) return resolve("abandon");
      const heartbeat = setInterval(() => {
        payload.heartbeat().catch((error) => ctx.logger.debug(`${where}: heartbeat failed`, { error: describeKafkaError(error) }));
      }, HEARTBEAT_INTERVAL_MS);
      const slice: Slice = {
        topic, partition, records, payload, settled: false,
        settle(outcome) {
          if (slice.settled) return;
          slice.settled = true;
          clearInterval(heartbeat);
          if (ready === slice) ready = undefined;
          if (outstanding === slice) outstanding = undefined;
          resolve(outcome);
        },
      };
      ready = slice;
      wakeReader?.();
    });
  }

  async function ack(slice: Slice): Promise<void> {
    if (slice.settled) {
      throw ctx.errors.transient(`${where}: the batch was given up before its ack (source closed or read on); it will be delivered again`);
    }
    const last = slice.records[slice.records.length - 1]!;
    const next = (BigInt(last.offset) + 1n).toString();
    try {
      await slice.payload.commitOffsetsIfNecessary({
        topics: [{ topic: slice.topic, partitions: [{ partition: slice.partition, offset: next }] }],
      });
    } catch (error) {
      slice.settle("abandon");
      throw ctx.errors.transient(
        `${where}: committing offset ${next} of ${slice.topic}[${slice.partition}] failed; the batch will be delivered again: ${describeKafkaError(error)}`,
        error,
      );
    }
    slice.payload.resolveOffset(last.offset);
    slice.settle("ack");
  }

  function nack(slice: Slice): void {
    if (slice.settled) return;
    // Not resolving the offsets is enough for a redelivery; seeking also drops records of this
    // partition that kafkajs fetched ahead. A stopped consumer cannot seek: a new one starts from
    // the committed offsets anyway.
    try {
      consumer?.seek({ topic: slice.topic, partition: slice.partition, offset: slice.records[0]!.offset });
    } catch (error) {
      ctx.logger.debug(`${where}: seek failed`, { error: describeKafkaError(error) });
    }
    slice.settle("nack");
  }

  function waitForSlice(): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        wakeReader = undefined;
        ctx.signal.removeEventListener("abort", done);
        resolve();
      };
      wakeReader = done;
      ctx.signal.addEventListener("abort", done, { once: true });
    });
  }

  return {
    async connect() {
      if (closing) throw ctx.errors.transient(`${where}: closed`);
      if (!consumer) await start();
      connected = true;
    },

    async read(): Promise<SourceBatch | null> {
      if (!connected) throw ctx.errors.transient(`${where}: not connected`);
      if (outstanding) {
        ctx.logger.warn(`${where}: read() before the previous batch was settled; it will be delivered again`);
        nack(outstanding);
      }
      while (!ready) {
        if (ctx.signal.aborted || closing) return null;
        if (crashed || !consumer) {
          // kafkajs gave up on the consumer; a new one resumes from the committed offsets.
          const cause = crashed ? describeKafkaError(crashed) : "a restart failed before";
          const old = consumer;
          consumer = undefined;
          await old?.disconnect().catch(() => {});
          await start().catch((error) => {
            throw ctx.errors.transient(`${where}: the consumer stopped (${cause}) and restarting it failed: ${describeKafkaError(error)}`, error);
          });
          continue;
        }
        await waitForSlice();
      }
      if (ctx.signal.aborted) return null;
      const slice = ready;
      ready = undefined;
      outstanding = slice;
      return {
        messages: slice.records.map((record) => toInbound(slice.topic, slice.partition, record, qualifyTopic)),
        ack: () => ack(slice),
        nack: () => Promise.resolve(nack(slice)),
      };
    },

    async close() {
      closing ??= (async () => {
        ready?.settle("abandon");
        outstanding?.settle("abandon");
        wakeReader?.();
        const current = consumer;
        consumer = undefined;
        await current?.disconnect().catch((error) => ctx.logger.warn(`${where}: disconnect failed`, { error: describeKafkaError(error) }));
      })();
      await closing;
    },

    health() {
      if (crashed) return Promise.resolve({ ok: false, detail: `consumer stopped: ${describeKafkaError(crashed)}` });
      return Promise.resolve(consumer ? { ok: true } : { ok: false, detail: "not connected" });
    },
  };
}

/** Header names that carry a message's own id, in order of preference. */
const EVENT_ID_HEADERS = ["event_id", "id", "tide-dedup-key", "ce_id"];

function toInbound(topic: string, partition: number, record: KafkaMessage, qualifyTopic: boolean): InboundMessage {
  const headers: Record<string, string | string[]> = {};
  for (const [name, value] of Object.entries(record.headers ?? {})) {
    if (value === undefined) continue;
    // A repeated header arrives as a list; keep all its values.
    headers[name] = Array.isArray(value) ? value.map((v) => v.toString()) : value.toString();
  }
  // The value as it came (a tombstone, no value, is null); parsed only to look for an id.
  const { payloadText, parsed } = inboundPayload(record.value);
  // A structured CloudEvents body carries its id inside; binary mode has it in the ce_id header.
  const eventId = EVENT_ID_HEADERS.map((name) => headers[name]).find((v): v is string => typeof v === "string" && v !== "") ??
    cloudEventId(parsed);
  return {
    eventId,
    transportId: qualifyTopic ? `kafka:${topic}/${partition}-${record.offset}` : `kafka:${partition}-${record.offset}`,
    payloadText,
    headers,
    source: `kafka:${topic}`,
  };
}
