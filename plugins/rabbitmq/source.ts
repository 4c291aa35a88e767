// Source "rabbitmq": consumes a queue with manual acknowledgements and a prefetch of one batch. A
// batch is acknowledged (basic.ack, multiple) only after the inbox commit, and returned to the queue
// (basic.nack, requeue) when writing it failed; deliveries left unacknowledged when the connection
// drops are requeued by the broker. A lost connection is opened again on the next read.

import type { Channel, ChannelModel, ConsumeMessage } from "amqplib";
import { z } from "zod";
import type { InboundMessage, PluginContext, SourceBatch, SourceDefinition } from "../../core/plugin.ts";
import { brokerReply, checkConnection, connectAmqp, connectionShape, eventIdOf, headersOf, serverOf } from "./connection.ts";
import { inboundPayload, messageOf } from "../shared.ts";

const configSchema = z
  .strictObject({
    ...connectionShape,
    /** The queue to consume; it must exist (declared and bound by whoever owns the topology). */
    queue: z.string().min(1).refine((s) => Buffer.byteLength(s) <= 255, "must be at most 255 bytes"),
    /** Handled by the engine (inbox event_id template); accepted here so that the key validates. */
    event_id: z.string().optional(),
    /** Handled by the engine (filter); accepted here so that the key validates. */
    transform: z.unknown().optional(),
  })
  .superRefine((config, issues) => {
    checkConnection(config, (path, message) => issues.addIssue({ code: "custom", path: [path], message }));
  });

export type RabbitmqSourceConfig = z.output<typeof configSchema>;

export const rabbitmqSource: SourceDefinition<RabbitmqSourceConfig> = {
  type: "rabbitmq",
  kind: "source",
  summary: "Consumes a RabbitMQ queue (prefetch = batch size); messages are acknowledged after the inbox commit",
  config: configSchema,
  example: { url: "amqp://localhost:5672", queue: "payments" },
  create: createRabbitmqSource,
};

/**
 * Ids of messages without a message-id: the connection's own prefix, then the delivery tag. AMQP
 * 0-9-1 gives a message no position that survives a redelivery, and a hash of the body would merge
 * distinct messages that happen to be equal; so such a message, redelivered after a crash between
 * the inbox commit and the ack, is written again. Publishers that set message-id avoid that.
 */
function sessionPrefix(): string {
  return crypto.randomUUID().slice(0, 8);
}

interface Session {
  connection: ChannelModel;
  channel: Channel;
  prefix: string;
  /** Deliveries not yet handed out by read(). */
  buffer: ConsumeMessage[];
  /** Why the session can no longer be used (the connection or channel closed, the consumer was cancelled). */
  broken?: Error;
}

function createRabbitmqSource(config: RabbitmqSourceConfig, ctx: PluginContext) {
  const where = `rabbitmq source "${ctx.pipeline}"`;
  let session: Session | undefined;
  let wake: (() => void) | undefined;
  let closing: Promise<void> | undefined;

  async function open(): Promise<Session> {
    const connection = await connectAmqp(config, ctx, where);
    try {
      const channel = await connection.createChannel();
      const current: Session = { connection, channel, prefix: sessionPrefix(), buffer: [] };
      const breaks = (why: string) => (error?: unknown) => {
        current.broken ??= ctx.errors.transient(`${where}: ${why}${error ? `: ${brokerReply(error).text}` : ""}`, error);
        wake?.();
      };
      connection.on("error", (error) => ctx.logger.warn(`${where}: connection error`, { error: messageOf(error) }));
      connection.on("close", breaks(`the connection to ${serverOf(config)} closed`));
      channel.on("error", breaks("the broker closed the channel"));
      channel.on("close", breaks("the channel closed"));
      await channel.checkQueue(config.queue).catch((error) => {
        if (brokerReply(error).code === 404) {
          throw ctx.errors.config(`${where}: 'queue': no queue "${config.queue}" on ${serverOf(config)}; declare it first`);
        }
        throw ctx.errors.transient(`${where}: cannot look up queue "${config.queue}": ${brokerReply(error).text}`, error);
      });
      // Never more unacknowledged deliveries than one batch: the next arrive once it is acknowledged.
      await channel.prefetch(ctx.batchSize);
      await channel.consume(config.queue, (delivery) => {
        if (delivery === null) breaks(`the broker cancelled the consumer of queue "${config.queue}" (deleted?)`)();
        else {
          current.buffer.push(delivery);
          wake?.();
        }
      }, { noAck: false });
      return current;
    } catch (error) {
      await connection.close().catch(() => {});
      throw error;
    }
  }

  async function drop(current: Session): Promise<void> {
    if (session === current) session = undefined;
    await current.connection.close().catch(() => {});
  }

  function waitForDelivery(): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        wake = undefined;
        ctx.signal.removeEventListener("abort", done);
        resolve();
      };
      wake = done;
      ctx.signal.addEventListener("abort", done, { once: true });
    });
  }

  function toInbound(current: Session, delivery: ConsumeMessage): InboundMessage {
    const headers = headersOf(delivery.properties.headers);
    const { payloadText, parsed } = inboundPayload(delivery.content);
    return {
      eventId: eventIdOf(delivery.properties.messageId, headers, parsed),
      transportId: `rabbitmq:${current.prefix}-${delivery.fields.deliveryTag}`,
      payloadText,
      headers,
      source: `rabbitmq:${config.queue}`,
    };
  }

  /** Acknowledges (or requeues) every delivery up to `last`; a qos round trip confirms the broker has it. */
  async function settle(current: Session, last: ConsumeMessage, how: "ack" | "nack"): Promise<void> {
    const lostSince = `the connection was lost before the ${how === "ack" ? "acknowledgement" : "requeue"}; the broker delivers the batch again`;
    if (current.broken || session !== current) throw ctx.errors.transient(`${where}: ${lostSince}`);
    try {
      if (how === "ack") current.channel.ack(last, true);
      else current.channel.nack(last, true, true);
      await current.channel.prefetch(ctx.batchSize);
    } catch (error) {
      throw ctx.errors.transient(`${where}: ${lostSince}: ${messageOf(error)}`, error);
    }
  }

  return {
    async connect() {
      if (closing) throw ctx.errors.transient(`${where}: closed`);
      session ??= await open();
    },

    async read(): Promise<SourceBatch | null> {
      if (ctx.signal.aborted || closing) return null;
      if (session?.broken) {
        const { broken } = session;
        await drop(session);
        throw broken;
      }
      session ??= await open();
      const current = session;
      while (current.buffer.length === 0) {
        if (ctx.signal.aborted || closing) return null;
        if (current.broken) {
          await drop(current);
          throw current.broken;
        }
        await waitForDelivery();
      }
      if (ctx.signal.aborted) return null;
      const deliveries = current.buffer.splice(0, ctx.batchSize);
      const last = deliveries[deliveries.length - 1]!;
      return {
        messages: deliveries.map((delivery) => toInbound(current, delivery)),
        ack: () => settle(current, last, "ack"),
        nack: () => settle(current, last, "nack"),
      };
    },

    async close() {
      closing ??= (async () => {
        wake?.();
        const current = session;
        session = undefined;
        if (current) await current.connection.close().catch(() => {});
      })();
      await closing;
    },

    health() {
      if (session?.broken) return Promise.resolve({ ok: false, detail: session.broken.message });
      return Promise.resolve(session ? { ok: true } : { ok: false, detail: "not connected" });
    },
  };
}
