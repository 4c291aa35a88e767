// What the redis sink and source share: the connection keys of their configs (url, credentials,
// TLS), opening an ioredis client from them that fails fast the first time (naming the server and
// the config key the server refused, never a secret) and reconnects by itself after that, and the
// replies of a lost connection turned into plain words.

import type { Redis, RedisOptions } from "ioredis";
import { z } from "zod";
import type { PluginContext } from "../../core/plugin.ts";
import { messageOf } from "../shared.ts";

/** Reconnect delays once connected: 100 ms, 200 ms, ... up to 2 s between attempts. */
const RECONNECT_STEP_MS = 100;
const RECONNECT_MAX_MS = 2_000;

/** `redis://host:6379/0` or `rediss://...`; credentials may be in it or in 'username' and 'password'. */
const urlSchema = z.string().check((ctx) => {
  let url: URL;
  try {
    url = new URL(ctx.value);
  } catch {
    ctx.issues.push({ code: "custom", input: ctx.value, message: `"${redactUrl(ctx.value)}" is not a URL (e.g. "redis://localhost:6379")` });
    return;
  }
  if (url.protocol !== "redis:" && url.protocol !== "rediss:") {
    ctx.issues.push({ code: "custom", input: ctx.value, message: `must start with redis:// or rediss:// (got "${url.protocol}//")` });
  } else if (url.hostname === "") {
    ctx.issues.push({ code: "custom", input: ctx.value, message: "names no host" });
  } else if (!/^\/?(\d+)?$/.test(url.pathname)) {
    ctx.issues.push({ code: "custom", input: ctx.value, message: `its path must be a database number (got "${url.pathname}")` });
  }
});

const tlsSchema = z.strictObject({
  /** PEM text (use `${file:...}` in a manifest to read it from a file). */
  ca: z.string().min(1).optional(),
  cert: z.string().min(1).optional(),
  key: z.string().min(1).optional(),
  reject_unauthorized: z.boolean().default(true),
});

/** Keys that both the sink and the source accept, spread into their strictObject shapes. */
export const connectionShape = {
  url: urlSchema,
  /** An ACL user (Redis 6+); without it, 'password' is the server's requirepass. */
  username: z.string().min(1).optional(),
  password: z.string().optional(),
  tls: tlsSchema.optional(),
  /** How long connecting, and each command, may take. */
  timeout_ms: z.number().int().positive().default(10_000),
};

export interface ConnectionConfig {
  url: string;
  username?: string;
  password?: string;
  tls?: z.output<typeof tlsSchema>;
  timeout_ms: number;
}

/** Credential and TLS keys that exclude each other; call from a schema's superRefine. */
export function checkConnection(config: ConnectionConfig, problem: (path: string, message: string) => void): void {
  let url: URL;
  try {
    url = new URL(config.url);
  } catch {
    return; // reported by the 'url' schema
  }
  if ((config.username || config.password !== undefined) && (url.username || url.password)) {
    problem(config.username ? "username" : "password", "cannot be combined with credentials in 'url'");
  }
  if (config.tls && url.protocol !== "rediss:") problem("tls", "needs a rediss:// 'url'");
}

/**
 * Connects a client. The first connection fails fast with the reason; once connected, a lost
 * connection is reconnected in the background while commands fail at once (no offline queue, no
 * resend), so a caller learns of an outage from its next command instead of waiting for it.
 * `extraTimeoutMs` lengthens the command timeout for blocking commands.
 */
