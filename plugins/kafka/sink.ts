// Sink "kafka": produces each outbox message as one Kafka record (value = the payload's JSON text,
// key from a template or the message's `key` header, tide metadata in headers) with kafkajs's
// idempotent producer. Resolves once the broker acknowledged at the configured acks level.
// A batch goes out in as few requests as fit max_request_bytes; a request the broker still refuses
// as too large is split in halves and sent again, never record by record. Network and broker
// trouble fails what was not acknowledged yet (retried); records that no retry can fix go to the
// DLQ, found by halving. A topic_template's values are user data: no "." in a value unless
// allow_dots_in names its placeholder ({topic} always may), and no value may lead the topic name
// into the "_" names of Kafka's own and its tools' topics (__consumer_offsets, _schemas).
// With `transactional`, each batch (all of its requests) is one Kafka transaction, committed before
// publish() resolves; the transactional id is stable per pipeline and relay group, so that a relay
// taking the pipeline over fences the one before and aborts its open transaction.

import type { Message, Producer, TopicMessages, Transaction } from "kafkajs";
import { z } from "zod";
import type { DeliveryFailure, OutboxMessage, PluginContext, SinkDefinition } from "../../core/plugin.ts";
import { COMPRESSION_TYPES, COMPRESSIONS, ensureCodec } from "./codecs.ts";
import { isPermanent, isTooLarge, type PendingRecord, recordBytes, requests, sizeOf } from "./requests.ts";
import { connectionShape, connectWithin, describeKafkaError, kafkaClient, kafkaErrorTypes, loadKafkajs, TOPIC_NAME } from "./connection.ts";
import { checkAllowDotsIn, headerText, oneTokenValues, payloadBodyBytes, PROBE_MESSAGE, messageOf, keyOrInstead } from "../shared.ts";

const ACKS = { all: -1, "-1": -1, "1": 1, "0": 0 } as const;

/** 1 MiB less room for the request's own framing: the broker's default message.max.bytes is 1048588. */
const DEFAULT_MAX_REQUEST_BYTES = 1_000_000;

const configSchema = z
  .strictObject({
    ...connectionShape,
    topic: z
      .string()
      .refine((s) => !s.includes("{"), { error: "has a placeholder: use 'topic_template' for per-message topics", abort: true })
      .regex(TOPIC_NAME, "must be a Kafka topic name (letters, digits, '.', '_', '-')")
      .optional(),
    /** Per-message topic, e.g. `orders.{op}`. */
    topic_template: z.string().min(1).optional(),
    /** Placeholders of topic_template whose values may contain ".", e.g. ["event_type"]. */
    allow_dots_in: z.array(z.string().min(1)).default([]),
    /**
     * Record key template, e.g. `{event_type}` or `{payload.order_id}`. Absent: the message's `key`
     * header (table capture puts the row's primary key there; non-strings as JSON text), else no key.
     */
    key: z.string().optional(),
    acks: z
      .union([z.literal("all"), z.literal(-1), z.literal(1), z.literal(0), z.literal("-1"), z.literal("1"), z.literal("0")], {
        error: "must be \"all\", -1, 1 or 0",
      })
      .default("all")
      .transform((acks) => ACKS[String(acks) as keyof typeof ACKS]),
    /** snappy, lz4 and zstd need their codec package: checked here, so that `pg-tide check` reports a missing one. */
    compression: z
      .enum(COMPRESSIONS)
      .default("none")
      .superRefine(async (compression, issues) => {
        const unavailable = await ensureCodec(compression);
        if (unavailable) issues.addIssue({ code: "custom", message: unavailable });
      }),
    /** Idempotent producer (no duplicates from kafkajs's own retries); needs acks "all". Default: on when acks is "all". */
    idempotent: z.boolean().optional(),
    /** Broker acknowledgement timeout and request timeout. */
    timeout_ms: z.number().int().positive().default(30_000),
    /**
     * The most bytes of records one produce request carries; a larger batch is split. Keep it at or
     * below the broker's message.max.bytes (default 1048588) and the topics' max.message.bytes.
     */
    max_request_bytes: z.number().int().min(1024).default(DEFAULT_MAX_REQUEST_BYTES),
    /**
     * Each batch in one Kafka transaction: a consumer reading with isolation read_committed sees all
     * of its records or none. Needs acks "all" (the producer is idempotent).
     */
    transactional: z.boolean().default(false),
    /**
     * The producer's transactional.id (default `pg-tide:<relay group>:<pipeline>`): one per pipeline
     * and relay group, so that the relay taking a pipeline over fences the one it replaces.
     */
    transactional_id: z.string().min(1).optional(),
    /** How long the broker lets a transaction stay open before aborting it (a relay that died mid-batch). */
    transaction_timeout_ms: z.number().int().positive().optional(),
  })
  .apply(keyOrInstead, "topic", "topic_template")
  .superRefine((config, issues) => {
    const problem = (path: string, message: string) => issues.addIssue({ code: "custom", path: [path], message });
    if (config.allow_dots_in.length > 0 && !config.topic_template) problem("allow_dots_in", "applies to 'topic_template' only");
    if (config.idempotent === true && config.acks !== -1) problem("idempotent", "needs acks \"all\"");
    if (config.transactional && config.acks !== -1) problem("transactional", "needs acks \"all\"");
    if (config.transactional && config.idempotent === false) problem("idempotent", "cannot be false with 'transactional' (a transaction needs the idempotent producer)");
    for (const key of ["transactional_id", "transaction_timeout_ms"] as const) {
      if (config[key] !== undefined && !config.transactional) problem(key, "applies to 'transactional: true' only");
    }
  })
  .transform((config) => ({ ...config, idempotent: config.idempotent ?? config.acks === -1 }));

