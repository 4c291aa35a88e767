// Sink "mqtt": publishes each outbox message (body = JSON payload) at QoS 1 (or 2) to a topic or a
// rendered topic_template; a message counts as delivered once the broker acknowledged it (PUBACK,
// or PUBCOMP at QoS 2). With MQTT 5 the message headers travel as user properties, with
// `tide-dedup-key` among them, and a PUBACK reason code says why the broker refused a message.
// A topic_template's values are user data: a value fills one topic level (no "/", unless
// allow_slashes_in names its placeholder; {topic} always may), and no value may lead the topic into
// the broker's "$" topics ($SYS, $share) unless the template itself starts there.

import type { IClientPublishOptions, MqttClient } from "mqtt";
import { z } from "zod";
import type { DeliveryFailure, OutboxMessage, PluginContext, SinkDefinition } from "../../core/plugin.ts";
import { checkConnection, clientIdOf, connectionShape, connectMqtt, endNow, lastErrorOf, serverOf, topicNameProblem } from "./connection.ts";
import { checkAllowedIn, headerText, messageOf, oneSegmentValues, payloadBody, keyOrInstead } from "../shared.ts";

const configSchema = z
  .strictObject({
    ...connectionShape,
    topic: z
      .string()
      .refine((s) => !s.includes("{"), { error: "has a placeholder: use 'topic_template' for per-message topics", abort: true })
      .refine((s) => topicNameProblem(s) === undefined, { error: (issue) => `is not an MQTT topic name: ${topicNameProblem(issue.input as string)}` })
      .optional(),
    /** Per-message topic, e.g. `orders/{op}`. */
    topic_template: z.string().min(1).optional(),
    /** Placeholders of topic_template whose values may contain "/" (span several levels), e.g. ["payload.path"]. */
    allow_slashes_in: z.array(z.string().min(1)).default([]),
    /** 1: delivered once the broker sent PUBACK; 2: exactly-once hand-over to the broker (PUBCOMP). */
    qos: z.union([z.literal(1), z.literal(2)], { error: "must be 1 or 2" }).default(1),
    /** The broker keeps the last message of each topic for new subscribers. */
    retain: z.boolean().default(false),
  })
  .apply(keyOrInstead, "topic", "topic_template")
  .superRefine((config, issues) => {
    const problem = (path: string, message: string) => issues.addIssue({ code: "custom", path: [path], message });
    if (config.allow_slashes_in.length > 0 && !config.topic_template) problem("allow_slashes_in", "applies to 'topic_template' only");
    checkConnection(config, problem);
  });

export type MqttSinkConfig = z.output<typeof configSchema>;

export const mqttSink: SinkDefinition<MqttSinkConfig> = {
  type: "mqtt",
  kind: "sink",
  growBatches: true,
  summary: "Publishes each message to an MQTT topic at QoS 1 (delivered once the broker acknowledged it), with topic templates",
  config: configSchema,
  example: { url: "mqtt://localhost:1883", topic_template: "orders/{op}", qos: 1 },
  create: createMqttSink,
};

/** MQTT 5 PUBACK reason codes that no retry can fix: the message goes to the DLQ. */
const PERMANENT_REASONS = new Set([0x90 /* topic name invalid */, 0x95 /* packet too large */, 0x99 /* payload format invalid */]);
/** A CloudEvents attribute name: lower-case ASCII letters and digits. */
const EXTENSION_NAME = /^[a-z0-9]{1,20}$/;
/** MQTT 5 PUBACK reason codes that refuse this very message (its attempts are spent). */
const REFUSING_REASONS = new Set([0x87 /* not authorized */, 0x97 /* quota exceeded */]);

interface Planned {
  message: OutboxMessage;
  topic: string;
}

