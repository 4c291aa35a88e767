// Sink "rabbitmq": publishes each outbox message (body = JSON payload) to an exchange with a routing
// key, both fixed or rendered per message, on a confirm channel: a message counts as delivered only
// once the broker confirmed it. Messages are persistent and mandatory by default, so one that no
// queue would receive comes back (basic.return) and fails instead of vanishing. message-id is the
// dedup key, for consumers to drop redeliveries.
// A routing_key_template's values are user data: a value fills one word of a topic-exchange key (no
// ".", unless allow_dots_in names its placeholder; {topic} always may), and no value may lead an
// exchange_template into RabbitMQ's own "amq." exchanges.

import type { ChannelModel, ConfirmChannel, Options } from "amqplib";
import { z } from "zod";
import type { DeliveryFailure, OutboxMessage, PluginContext, RenderOptions, SinkDefinition } from "../../core/plugin.ts";
import { brokerReply, type BrokerReply, checkConnection, connectAmqp, connectionShape, serverOf } from "./connection.ts";
import { channelErrors, ConfirmTimeout, culpritOf, EncodeError, isNack, type Publication, publishConfirmed } from "./confirms.ts";
import { checkAllowDotsIn, headerText, messageOf, oneTokenValues, payloadBody, keyOrInstead } from "../shared.ts";

/** AMQP short strings (exchange names, routing keys) hold at most 255 bytes. */
const SHORT_STRING_BYTES = 255;

const fixedName = (what: string, template: string) =>
  z
    .string()
    .refine((s) => !s.includes("{"), { error: `has a placeholder: use '${template}' for per-message ${what}s`, abort: true })
    .refine((s) => Buffer.byteLength(s) <= SHORT_STRING_BYTES, `must be at most ${SHORT_STRING_BYTES} bytes`);

const configSchema = z
  .strictObject({
    ...connectionShape,
    /** The exchange; "" (the default) is RabbitMQ's default exchange, which routes by queue name. */
    exchange: fixedName("exchange", "exchange_template").optional(),
    /** Per-message exchange, e.g. `events.{outbox}`. */
    exchange_template: z.string().min(1).optional(),
    /** The routing key ("" for a fanout exchange); with the default exchange, the queue's name. */
    routing_key: fixedName("routing key", "routing_key_template").optional(),
    /** Per-message routing key, e.g. `orders.{op}`. */
    routing_key_template: z.string().min(1).optional(),
    /** Placeholders of routing_key_template whose values may contain "." (span several words), e.g. ["event_type"]. */
    allow_dots_in: z.array(z.string().min(1)).default([]),
    /** delivery_mode 2: the broker writes the message to disk in durable queues before it confirms. */
    persistent: z.boolean().default(true),
    /** A message no queue receives is returned and fails (retried), instead of being dropped by the broker. */
    mandatory: z.boolean().default(true),
  })
  .apply(keyOrInstead, "routing_key", "routing_key_template", { empty: true, hint: "(\"\" for a fanout exchange)" })
  .superRefine((config, issues) => {
    const problem = (path: string, message: string) => issues.addIssue({ code: "custom", path: [path], message });
    if (config.exchange !== undefined && config.exchange_template) problem("exchange_template", "cannot be combined with 'exchange'");
    if (config.allow_dots_in.length > 0 && !config.routing_key_template) problem("allow_dots_in", "applies to 'routing_key_template' only");
    checkConnection(config, problem);
  });

export type RabbitmqSinkConfig = z.output<typeof configSchema>;

export const rabbitmqSink: SinkDefinition<RabbitmqSinkConfig> = {
  type: "rabbitmq",
  kind: "sink",
  growBatches: true,
  summary: "Publishes each message to a RabbitMQ exchange with publisher confirms (persistent, mandatory, routing-key templates)",
  config: configSchema,
  example: { url: "amqp://localhost:5672", exchange: "events", routing_key_template: "orders.{op}" },
  create: createRabbitmqSink,
};

/** Exchange names whose existence was confirmed, so that each is asked about once. */
const EXCHANGE_CACHE_SIZE = 10_000;

interface Planned {
  message: OutboxMessage;
  exchange: string;
  routingKey: string;
}

