// Source "mqtt": subscribes at QoS 1 in a persistent session (a fixed client id, clean session off,
// MQTT 5 session expiry), so the broker keeps messages while the relay is away. A message's PUBACK
// is sent only after the inbox commit; MQTT acknowledges in arrival order and mqtt.js hands over
// the next message only once the previous one is acknowledged, so each batch is one message. After
// a nack (or a lost connection) the client reconnects without acknowledging, and the broker sends
// the unacknowledged message again.

import type { IClientSubscribeOptions, IPublishPacket, MqttClient } from "mqtt";
import { z } from "zod";
import type { InboundMessage, PluginContext, SourceBatch, SourceDefinition } from "../../core/plugin.ts";
import {
  checkConnection, clientIdOf, connectionShape, connectMqtt, endAfterWrites, endGracefully, endNow, isTopicFilter, lastErrorOf, serverOf,
} from "./connection.ts";
import { cloudEventId, inboundPayload, messageOf, keyOrInstead } from "../shared.ts";

const topicFilter = z.string().refine(isTopicFilter, "must be an MQTT topic filter (\"+\" fills a whole level, \"#\" only the whole last one)");

const configSchema = z
  .strictObject({
    ...connectionShape,
    topic: topicFilter.optional(),
    topics: z.array(topicFilter).min(1).optional(),
    /** MQTT 5: how long the broker keeps the session (and queues messages) while the relay is away. Default: never expires. */
    session_expiry_s: z.number().int().min(0).max(0xffff_ffff).default(0xffff_ffff),
    /** Handled by the engine (inbox event_id template); accepted here so that the key validates. */
    event_id: z.string().optional(),
    /** Handled by the engine (filter); accepted here so that the key validates. */
    transform: z.unknown().optional(),
  })
  .apply(keyOrInstead, "topic", "topics")
  .superRefine((config, issues) => {
    const problem = (path: string, message: string) => issues.addIssue({ code: "custom", path: [path], message });
    checkConnection(config, problem);
  })
  .transform(({ topic, topics, ...config }) => ({ ...config, topics: topics ?? [topic!] }));

export type MqttSourceConfig = z.output<typeof configSchema>;

export const mqttSource: SourceDefinition<MqttSourceConfig> = {
  type: "mqtt",
  kind: "source",
  summary: "Subscribes to MQTT topics at QoS 1 in a persistent session; each message is acknowledged after the inbox commit",
  config: configSchema,
  example: { url: "mqtt://localhost:1883", topic: "payments/+/confirmed" },
  create: createMqttSource,
};

/** User properties that carry a message's own id (MQTT 5), in order of preference. */
const EVENT_ID_PROPERTIES = ["event_id", "tide-dedup-key", "ce_id", "ce-id"];

/** Ids of messages without one of their own: MQTT's packet ids are reused, so this process numbers them. */
const ID_PREFIX = crypto.randomUUID().slice(0, 8);
let counter = 0;

/** A message mqtt.js handed over, waiting for its acknowledgement. */
interface Held {
  packet: IPublishPacket;
  acknowledge(): void;
}