function createMqttSink(config: MqttSinkConfig, ctx: PluginContext) {
  const where = `mqtt sink "${ctx.pipeline}"`;
  const server = serverOf(config);
  // Surface an unknown placeholder now, as a config error, rather than on the first message.
  if (config.topic_template) checkAllowedIn(config.topic_template, config.allow_slashes_in, "allow_slashes_in", ctx, `${where}: 'topic_template'`);
  const values = oneSegmentValues("/", "allow_slashes_in", config.allow_slashes_in, "topic levels");
  // A clean session of its own: a random suffix keeps two relays (a handover) from taking over each other's connection.
  const clientId = config.client_id ?? clientIdOf("pg-tide-", `${ctx.pipeline}-${crypto.randomUUID().slice(0, 8)}`);
  let client: MqttClient | undefined;
  let closing: Promise<void> | undefined;

  const failure = (message: OutboxMessage, retriable: boolean, text: string, cause?: unknown): DeliveryFailure => ({
    id: message.id,
    error: (retriable ? ctx.errors.transient : ctx.errors.permanent)(`${where}: message ${message.id}: ${text}`, cause),
    retriable,
  });
  const heldBack = (message: OutboxMessage, text: string): DeliveryFailure => ({ ...failure(message, true, text), heldBack: true });

  function renderTopic(message: OutboxMessage): string {
    const topic = config.topic ?? ctx.render(config.topic_template!, message, values);
    if (topic.startsWith("$") && config.topic === undefined && !config.topic_template!.startsWith("$")) {
      throw new Error(
        `it rendered "${topic}": topics starting with "$" are the broker's own ($SYS, $share) and a value may not lead there; ` +
          "to publish to one, start topic_template with it",
      );
    }
    const problem = topicNameProblem(topic);
    if (problem) throw new Error(`it rendered "${topic}", which is not an MQTT topic name: ${problem}`);
    return topic;
  }

  function optionsOf(message: OutboxMessage): IClientPublishOptions {
    const options: IClientPublishOptions = { qos: config.qos, retain: config.retain };
    if (config.protocol_version !== "5") return options;
    const userProperties: Record<string, string> = {};
    const attributes = message.cloudEventAttributes;
    if (attributes) {
      // CloudEvents MQTT binding, binary mode: every user property is read as an attribute, named as
      // it is. So only the event's attributes go, and headers whose names are valid extension names
      // (traceparent, tracestate); tide's own properties are the event's id and type already.
      for (const [name, value] of Object.entries(message.headers)) if (EXTENSION_NAME.test(name)) userProperties[name] = headerText(value);
      Object.assign(userProperties, attributes);
    } else {
      for (const [name, value] of Object.entries(message.headers)) userProperties[name] = headerText(value);
      userProperties["tide-dedup-key"] = message.dedupKey;
      userProperties["tide-event-type"] = message.eventType;
      userProperties["tide-outbox"] = message.outbox;
      userProperties["tide-message-id"] = message.id.toString();
    }
    options.properties = { userProperties, contentType: message.contentType ?? "application/json" };
    return options;
  }

  /** Publishes every message in order, then waits for each acknowledgement (or the deadline). */
  async function send(mqttClient: MqttClient, planned: Planned[]): Promise<(Error | undefined)[]> {
    const acks = planned.map((item) =>
      new Promise<Error | undefined>((resolve) => {
        try {
          mqttClient.publish(item.topic, payloadBody(item.message), optionsOf(item.message), (error) => resolve(error ?? undefined));
        } catch (error) {
          resolve(error as Error);
        }
      }));
    // Unacknowledged at the deadline, or when the connection drops: mqtt.js would send them again
    // after a reconnect, but the batch is retried anyway (consumers drop repeats by tide-dedup-key).
    let timer: ReturnType<typeof setTimeout> | undefined;
    let lost: (() => void) | undefined;
    const givenUp = new Promise<Error>((resolve) => {
      timer = setTimeout(() => resolve(new Error(`no acknowledgement from ${server} within ${config.timeout_ms} ms`)), config.timeout_ms);
      lost = () => resolve(new Error(`the connection to ${server} closed before the broker acknowledged`));
      mqttClient.once("close", lost);
    });
    try {
      return await Promise.all(acks.map((ack) => Promise.race([ack, givenUp])));
    } finally {
      clearTimeout(timer);
      mqttClient.off("close", lost!);
    }
  }

  return {
    async connect() {
      if (closing) throw ctx.errors.transient(`${where}: closed`);
      client ??= (await connectMqtt(config, { clientId, clean: true }, ctx, where)).client;
    },

    async publish(batch: OutboxMessage[]): Promise<DeliveryFailure[]> {
      if (batch.length === 0) return [];
      if (!client) throw ctx.errors.transient(`${where}: not connected`);
      if (!client.connected) throw ctx.errors.transient(`${where}: not connected to MQTT ${server}, reconnecting${lastErrorOf(client)}`);
      const failures: DeliveryFailure[] = [];
      const planned: Planned[] = [];
      for (const message of batch) {
        if (message.cloudEventAttributes && config.protocol_version !== "5") {
          const text = 'wire_format "cloudevents-binary" needs MQTT 5 (its attributes are user properties): set protocol_version "5", or use wire_format "cloudevents"';
          failures.push(failure(message, false, text));
          continue;
        }
        try {
          planned.push({ message, topic: renderTopic(message) });
        } catch (error) {
          failures.push(failure(message, false, `topic_template "${config.topic_template}" refused: ${messageOf(error)}`, error));
        }
      }
      if (planned.length === 0) return failures;
      const outcomes = await send(client, planned);
      const withCode = (error: Error | undefined) => (error as { code?: unknown } | undefined)?.code;
      if (outcomes.every((error) => error !== undefined && typeof withCode(error) !== "number")) {
        // Nothing acknowledged, nothing refused: the connection went away or the broker is not answering.
        throw ctx.errors.transient(`${where}: publishing to ${server} failed: ${messageOf(outcomes[0])}`, outcomes[0]);
      }
      let broken: { id: bigint; text: string } | undefined;
      for (const [index, item] of planned.entries()) {
        const error = outcomes[index];
        if (broken) {
          // Later messages would land before the failed one on retry: fail them too (consumers drop repeats by tide-dedup-key).
          failures.push(heldBack(item.message, `not delivered because message ${broken.id} before it failed: ${broken.text}`));
          continue;
        }
        if (error === undefined) continue;
        const code = withCode(error);
        const text = `publish to "${item.topic}" failed: ${messageOf(error)}`;
        if (typeof code === "number" && PERMANENT_REASONS.has(code)) {
          failures.push(failure(item.message, false, text, error));
          continue;
        }
        const refused = typeof code === "number" && REFUSING_REASONS.has(code);
        const wait = code === 0x87 ? "; it waits in the outbox until the broker allows it" : "";
        failures.push({ ...failure(item.message, true, text + wait, error), refused });
        broken = { id: item.message.id, text: messageOf(error) };
      }
      return failures;
    },

    async close() {
      closing ??= (async () => {
        const current = client;
        client = undefined;
        if (current) await endNow(current);
      })();
      await closing;
    },

    health() {
      if (!client) return Promise.resolve({ ok: false, detail: "not connected" });
      return Promise.resolve(client.connected ? { ok: true } : { ok: false, detail: "reconnecting" });
    },
  };
}
