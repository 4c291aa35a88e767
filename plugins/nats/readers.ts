// The two ways the nats source reads. JetStream: a durable pull consumer, fetched in batches and
// acknowledged message by message only after the engine's inbox commit (at-least-once). Core: a
// (queue-group) subscription into a bounded buffer; core NATS has no acks, so it is at-most-once:
// a message in the buffer when the relay dies is lost.

import { type Msg, nanos, type NatsConnection, type Subscription } from "@nats-io/transport-node";
import { AckPolicy, type Consumer, type ConsumerConfig, DeliverPolicy, jetstream, type JetStreamManager, type JsMsg } from "@nats-io/jetstream";
import type { InboundMessage, PluginContext, SourceBatch } from "../../core/plugin.ts";
import { eventIdOf, flushWithin, headersOf } from "./connection.ts";
import { inboundPayload, messageOf } from "../shared.ts";

export interface NatsReader {
  /** Resolves with the next non-empty batch, or null once ctx.signal aborts. */
  read(): Promise<SourceBatch | null>;
  close(): Promise<void>;
}

export interface JetStreamReaderOptions {
  stream: string;
  durable: string;
  subject: string;
  deliverPolicy: "all" | "new";
  ackWaitMs: number;
}

/** How long one pull waits for messages before read() asks again. */
const FETCH_EXPIRES_MS = 1_000;
/** How long acks may take to reach the server before ack() reports a failure (JetStream redelivers). */
const FLUSH_TIMEOUT_MS = 10_000;

export async function openJetStreamReader(
  nc: NatsConnection,
  jsm: JetStreamManager,
  options: JetStreamReaderOptions,
  ctx: PluginContext,
  where: string,
): Promise<NatsReader> {
  const { stream, durable } = options;
  let consumer: Consumer | undefined = await ensureConsumer();

  /** Creates the durable consumer, or brings an existing one in line with the config. */
  async function ensureConsumer(): Promise<Consumer> {
    const existing = await jsm.consumers.info(stream, durable).catch((error) => {
      if (/consumer not found/i.test(messageOf(error))) return undefined;
      throw ctx.errors.transient(`${where}: cannot look up consumer "${durable}" on stream "${stream}": ${messageOf(error)}`, error);
    });
    const ackWait = nanos(options.ackWaitMs);
    if (existing && existing.config.ack_policy !== AckPolicy.Explicit) {
      throw ctx.errors.config(
        `${where}: consumer "${durable}" on stream "${stream}" has ack_policy "${existing.config.ack_policy}", ` +
          `not "explicit"; delete it or choose another durable_name`,
      );
    }
    if (existing?.config.deliver_subject) {
      throw ctx.errors.config(
        `${where}: consumer "${durable}" on stream "${stream}" is a push consumer; delete it or choose another durable_name`,
      );
    }
    try {
      if (!existing) {
        const config: Partial<ConsumerConfig> = {
          durable_name: durable,
          filter_subject: options.subject,
          ack_policy: AckPolicy.Explicit,
          ack_wait: ackWait,
          deliver_policy: options.deliverPolicy === "new" ? DeliverPolicy.New : DeliverPolicy.All,
        };
        await jsm.consumers.add(stream, config);
      } else if (existing.config.filter_subject !== options.subject || existing.config.ack_wait !== ackWait) {
        await jsm.consumers.update(stream, durable, { filter_subject: options.subject, ack_wait: ackWait });
      }
      return await jetstream(nc).consumers.get(stream, durable);
    } catch (error) {
      throw ctx.errors.transient(`${where}: cannot create or update consumer "${durable}" on stream "${stream}": ${messageOf(error)}`, error);
    }
  }

  function toInbound(m: JsMsg): InboundMessage {
    const { payloadText, parsed } = inboundPayload(m.data);
    return {
      eventId: eventIdOf(m.headers, parsed),
      transportId: `nats:seq-${m.seq}`,
      payloadText,
      headers: headersOf(m.headers),
      source: `nats:${m.subject}`,
    };
  }

  return {
    async read() {
      while (!ctx.signal.aborted) {
        const messages: JsMsg[] = [];
        consumer ??= await ensureConsumer();
        try {
          const batch = await consumer.fetch({ max_messages: ctx.batchSize, expires: FETCH_EXPIRES_MS });
          const stop = () => batch.stop();
          ctx.signal.addEventListener("abort", stop, { once: true });
          try {
            for await (const m of batch) messages.push(m);
          } finally {
            ctx.signal.removeEventListener("abort", stop);
          }
        } catch (error) {
          // The client ends a pull whose idle heartbeats are late with an error; the server can
          // send them just after the pull's own expiry. What arrived is valid; anything that
          // arrives later is redelivered after ack_wait. A deleted consumer fails the next pull.
          if (/heartbeats missed/i.test(messageOf(error))) {
            if (messages.length === 0) continue;
          } else {
            for (const m of messages) m.nak();
            // The consumer or its stream may be gone: look it up (and recreate it) on the next read.
            consumer = undefined;
            throw ctx.errors.transient(
              `${where}: fetching from consumer "${durable}" on stream "${stream}" failed: ${messageOf(error)}`,
              error,
            );
          }
        }
        if (ctx.signal.aborted) {
          for (const m of messages) m.nak();
          break;
        }
        if (messages.length === 0) continue;
        return {
          messages: messages.map(toInbound),
          async ack() {
            for (const m of messages) m.ack();
            await flush(nc, ctx, where, "acknowledging");
          },
          async nack() {
            for (const m of messages) m.nak();
            await flush(nc, ctx, where, "negatively acknowledging");
          },
        };
      }
      return null;
    },
    async close() {},
  };
}