function createRabbitmqSink(config: RabbitmqSinkConfig, ctx: PluginContext) {
  const where = `rabbitmq sink "${ctx.pipeline}"`;
  // Surface an unknown placeholder now, as a config error, rather than on the first message.
  if (config.routing_key_template) checkAllowDotsIn(config.routing_key_template, config.allow_dots_in, ctx, `${where}: 'routing_key_template'`);
  if (config.exchange_template) checkAllowDotsIn(config.exchange_template, [], ctx, `${where}: 'exchange_template'`);
  const values = oneTokenValues(config.allow_dots_in, "routing key words");
  const anyValue: RenderOptions = {};
  const exchanges = new Set<string>([""]);
  let connection: ChannelModel | undefined;
  let channel: ConfirmChannel | undefined;
  /** Why the broker blocks publishers (a memory or disk alarm), while it does. */
  let blocked: string | undefined;
  /** Messages returned as unroutable in the batch being published, by message-id. */
  let returned = new Map<string, string>();
  let closing: Promise<void> | undefined;

  const failure = (message: OutboxMessage, retriable: boolean, text: string, cause?: unknown): DeliveryFailure => ({
    id: message.id,
    error: (retriable ? ctx.errors.transient : ctx.errors.permanent)(`${where}: message ${message.id}: ${text}`, cause),
    retriable,
  });
  // Not tried, or not this message's own failure (order must hold): no retry attempt is spent.
  const heldBack = (message: OutboxMessage, text: string): DeliveryFailure => ({ ...failure(message, true, text), heldBack: true });

  async function open(): Promise<void> {
    const conn = await connectAmqp(config, ctx, where);
    conn.on("error", (error) => ctx.logger.warn(`${where}: connection error`, { error: messageOf(error) }));
    conn.on("close", () => {
      if (connection === conn) {
        connection = undefined;
        channel = undefined;
        if (!closing) ctx.logger.warn(`${where}: connection to ${serverOf(config)} closed; reconnecting on the next batch`);
      }
    });
    conn.on("blocked", (reason: string) => {
      blocked = reason;
      ctx.logger.warn(`${where}: RabbitMQ blocks publishing: ${reason}`);
    });
    conn.on("unblocked", () => {
      blocked = undefined;
      ctx.logger.info(`${where}: RabbitMQ accepts publishing again`);
    });
    try {
      connection = conn;
      await openChannel();
      if (config.exchange && !(await exchangeExists(config.exchange))) {
        throw ctx.errors.config(`${where}: 'exchange': no exchange "${config.exchange}" on ${serverOf(config)}; declare it first`);
      }
    } catch (error) {
      connection = undefined;
      channel = undefined;
      await conn.close().catch(() => {});
      throw error;
    }
  }

  async function openChannel(): Promise<ConfirmChannel> {
    const ch = await connection!.createConfirmChannel();
    ch.on("error", (error) => {
      channelErrors.set(ch, brokerReply(error));
      ctx.logger.debug(`${where}: channel closed by the broker`, { error: messageOf(error) });
    });
    ch.on("close", () => {
      if (channel === ch) channel = undefined;
    });
    ch.on("return", (returnedMessage) => {
      const id = returnedMessage.properties.messageId;
      const { replyCode, replyText } = returnedMessage.fields as { replyCode?: number; replyText?: string };
      if (typeof id === "string") returned.set(id, `${replyCode} ${replyText}`);
    });
    channel = ch;
    return ch;
  }

  /** Asks the broker on a channel of its own: a missing exchange closes the channel it was asked on. */
  async function exchangeExists(name: string): Promise<boolean> {
    if (exchanges.has(name)) return true;
    const probe = await connection!.createChannel();
    probe.on("error", () => {});
    try {
      await probe.checkExchange(name);
    } catch (error) {
      if (brokerReply(error).code === 404) return false;
      throw ctx.errors.transient(`${where}: cannot ask RabbitMQ whether exchange "${name}" exists: ${brokerReply(error).text}`, error);
    } finally {
      await probe.close().catch(() => {});
    }
    if (exchanges.size >= EXCHANGE_CACHE_SIZE) exchanges.delete(exchanges.values().next().value as string);
    exchanges.add(name);
    return true;
  }

  function render(template: string | undefined, fixed: string | undefined, message: OutboxMessage, options: RenderOptions = anyValue): string {
    return template === undefined ? fixed ?? "" : ctx.render(template, message, options);
  }

  async function plan(batch: OutboxMessage[], failures: DeliveryFailure[]): Promise<Planned[]> {
    const planned: Planned[] = [];
    let blockedBy: OutboxMessage | undefined;
    for (const message of batch) {
      if (blockedBy) {
        // Order: nothing after a message that waits for its exchange goes out before it.
        failures.push(heldBack(message, `held back behind message ${blockedBy.id}, which waits for its exchange`));
        continue;
      }
      let exchange: string;
      let routingKey: string;
      try {
        exchange = render(config.exchange_template, config.exchange, message);
        routingKey = render(config.routing_key_template, config.routing_key, message, values);
      } catch (error) {
        const template = config.routing_key_template ?? config.exchange_template;
        failures.push(failure(message, false, `template "${template}" refused: ${messageOf(error)}`, error));
        continue;
      }
      const problem = nameProblem(exchange, routingKey);
      if (problem) {
        failures.push(failure(message, false, problem));
        continue;
      }
      if (!(await exchangeExists(exchange))) {
        // An exchange may be declared later: keep the message in the outbox and retry.
        failures.push(failure(message, true, `no exchange "${exchange}" on ${serverOf(config)}; declare it, and the message goes out`));
        blockedBy = message;
        continue;
      }
      planned.push({ message, exchange, routingKey });
    }
    return planned;
  }

  function nameProblem(exchange: string, routingKey: string): string | undefined {
    if (config.exchange_template && exchange.startsWith("amq.") && !config.exchange_template.startsWith("amq.")) {
      return `exchange_template "${config.exchange_template}" rendered "${exchange}": exchanges starting with "amq." are ` +
        `RabbitMQ's own and a value may not lead there; to publish to one, start exchange_template with it`;
    }
    if (config.exchange_template && exchange === "") return `exchange_template "${config.exchange_template}" rendered an empty exchange name`;
    if (Buffer.byteLength(exchange) > SHORT_STRING_BYTES) return `exchange "${exchange.slice(0, 64)}..." is longer than ${SHORT_STRING_BYTES} bytes`;
    if (Buffer.byteLength(routingKey) > SHORT_STRING_BYTES) return `routing key "${routingKey.slice(0, 64)}..." is longer than ${SHORT_STRING_BYTES} bytes`;
    return undefined;
  }

  function propertiesOf(message: OutboxMessage): Options.Publish {
    const headers: Record<string, string> = {};
    for (const [name, value] of Object.entries(message.headers)) headers[name] = headerText(value);
    headers["tide-event-type"] = message.eventType;
    headers["tide-outbox"] = message.outbox;
    headers["tide-message-id"] = message.id.toString();
    // CloudEvents AMQP binding: binary mode's attributes are application properties (headers here)
    // named cloudEvents:<attribute>; either mode's media type is the content-type property.
    for (const [name, value] of Object.entries(message.cloudEventAttributes ?? {})) headers[`cloudEvents:${name}`] = value;
    return {
      messageId: message.dedupKey,
      type: message.eventType,
      timestamp: Math.floor(message.createdAt.getTime() / 1000),
      contentType: message.contentType ?? "application/json",
      appId: "pg-tide",
      persistent: config.persistent,
      mandatory: config.mandatory,
      headers,
    };
  }

  return {
    async connect() {
      if (closing) throw ctx.errors.transient(`${where}: closed`);
      if (!connection) await open();
    },

    async publish(batch: OutboxMessage[]): Promise<DeliveryFailure[]> {
      if (batch.length === 0) return [];
      if (closing) throw ctx.errors.transient(`${where}: closed`);
      if (!connection) await open();
      if (blocked !== undefined) throw ctx.errors.transient(`${where}: RabbitMQ ${serverOf(config)} blocks publishing: ${blocked}`);
      const ch = channel ?? (await openChannel());
      const failures: DeliveryFailure[] = [];
      const planned = await plan(batch, failures);
      returned = new Map();
      const publications: Publication[] = planned.map((item) => ({
        exchange: item.exchange, routingKey: item.routingKey, body: Buffer.from(payloadBody(item.message)), properties: propertiesOf(item.message),
      }));
      const outcomes = await publishConfirmed(ch, publications, config.timeout_ms);
      const reply = channelErrors.get(ch);
      const lost = outcomes.find((o): o is { ok: false; error: unknown } =>
        !o.ok && !(o.error instanceof EncodeError) && !isNack(o.error) && reply === undefined);
      if (lost) {
        // The connection is gone or unanswered: nothing can be said about any message of the batch.
        if (channel === ch) channel = undefined;
        await ch.close().catch(() => {});
        const why = lost.error instanceof ConfirmTimeout ? `no publisher confirm within ${config.timeout_ms} ms` : messageOf(lost.error);
        throw ctx.errors.transient(`${where}: publishing to ${serverOf(config)} failed: ${why}`, lost.error);
      }
      // The broker closed the channel over one publish it refused; the others it left unconfirmed.
      const culprit = reply ? culpritOf(publications, outcomes, reply) : -1;
      let broken: { id: bigint; text: string } | undefined;
      for (const [index, item] of planned.entries()) {
        const outcome = outcomes[index]!;
        if (broken) {
          // Later messages would land before the failed one on retry: fail them too (consumers drop repeats by message-id).
          failures.push(heldBack(item.message, `not delivered because message ${broken.id} before it failed: ${broken.text}`));
          continue;
        }
        if (outcome.ok) {
          const unroutable = returned.get(item.message.dedupKey);
          if (unroutable === undefined) continue;
          const text = `no queue is bound to receive it (exchange "${item.exchange}", routing key "${item.routingKey}": ${unroutable}); ` +
            "it waits in the outbox until a binding routes it";
          failures.push({ ...failure(item.message, true, text), refused: true });
          broken = { id: item.message.id, text: "no queue received it" };
          continue;
        }
        if (outcome.error instanceof EncodeError) {
          failures.push(failure(item.message, false, `cannot be sent: ${outcome.error.message}`, outcome.error));
          continue;
        }
        if (isNack(outcome.error)) {
          failures.push(failure(item.message, true, "the broker could not take it (basic.nack)", outcome.error));
          broken = { id: item.message.id, text: "basic.nack" };
          continue;
        }
        if (index !== culprit) {
          failures.push(heldBack(item.message, `not confirmed before the broker closed the channel: ${reply!.text}`));
          continue;
        }
        const refused = refusal(item, reply!);
        if (refused.permanent) {
          failures.push(failure(item.message, false, refused.text, outcome.error));
          continue;
        }
        failures.push({ ...failure(item.message, true, refused.text, outcome.error), refused: refused.refused });
        broken = { id: item.message.id, text: refused.text };
      }
      return failures;
    },

    async close() {
      closing ??= (async () => {
        const current = connection;
        connection = undefined;
        channel = undefined;
        await current?.close().catch(() => {});
      })();
      await closing;
    },

    health() {
      if (blocked !== undefined) return Promise.resolve({ ok: false, detail: `RabbitMQ blocks publishing: ${blocked}` });
      return Promise.resolve(connection ? { ok: true } : { ok: false, detail: "not connected" });
    },
  };

  /** What the broker's reply says about this message's failure. */
  function refusal(item: Planned, reply: BrokerReply): { text: string; permanent?: boolean; refused?: boolean } {
    if (reply.code === 404 && reply.text.includes(`'${item.exchange}'`)) {
      exchanges.delete(item.exchange);
      return { text: `no exchange "${item.exchange}" on ${serverOf(config)} (${reply.text}); declare it, and the message goes out` };
    }
    if (reply.code === 406 && /message size/i.test(reply.text)) {
      return { text: `too large for the broker: ${reply.text}`, permanent: true };
    }
    if (reply.code === 403) {
      return { text: `the broker refused it (${reply.text}); it waits in the outbox until the user may write there`, refused: true };
    }
    return { text: `the broker closed the channel: ${reply.code ?? ""} ${reply.text}`.trim() };
  }
}
