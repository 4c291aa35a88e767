// Source "redis": reads a Redis stream as a member of a consumer group (XREADGROUP) and acknowledges
// a batch (XACK) only after the inbox commit. Entries left pending are delivered again: this
// consumer's own (after a nack, a failed ack or a restart) at once, from its pending list; those of
// a consumer that crashed, once idle for claim_idle_ms, by XAUTOCLAIM. transportId is
// `redis:<entry id>`, stable across redeliveries.

import type { Redis } from "ioredis";
import { z } from "zod";
import type { InboundMessage, PluginContext, SourceBatch, SourceDefinition } from "../../core/plugin.ts";
import { checkConnection, connectionShape, connectRedis, describeRedisError, serverOf } from "./connection.ts";
import { cloudEventId, inboundPayload, messageOf, toJson } from "../shared.ts";

const configSchema = z
  .strictObject({
    ...connectionShape,
    stream: z.string().min(1),
    /** Consumer group; default `pg-tide-<pipeline>`. `consumer_group` is another name for it. */
    group: z.string().min(1).optional(),
    consumer_group: z.string().min(1).optional(),
    /** This relay's name in the group; default `pg-tide-<pipeline>`. */
    consumer: z.string().min(1).optional(),
    /** Where a group created here starts: every entry in the stream (default) or only new ones. */
    from_beginning: z.boolean().default(true),
    /** Create the group (and the stream) when missing; false: a missing group is a config error. */
    create_group: z.boolean().default(true),
    /** An entry another consumer took and left unacknowledged this long is claimed (XAUTOCLAIM). */
    claim_idle_ms: z.number().int().min(1_000).default(30_000),
    /** The field that holds the body; an entry without it is handed over as an object of all its fields. */
    payload_field: z.string().min(1).default("payload"),
    /** Handled by the engine (inbox event_id template); accepted here so that the key validates. */
    event_id: z.string().optional(),
    /** Handled by the engine (filter); accepted here so that the key validates. */
    transform: z.unknown().optional(),
  })
  .superRefine((config, issues) => {
    const problem = (path: string, message: string) => issues.addIssue({ code: "custom", path: [path], message });
    if (config.group && config.consumer_group && config.group !== config.consumer_group) {
      problem("consumer_group", `must equal 'group' when both are set (got "${config.consumer_group}")`);
    }
    checkConnection(config, problem);
  });

export type RedisSourceConfig = z.output<typeof configSchema>;

export const redisSource: SourceDefinition<RedisSourceConfig> = {
  type: "redis",
  kind: "source",
  summary: "Reads a Redis stream through a consumer group; entries are acknowledged (XACK) after the inbox commit",
  config: configSchema,
  example: { url: "redis://localhost:6379", stream: "payments", group: "pg-tide-payments" },
  create: createRedisSource,
};

/** How long one XREADGROUP waits for new entries before read() looks at its signal again. */
const BLOCK_MS = 1_000;

/** Field names that carry an entry's own id, in order of preference (never a bare "id": that is usually data). */
const EVENT_ID_FIELDS = ["event_id", "tide-dedup-key", "ce_id", "ce-id"];

type Entry = [id: string, fields: string[] | null];