function createMqttSource(config: MqttSourceConfig, ctx: PluginContext) {
  const where = `mqtt source "${ctx.pipeline}"`;
  const server = serverOf(config);
  const clientId = config.client_id ?? clientIdOf("pg-tide-", ctx.pipeline);
  let client: MqttClient | undefined;
  let held: Held | undefined;
  let wake: (() => void) | undefined;
  let closing: Promise<void> | undefined;

  async function open(): Promise<MqttClient> {
    const { client: connection, sessionPresent } = await connectMqtt(config, {
      clientId,
      clean: false,
      sessionExpiryS: config.session_expiry_s,
      // The PUBACK goes out when `acknowledge` is called, after the inbox commit.
      handleMessage: (packet, acknowledge) => {
        held = { packet: packet as IPublishPacket, acknowledge: () => acknowledge() };
        wake?.();
      },
    }, ctx, where);
    connection.on("close", () => wake?.());
    // A persistent session that the broker kept has the subscriptions already, and may deliver
    // queued messages before any SUBACK; mqtt.js hands over nothing behind a message waiting for its
    // acknowledgement, so that SUBACK is not awaited. MQTT 5 subscribes again for filters added to
    // the config (retain handling 1: retained messages only for a new subscription); 3.1.1 cannot
    // without the retained messages coming again, so it keeps the session's subscriptions.
    const v5 = config.protocol_version === "5";
    const subscribed = sessionPresent
      ? v5 ? subscribe(connection, { qos: 1, rh: 1 }).catch(() => {}) : undefined
      : subscribe(connection, { qos: 1, ...(v5 ? { rh: 1 as const } : {}) });
    if (!sessionPresent) {
      try {
        await subscribed;
      } catch (error) {
        await endNow(connection);
        throw error;
      }
    }
    return connection;
  }

  /** Subscribes to every configured filter; a filter the broker refuses is a config error. */
  async function subscribe(connection: MqttClient, options: IClientSubscribeOptions): Promise<void> {
    let granted;
    try {
      granted = await connection.subscribeAsync(config.topics, options);
    } catch (error) {
      throw ctx.errors.transient(`${where}: cannot subscribe on MQTT ${server}: ${messageOf(error)}`, error);
    }
    // A SUBACK grants a QoS, or refuses a filter with a code of 0x80 or more.
    const refused = granted.filter((g) => g.qos >= 0x80);
    if (refused.length > 0) {
      const filters = refused.map((g) => `"${g.topic}"`).join(", ");
      const error = ctx.errors.config(`${where}: the broker refused the subscription to ${filters} (not authorized, or a filter it does not support)`);
      ctx.logger.error(error.message);
      throw error;
    }
  }

  /** Drops the connection without acknowledging: the broker sends what was unacknowledged again. */
  async function reconnect(): Promise<void> {
    const current = client;
    client = undefined;
    held = undefined;
    if (current) await endNow(current);
  }

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

  function toInbound(packet: IPublishPacket): InboundMessage {
    const headers: Record<string, unknown> = { ...(packet.properties?.userProperties ?? {}) };
    const { payloadText, parsed } = inboundPayload(typeof packet.payload === "string" ? Buffer.from(packet.payload) : packet.payload);
    const own = EVENT_ID_PROPERTIES.map((name) => headers[name]).find((v): v is string => typeof v === "string" && v !== "");
    return {
      eventId: own ?? cloudEventId(parsed),
      transportId: `mqtt:${ID_PREFIX}-${++counter}`,
      payloadText,
      headers,
      source: `mqtt:${packet.topic}`,
    };
  }

  return {
    async connect() {
      if (closing) throw ctx.errors.transient(`${where}: closed`);
      client ??= await open();
    },

    async read(): Promise<SourceBatch | null> {
      if (ctx.signal.aborted || closing) return null;
      client ??= await open();
      const current = client;
      while (!held) {
        if (ctx.signal.aborted || closing) return null;
        if (!current.connected) {
          // mqtt.js reconnects by itself; a client that gave up is replaced on the next read.
          if (current.disconnecting || !current.reconnecting) await reconnect();
          throw ctx.errors.transient(`${where}: disconnected from MQTT ${server}, reconnecting${lastErrorOf(current)}; the broker keeps the session's messages`);
        }
        await waitForMessage();
      }
      if (ctx.signal.aborted) return null;
      const message = held;
      return {
        messages: [toInbound(message.packet)],
        ack: async () => {
          if (held !== message || client !== current || !current.connected) {
            throw ctx.errors.transient(`${where}: the connection was lost before the acknowledgement; the broker sends the message again`);
          }
          held = undefined;
          message.acknowledge();
        },
        nack: () => reconnect(),
      };
    },

    async close() {
      closing ??= (async () => {
        wake?.();
        const current = client;
        const waiting = held !== undefined;
        client = undefined;
        held = undefined;
        // The last acknowledgement must reach the broker before the connection ends.
        if (current) await (waiting ? endAfterWrites(current) : endGracefully(current));
      })();
      await closing;
    },

    health() {
      if (!client) return Promise.resolve({ ok: false, detail: "not connected" });
      return Promise.resolve(client.connected ? { ok: true } : { ok: false, detail: "reconnecting" });
    },
  };
}
