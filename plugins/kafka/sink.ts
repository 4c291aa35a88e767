// Sink "kafka": produces each outbox message as one Kafka record (value = JSON payload, key from a
// template or the message's `key` header, tide metadata in headers) with kafkajs's idempotent
// producer, one sendBatch per publish. Resolves once the broker acknowledged at the configured acks
// level. Network and broker trouble fails the whole batch (retried); records that no retry can fix
// go to the DLQ one by one. A topic_template's values are user data: no "." in a value unless
// allow_dots_in names its placeholder ({topic} always may), and no value may lead the topic name
// into the "_" names of Kafka's own and its tools' topics (__consumer_offsets, _schemas).

import { type Message, Partitioners, type Producer, type TopicMessages } from "kafkajs";
import { z } from "zod";
import type { DeliveryFailure, OutboxMessage, PluginContext, SinkDefinition } from "../../core/plugin.ts";
import { COMPRESSION_TYPES, COMPRESSIONS, ensureCodec } from "./codecs.ts";
import { connectionShape, connectWithin, createKafkaClient, describeKafkaError, kafkaErrorTypes, TOPIC_NAME } from "./connection.ts";
import { checkAllowDotsIn, headerText, oneTokenValues, PROBE_MESSAGE, toJson, messageOf } from "../shared.ts";

const ACKS = { all: -1, "-1": -1, "1": 1, "0": 0 } as const;

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
  })
  .superRefine((config, issues) => {
    const problem = (path: string, message: string) => issues.addIssue({ code: "custom", path: [path], message });
    if (!config.topic && !config.topic_template) problem("topic", "required unless 'topic_template' is set");
    if (config.topic && config.topic_template) problem("topic_template", "cannot be combined with 'topic'");
    if (config.allow_dots_in.length > 0 && !config.topic_template) problem("allow_dots_in", "applies to 'topic_template' only");
    if (config.idempotent === true && config.acks !== -1) problem("idempotent", "needs acks \"all\"");
  })
  .transform((config) => ({ ...config, idempotent: config.idempotent ?? config.acks === -1 }));

export type KafkaSinkConfig = z.output<typeof configSchema>;

export const kafkaSink: SinkDefinition<KafkaSinkConfig> = {
  type: "kafka",
  kind: "sink",
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

/** Error types of records or topics that retrying cannot fix. */
const PERMANENT_TYPES = new Set([
  "MESSAGE_TOO_LARGE",
  "RECORD_LIST_TOO_LARGE",
  "INVALID_TOPIC_EXCEPTION",
  "INVALID_RECORD",
  "CORRUPT_MESSAGE",
  "POLICY_VIOLATION",
  "UNSUPPORTED_FOR_MESSAGE_FORMAT",
]);

interface PendingRecord {
  message: OutboxMessage;
  topic: string;
  record: Message;
}

function createKafkaSink(config: KafkaSinkConfig, ctx: PluginContext) {
  const where = `kafka sink "${ctx.pipeline}"`;
  // Surface an unknown placeholder now, as a config error, rather than on the first message.
  if (config.topic_template) checkAllowDotsIn(config.topic_template, config.allow_dots_in, ctx, `${where}: 'topic_template'`);
  const values = oneTokenValues(config.allow_dots_in, "topic name parts");
  if (config.key) ctx.render(config.key, PROBE_MESSAGE);
  const kafka = createKafkaClient(config, ctx, config.timeout_ms);
  let producer: Producer | undefined;
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
    for (const [name, value] of Object.entries(message.headers)) headers[name] = headerText(value);
    headers["tide-dedup-key"] = message.dedupKey;
    headers["tide-event-type"] = message.eventType;
    headers["tide-outbox"] = message.outbox;
    headers["tide-message-id"] = message.id.toString();
    return { message, topic, record: { key, value: toJson(message.payload), headers } };
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
    await producer!.sendBatch({
      topicMessages: [...byTopic.values()],
      acks: config.acks,
      timeout: config.timeout_ms,
      compression: COMPRESSION_TYPES[config.compression],
    });
  }

  /**
   * A permanent refusal does not say which record caused it: send topic by topic, then record by
   * record, so that only the culprits reach the DLQ. Records of a topic that went through before
   * the refusal are sent again (consumers deduplicate with the tide-dedup-key header).
   */
  async function isolate(records: PendingRecord[], failures: DeliveryFailure[]): Promise<void> {
    const topics = [...new Set(records.map((r) => r.topic))];
    const groups = topics.length > 1 ? topics.map((t) => records.filter((r) => r.topic === t)) : records.map((r) => [r]);
    for (const group of groups) {
      try {
        await send(group);
      } catch (error) {
        if (!isPermanent(error)) throw transient(error, group);
        if (group.length > 1) await isolate(group, failures);
        else failures.push(permanent(group[0]!.message, `refused by Kafka: ${describeKafkaError(error)}`, error));
      }
    }
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
      const candidate = kafka.producer({
        idempotent: config.idempotent,
        maxInFlightRequests: config.idempotent ? 1 : undefined,
        createPartitioner: Partitioners.DefaultPartitioner,
        allowAutoTopicCreation: true,
      });
      await connectWithin(where, config.brokers, () => candidate.connect(), () => candidate.disconnect(), ctx);
      producer = candidate;
    },

    async publish(batch: OutboxMessage[]): Promise<DeliveryFailure[]> {
      if (batch.length === 0) return [];
      if (!producer) throw ctx.errors.transient(`${where}: not connected`);
      const failures: DeliveryFailure[] = [];
      const records: PendingRecord[] = [];
      for (const message of batch) {
        const built = toRecord(message);
        if ("record" in built) records.push(built);
        else failures.push(built);
      }
      if (records.length === 0) return failures;
      try {
        await send(records);
      } catch (error) {
        if (!isPermanent(error)) throw transient(error, records);
        ctx.logger.warn(`${where}: Kafka refused the batch for good; sending its records one by one to find the culprits`, {
          error: describeKafkaError(error),
        });
        await isolate(records, failures);
      }
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

function isPermanent(error: unknown): boolean {
  return kafkaErrorTypes(error).some((type) => PERMANENT_TYPES.has(type));
}