export async function connectRedis(config: ConnectionConfig, ctx: PluginContext, where: string, extraTimeoutMs = 0): Promise<Redis> {
  const url = new URL(config.url);
  let connected = false;
  let lastError: unknown;
  const options: RedisOptions = {
    host: url.hostname.replace(/^\[|\]$/g, ""),
    port: url.port ? Number(url.port) : 6379,
    db: url.pathname.length > 1 ? Number(url.pathname.slice(1)) : 0,
    username: config.username ?? (url.username ? decodeURIComponent(url.username) : undefined),
    password: config.password ?? (url.password ? decodeURIComponent(url.password) : undefined),
    // RESP2: the reply shapes Redis documents, and what every Redis-compatible server speaks.
    protocol: 2,
    lazyConnect: true,
    connectTimeout: config.timeout_ms,
    commandTimeout: config.timeout_ms + extraTimeoutMs,
    enableOfflineQueue: false,
    enableReadyCheck: false,
    maxRetriesPerRequest: 0,
    autoResendUnfulfilledCommands: false,
    retryStrategy: (attempt) => (connected ? Math.min(attempt * RECONNECT_STEP_MS, RECONNECT_MAX_MS) : null),
  };
  if (url.protocol === "rediss:") {
    const t = config.tls;
    options.tls = t ? { ca: t.ca, cert: t.cert, key: t.key, rejectUnauthorized: t.reject_unauthorized } : {};
  }
  const { Redis } = await import("ioredis"); // loaded when a Redis pipeline first connects
  const client = new Redis(options);
  client.on("error", (error) => {
    lastError = error;
    if (connected) {
      // Failed reconnects repeat: kept for the next error a command reports, logged at debug.
      lastErrors.set(client, messageOf(error));
      ctx.logger.debug(`${where}: redis connection error`, { error: messageOf(error) });
    }
  });
  client.on("ready", () => lastErrors.delete(client));
  try {
    await client.connect();
    // Without a ready check, a refused AUTH or SELECT only shows on the first command.
    await client.ping();
  } catch (error) {
    client.disconnect();
    const reason = lastError ?? error;
    throw ctx.errors.transient(`${where}: cannot connect to Redis ${serverOf(config)}: ${connectProblem(reason, config)}`, reason);
  }
  connected = true;
  client.on("close", () => ctx.logger.debug(`${where}: redis connection closed; reconnecting`));
  return client;
}

/** The server as errors name it: scheme, host, port and database, never credentials. */
export function serverOf(config: ConnectionConfig): string {
  const url = new URL(config.url);
  return `${url.protocol}//${url.host}${url.pathname.length > 1 ? url.pathname : ""}`;
}

export function redactUrl(url: string): string {
  return url.replace(/\/\/[^/@]*@/, "//***@");
}

const lastErrors = new WeakMap<Redis, string>();

/**
 * A command's error in plain words: ioredis's for a lost or missing connection say so, with why the
 * client could not reconnect yet when it knows.
 */
export function describeRedisError(error: unknown, server: string, client?: Redis): string {
  const text = messageOf(error);
  if (/max retries per request|Connection is closed|Stream isn't writeable/i.test(text)) {
    const last = client && lastErrors.get(client);
    return `not connected to ${server}, reconnecting${last ? ` (last error: ${redactUrl(last)})` : ""}`;
  }
  if (/Command timed out/i.test(text)) return `no answer from ${server} in time`;
  return text;
}

/** True when the error says the connection, not the command, failed (so the batch is retried whole). */
export function isConnectionError(error: unknown): boolean {
  return /max retries per request|Connection is closed|Stream isn't writeable|Command timed out|ECONNRESET|EPIPE/i.test(messageOf(error));
}

/** Why connecting failed, in words: which credentials the server refused. */
function connectProblem(error: unknown, config: ConnectionConfig): string {
  const text = messageOf(error);
  const inUrl = /\/\/[^/]*@/.test(config.url);
  if (/WRONGPASS|invalid password|invalid username-password/i.test(text)) {
    if (inUrl) return "the server refused the credentials in 'url' (WRONGPASS)";
    if (config.username) return `the server refused 'username' "${config.username}" with its 'password' (WRONGPASS)`;
    return "the server refused the 'password' (WRONGPASS)";
  }
  if (/NOAUTH/i.test(text)) return "the server requires a password: set 'password' (and 'username' for an ACL user)";
  if (/NOPERM/i.test(text)) return `the user may not run the commands tide needs: ${text}`;
  return redactUrl(text);
}