export type KafkaSinkConfig = z.output<typeof configSchema>;

export const kafkaSink: SinkDefinition<KafkaSinkConfig> = {
  type: "kafka",
  kind: "sink",
  growBatches: true,
  summary: "Produces each message as a Kafka record (idempotent producer, key and topic templates)",
  config: configSchema,
  example: {
    brokers: "localhost:9092",
    topic: "order-events",
    key: "{event_type}",
    acks: "all",
    compression: "gzip",
  },
  create: createKafkaSink,
};

function createKafkaSink(config: KafkaSinkConfig, ctx: PluginContext) {
  const where = `kafka sink "${ctx.pipeline}"`;
  // Surface an unknown placeholder now, as a config error, rather than on the first message.
  if (config.topic_template) checkAllowDotsIn(config.topic_template, config.allow_dots_in, ctx, `${where}: 'topic_template'`);
  const values = oneTokenValues(config.allow_dots_in, "topic name parts");
  if (config.key) ctx.render(config.key, PROBE_MESSAGE);
  const kafka = kafkaClient(config, ctx, config.timeout_ms);
  const transactionalId = config.transactional_id ?? `pg-tide:${ctx.relayGroupId ?? "default"}:${ctx.pipeline}`;
  let producer: Producer | undefined;
  /** The transaction of the batch being published (transactional mode): every request goes through it. */
  let transaction: Transaction | undefined;
  let closing: Promise<void> | undefined;

  const permanent = (message: OutboxMessage, text: string, cause?: unknown): DeliveryFailure => ({
    id: message.id,
    error: ctx.errors.permanent(`${where}: message ${message.id}: ${text}`, cause),
    retriable: false,
  });

  function toRecord(message: OutboxMessage): PendingRecord | DeliveryFailure {
    let topic: string;
    let key: string | null = null;
    try {
      topic = config.topic ?? renderTopic(config.topic_template!, message);
    } catch (error) {
      return permanent(message, `topic_template "${config.topic_template}" refused: ${messageOf(error)}`, error);
    }
    try {
      if (config.key) key = ctx.render(config.key, message);
      else key = keyHeader(message);
    } catch (error) {
      return permanent(message, `cannot render the key: ${messageOf(error)}`, error);
    }
    if (!TOPIC_NAME.test(topic)) {
      return permanent(message, `topic "${topic}" from template "${config.topic_template}" is not a valid Kafka topic name`);
    }
    const headers: Record<string, string> = {};
    for (const name in message.headers) headers[name] = headerText(message.headers[name]);
    headers["tide-dedup-key"] = message.dedupKey;
    headers["tide-event-type"] = message.eventType;
    headers["tide-outbox"] = message.outbox;
    headers["tide-message-id"] = message.id.toString();
    // CloudEvents Kafka binding: content-type tells structured mode; binary mode adds ce_ headers.
    if (message.contentType) headers["content-type"] = message.contentType;
    for (const [name, value] of Object.entries(message.cloudEventAttributes ?? {})) headers[`ce_${name}`] = value;
    const record = { key, value: payloadBodyBytes(message), headers };
    return { message, topic, record, bytes: recordBytes(record) };
  }

  function renderTopic(template: string, message: OutboxMessage): string {
    const topic = ctx.render(template, message, values);
    if (topic.startsWith("_") && !template.startsWith("_")) {
      throw new Error(
        `it rendered "${topic}": topics starting with "_" belong to Kafka and its tools (__consumer_offsets, ` +
          `__transaction_state, _schemas) and a value may not lead there; to produce to one, start topic_template with it`,
      );
    }
    return topic;
  }

  async function send(records: PendingRecord[]): Promise<void> {
    const byTopic = new Map<string, TopicMessages>();
    for (const { topic, record } of records) {
      let group = byTopic.get(topic);
      if (!group) byTopic.set(topic, (group = { topic, messages: [] }));
      group.messages.push(record);
    }
    await (transaction ?? producer!).sendBatch({
      topicMessages: [...byTopic.values()],
      acks: config.acks,
      timeout: config.timeout_ms,
      compression: COMPRESSION_TYPES[config.compression],
    });
  }

  /**
   * Sends the records in order, in requests of at most max_request_bytes. A request the broker
   * refuses for good is split in halves and each half sent again: records that are too large, or
   * that no retry can fix, end up alone and go to the DLQ, in a few requests instead of one per
   * record. Records of a request that a partition refused may have reached other partitions: they
   * are sent again (consumers deduplicate with the tide-dedup-key header).
   *
   * When nothing was acknowledged yet, or in a transaction, a transient failure rejects (the whole
   * batch is retried). After that, it fails the request's records and holds back the rest: only those
   * are retried.
   */
  async function deliver(records: PendingRecord[], failures: DeliveryFailure[]): Promise<void> {
    const queue = requests(records, config.max_request_bytes);
    let acknowledged = 0;
    let warned = false;
    while (queue.length > 0) {
      const group = queue.shift()!;
      try {
        await send(group);
        acknowledged += group.length;
        continue;
      } catch (error) {
        if (!isPermanent(error)) {
          // In a transaction nothing counts as delivered before the commit: the batch is aborted and retried whole.
          if (acknowledged === 0 || transaction) throw transient(error, group);
          const cause = transient(error, group);
          for (const { message } of group) failures.push({ id: message.id, error: cause, retriable: true });
          for (const { message } of queue.flat()) {
            const held = ctx.errors.transient(`${where}: message ${message.id}: not sent because an earlier request failed: ${cause.message}`, cause);
            failures.push({ id: message.id, error: held, retriable: true, heldBack: true });
          }
          return;
        }
        if (group.length > 1) {
          if (!warned) {
            warned = true;
            const hint = isTooLarge(error)
              ? "; to spare the extra requests, set 'max_request_bytes' to the broker's message.max.bytes or the topic's max.message.bytes"
              : "";
            ctx.logger.warn(`${where}: Kafka refused ${group.length} records (${sizeOf(group)} bytes) for good; sending them again in halves${hint}`, {
              error: describeKafkaError(error),
            });
          }
          const half = Math.ceil(group.length / 2);
          queue.unshift(group.slice(0, half), group.slice(half));
          continue;
        }
        const [only] = group as [PendingRecord];
        const reason = isTooLarge(error) ? await tooLarge(only) : describeKafkaError(error);
        failures.push(permanent(only.message, `refused by Kafka: ${reason}`, error));
      }
    }
  }

  /** Why a record alone is too large, naming the limit it exceeds (its value when Kafka says). */
  async function tooLarge(record: PendingRecord): Promise<string> {
    const limit = await topicLimit(record.topic);
    const topicLimitText = limit === undefined ? "" : ` (${limit} bytes for topic "${record.topic}")`;
    return `the record is about ${record.bytes} bytes, more than the broker accepts: its message.max.bytes, or the topic's ` +
      `max.message.bytes${topicLimitText}; raise that limit or make the message smaller`;
  }

  /** The topic's max.message.bytes, or undefined when it cannot be read (no DescribeConfigs permission). */
  async function topicLimit(topic: string): Promise<number | undefined> {
    const { ConfigResourceTypes } = await loadKafkajs();
    const admin = (await kafka()).admin();
    try {
      await admin.connect();
      const described = await admin.describeConfigs({
        resources: [{ type: ConfigResourceTypes.TOPIC, name: topic, configNames: ["max.message.bytes"] }],
        includeSynonyms: false,
      });
      const value = described.resources[0]?.configEntries.find((entry) => entry.configName === "max.message.bytes")?.configValue;
      return value === undefined ? undefined : Number(value);
    } catch {
      return undefined;
    } finally {
      await admin.disconnect().catch(() => {});
    }
  }

  async function open(): Promise<void> {
    const { Partitioners } = await loadKafkajs();
    const candidate = (await kafka()).producer({
      idempotent: config.idempotent,
      maxInFlightRequests: config.idempotent ? 1 : undefined,
      transactionalId: config.transactional ? transactionalId : undefined,
      transactionTimeout: config.transaction_timeout_ms,
      createPartitioner: Partitioners.DefaultPartitioner,
      allowAutoTopicCreation: true,
    });
    const connect = async () => {
      await candidate.connect();
      // kafkajs initialises a transactional producer (InitProducerId) at its first transaction. Doing
      // it now, with an empty transaction that sends nothing, fences the producer of the relay this
      // one replaces and makes the broker abort that producer's open transaction before this relay
      // publishes anything: read_committed consumers never see its records.
      if (config.transactional) await (await candidate.transaction()).abort();
    };
    await connectWithin(where, config.brokers, connect, () => candidate.disconnect(), ctx);
    producer = candidate;
  }

  /**
   * One batch, one Kafka transaction: the records of every request commit together, or abort
   * together when a request fails (the batch is then retried whole, in a new transaction). Records
   * refused for good go to the DLQ as without a transaction, and the others commit. After a failed
   * transaction the producer is dropped; the next batch initialises a new one, which makes the broker
   * finish or abort whatever transaction of this id is still open before anything else is written.
   */
  async function deliverInTransaction(records: PendingRecord[], failures: DeliveryFailure[]): Promise<void> {
    const current = producer!;
    let batch: Transaction;
    try {
      batch = await current.transaction();
    } catch (error) {
      await discard(current);
      throw transient(error, records);
    }
    transaction = batch;
    try {
      await deliver(records, failures);
      await ctx.failpoint?.("kafka.before-commit");
      // A pipeline stopped or fenced mid-batch acknowledges nothing, and its next owner sends the
      // batch again: aborting spares read_committed consumers a second copy.
      if (ctx.signal.aborted) throw ctx.errors.transient(`${where}: the pipeline stopped before the transaction was committed; aborted it`);
    } catch (error) {
      transaction = undefined;
      // Aborting now frees read_committed consumers at once. The producer goes either way: one that
      // another producer of its id fenced fails every later transaction, and kafkajs cannot tell
      // that apart from a passing failure; a new producer is right in both cases.
      await batch.abort().catch(() => {});
      await discard(current);
      throw error;
    }
    transaction = undefined;
    try {
      await batch.commit();
    } catch (error) {
      await discard(current);
      throw ctx.errors.transient(`${where}: committing the transaction failed: ${describeKafkaError(error)}`, error);
    }
  }

  async function discard(current: Producer): Promise<void> {
    if (producer === current) producer = undefined;
    await current.disconnect().catch(() => {});
  }

  function transient(error: unknown, records: PendingRecord[]): Error {
    // Kafka does not say which topic it refused; the batch's topics are the ones to check.
    const denied = kafkaErrorTypes(error).includes("TOPIC_AUTHORIZATION_FAILED")
      ? ` (the user may not write to topic ${[...new Set(records.map((r) => r.topic))].map((t) => `"${t}"`).join(", ")}; ` +
        "the messages wait in the outbox until an ACL allows it)"
      : "";
    return ctx.errors.transient(`${where}: producing to ${config.brokers.join(",")} failed: ${describeKafkaError(error)}${denied}`, error);
  }

  return {
    async connect() {
      if (closing) throw ctx.errors.transient(`${where}: closed`);
      if (producer) return;
      const unavailable = await ensureCodec(config.compression);
      if (unavailable) throw ctx.errors.config(`${where}: 'compression': ${unavailable}`);
      await open();
    },

    async publish(batch: OutboxMessage[]): Promise<DeliveryFailure[]> {
      if (batch.length === 0) return [];
      // A failed transaction dropped the producer: a new one settles what the broker still holds open.
      if (!producer && config.transactional && !closing) await open();
      if (!producer) throw ctx.errors.transient(`${where}: not connected`);
      const failures: DeliveryFailure[] = [];
      const records: PendingRecord[] = [];
      for (const message of batch) {
        const built = toRecord(message);
        if ("record" in built) records.push(built);
        else failures.push(built);
      }
      if (records.length === 0) return failures;
      if (config.transactional) await deliverInTransaction(records, failures);
      else await deliver(records, failures);
      return failures;
    },

    async close() {
      closing ??= (async () => {
        const current = producer;
        producer = undefined;
        await current?.disconnect().catch((error) => ctx.logger.warn(`${where}: disconnect failed`, { error: messageOf(error) }));
      })();
      await closing;
    },

    health() {
      return Promise.resolve(producer ? { ok: true } : { ok: false, detail: "not connected" });
    },
  };
}

/** The `key` header as a record key, so that all changes of one captured row land in one partition. */
function keyHeader(message: OutboxMessage): string | null {
  const value = message.headers.key;
  return value === undefined || value === null ? null : headerText(value);
}