function createRedisSource(config: RedisSourceConfig, ctx: PluginContext) {
  const where = `redis source "${ctx.pipeline}"`;
  const server = serverOf(config);
  const group = config.group ?? config.consumer_group ?? `pg-tide-${ctx.pipeline}`;
  const consumer = config.consumer ?? `pg-tide-${ctx.pipeline}`;
  let client: Redis | undefined;
  let closing: Promise<void> | undefined;
  /** Read this consumer's own pending entries first: after connecting, a nack or a failed ack. */
  let ownPending = true;
  /** XAUTOCLAIM's cursor through the group's pending entries, and when to look again once through. */
  let claimCursor = "0-0";
  let nextClaimAt = 0;

  async function ensureGroup(redis: Redis): Promise<void> {
    try {
      await redis.call("XGROUP", "CREATE", config.stream, group, config.from_beginning ? "0" : "$", "MKSTREAM");
      ctx.logger.info(`${where}: created consumer group "${group}" on stream "${config.stream}"`);
    } catch (error) {
      if (/BUSYGROUP/.test(messageOf(error))) return;
      throw ctx.errors.transient(`${where}: cannot create consumer group "${group}" on "${config.stream}": ${describeRedisError(error, server)}`, error);
    }
  }

  /** The batch's entries; deleted ones (trimmed while pending) are acknowledged and skipped. */
  async function batchOf(redis: Redis, entries: Entry[]): Promise<SourceBatch | undefined> {
    const gone = entries.filter(([, fields]) => fields === null).map(([id]) => id);
    if (gone.length > 0) await redis.call("XACK", config.stream, group, ...gone);
    const live = entries.filter((entry): entry is [string, string[]] => entry[1] !== null);
    if (live.length === 0) return undefined;
    const ids = live.map(([id]) => id);
    return {
      messages: live.map(([id, fields]) => toInbound(id, fields)),
      ack: async () => {
        try {
          await redis.call("XACK", config.stream, group, ...ids);
        } catch (error) {
          ownPending = true;
          throw ctx.errors.transient(`${where}: acknowledging failed; the entries are delivered again: ${describeRedisError(error, server, redis)}`, error);
        }
      },
      nack: async () => {
        ownPending = true; // they stay pending: read again from this consumer's pending list
      },
    };
  }

  function toInbound(id: string, fields: string[]): InboundMessage {
    const byName = new Map<string, string[]>();
    for (let i = 0; i + 1 < fields.length; i += 2) byName.set(fields[i]!, [...(byName.get(fields[i]!) ?? []), fields[i + 1]!]);
    const body = byName.get(config.payload_field);
    const headers: Record<string, unknown> = {};
    for (const [name, values] of byName) if (body === undefined || name !== config.payload_field) headers[name] = values.length === 1 ? values[0]! : values;
    // The redis sink keeps a message's headers as a JSON object in the field "headers".
    const nested = body !== undefined && typeof headers.headers === "string" ? jsonObject(headers.headers) : undefined;
    if (nested) {
      delete headers.headers;
      for (const [name, value] of Object.entries(nested)) headers[name] ??= value;
    }
    const { payloadText, parsed } = body !== undefined
      ? inboundPayload(Buffer.from(body[body.length - 1]!))
      : { payloadText: toJson(headers), parsed: headers };
    const own = EVENT_ID_FIELDS.map((name) => headers[name]).find((v): v is string => typeof v === "string" && v !== "");
    return {
      eventId: own ?? cloudEventId(parsed),
      transportId: `redis:${id}`,
      payloadText,
      headers: body === undefined ? {} : (headers as Record<string, unknown>),
      source: `redis:${config.stream}`,
    };
  }

  /** The next entries: own pending ones, then claimed idle ones, then new ones (waiting up to BLOCK_MS). */
  async function next(redis: Redis): Promise<SourceBatch | undefined> {
    const count = String(ctx.batchSize);
    if (ownPending) {
      const entries = streamEntries(await redis.call("XREADGROUP", "GROUP", group, consumer, "COUNT", count, "STREAMS", config.stream, "0"));
      if (entries.length > 0) return await batchOf(redis, entries);
      ownPending = false;
    }
    if (Date.now() >= nextClaimAt) {
      const reply = (await redis.call("XAUTOCLAIM", config.stream, group, consumer, String(config.claim_idle_ms), claimCursor, "COUNT", count)) as
        [string, Entry[], string[]?];
      claimCursor = reply[0];
      if (claimCursor === "0-0") nextClaimAt = Date.now() + config.claim_idle_ms / 2;
      if (reply[1].length > 0) {
        ctx.logger.info(`${where}: claimed ${reply[1].length} entries another consumer left unacknowledged`, { group });
        return await batchOf(redis, reply[1]);
      }
    }
    const fresh = await redis.call("XREADGROUP", "GROUP", group, consumer, "COUNT", count, "BLOCK", String(BLOCK_MS), "STREAMS", config.stream, ">");
    const entries = streamEntries(fresh);
    return entries.length > 0 ? await batchOf(redis, entries) : undefined;
  }

  return {
    async connect() {
      if (closing) throw ctx.errors.transient(`${where}: closed`);
      if (client) return;
      const connection = await connectRedis(config, ctx, where, BLOCK_MS);
      try {
        if (config.create_group) await ensureGroup(connection);
      } catch (error) {
        connection.disconnect();
        throw error;
      }
      client = connection;
      ownPending = true;
    },

    async read(): Promise<SourceBatch | null> {
      if (!client) throw ctx.errors.transient(`${where}: not connected`);
      const redis = client;
      while (!ctx.signal.aborted && !closing) {
        try {
          const batch = await next(redis);
          if (batch) return ctx.signal.aborted ? null : batch;
        } catch (error) {
          if (ctx.signal.aborted || closing) break;
          ownPending = true;
          if (/NOGROUP/.test(messageOf(error))) {
            if (!config.create_group) {
              throw ctx.errors.config(`${where}: no consumer group "${group}" on stream "${config.stream}" (create it, or set 'create_group': true)`);
            }
            await ensureGroup(redis);
            continue;
          }
          throw ctx.errors.transient(`${where}: reading "${config.stream}" from ${server} failed: ${describeRedisError(error, server, redis)}`, error);
        }
      }
      return null;
    },

    async close() {
      closing ??= (async () => {
        const current = client;
        client = undefined;
        // A blocked XREADGROUP would hold a QUIT back for up to BLOCK_MS: cut the connection.
        current?.disconnect();
      })();
      await closing;
    },

    health() {
      if (!client) return Promise.resolve({ ok: false, detail: "not connected" });
      return Promise.resolve(client.status === "ready" ? { ok: true } : { ok: false, detail: `connection ${client.status}` });
    },
  };
}

/** The object a JSON text holds, or undefined when it holds anything else. */
function jsonObject(text: string): Record<string, unknown> | undefined {
  try {
    const value = JSON.parse(text);
    return value !== null && typeof value === "object" && !Array.isArray(value) ? value : undefined;
  } catch {
    return undefined;
  }
}

/** The entries of a one-stream XREADGROUP reply (null when nothing came). */
function streamEntries(reply: unknown): Entry[] {
  if (!Array.isArray(reply) || reply.length === 0) return [];
  const [, entries] = reply[0] as [string, Entry[]];
  return entries ?? [];
}