/** Upper bound of messages held for read(); past it, core messages are dropped (and counted in a warning). */
const CORE_BUFFER_LIMIT = 10_000;

/** Ids of core messages: a random prefix per process, then a counter. Not stable across restarts. */
const CORE_ID_PREFIX = crypto.randomUUID().slice(0, 8);
let coreCounter = 0;

export function openCoreReader(nc: NatsConnection, subject: string, queue: string | undefined, ctx: PluginContext, where: string): NatsReader {
  const buffer: InboundMessage[] = [];
  const limit = Math.max(CORE_BUFFER_LIMIT, ctx.batchSize * 10);
  let dropped = 0;
  let wake: (() => void) | undefined;
  const subscription: Subscription = nc.subscribe(subject, {
    queue,
    callback: (error, msg: Msg) => {
      if (error) {
        ctx.logger.warn(`${where}: subscription error`, { error: messageOf(error) });
        return;
      }
      if (buffer.length >= limit) {
        if (dropped++ % 1000 === 0) ctx.logger.warn(`${where}: read buffer full, dropping core NATS messages`, { dropped });
        return;
      }
      const { payloadText, parsed } = inboundPayload(msg.data);
      buffer.push({
        eventId: eventIdOf(msg.headers, parsed),
        transportId: `nats:core-${CORE_ID_PREFIX}-${++coreCounter}`,
        payloadText,
        headers: headersOf(msg.headers),
        source: `nats:${msg.subject}`,
      });
      wake?.();
    },
  });

  function waitForMessage(): Promise<void> {
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

  return {
    async read() {
      while (buffer.length === 0) {
        if (ctx.signal.aborted || subscription.isClosed()) return null;
        await waitForMessage();
      }
      if (ctx.signal.aborted) return null;
      // No ack exists in core NATS: the batch is gone from the server already.
      return { messages: buffer.splice(0, ctx.batchSize), async ack() {} };
    },
    close() {
      subscription.unsubscribe();
      wake?.();
      return Promise.resolve();
    },
  };
}

async function flush(nc: NatsConnection, ctx: PluginContext, where: string, what: string): Promise<void> {
  try {
    await flushWithin(nc, FLUSH_TIMEOUT_MS);
  } catch (error) {
    throw ctx.errors.transient(`${where}: ${what} to JetStream failed; the messages will be delivered again: ${messageOf(error)}`, error);
  }
}
