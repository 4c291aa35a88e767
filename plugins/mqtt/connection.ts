// What the mqtt sink and source share: the connection keys of their configs (url, credentials,
// client id, protocol version, TLS), opening an mqtt.js client from them that fails fast the first
// time (naming the server and the config key the server refused, never a secret) and reconnects by
// itself after that, and the rules for topic names and topic filters.

import type { IClientOptions, IConnackPacket, MqttClient } from "mqtt";
import { z } from "zod";
import type { PluginContext } from "../../core/plugin.ts";
import { messageOf } from "../shared.ts";

/** Keep-alive: a connection cut without a FIN is noticed within one and a half of these. */
const KEEPALIVE_S = 30;
/** Delay between reconnect attempts once connected. */
const RECONNECT_MS = 1_000;

/** Topic names and filters are UTF-8 strings of at most 65535 bytes. */
const TOPIC_MAX_BYTES = 65_535;

const urlSchema = z.string().check((ctx) => {
  let url: URL;
  try {
    url = new URL(ctx.value);
  } catch {
    ctx.issues.push({ code: "custom", input: ctx.value, message: `"${redactUrl(ctx.value)}" is not a URL (e.g. "mqtt://localhost:1883")` });
    return;
  }
  if (!["mqtt:", "mqtts:", "ws:", "wss:"].includes(url.protocol)) {
    ctx.issues.push({ code: "custom", input: ctx.value, message: `must start with mqtt://, mqtts://, ws:// or wss:// (got "${url.protocol}//")` });
  } else if (url.hostname === "") {
    ctx.issues.push({ code: "custom", input: ctx.value, message: "names no host" });
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
  username: z.string().min(1).optional(),
  password: z.string().optional(),
  /** The MQTT client id; at most 23 characters of [0-9a-zA-Z] is what every broker must accept. */
  client_id: z.string().min(1).max(65_535).optional(),
  /** "5" (default): user properties carry the headers, PUBACK reason codes say why a publish failed. "3.1.1" for older brokers. */
  protocol_version: z.enum(["3.1.1", "5"]).default("5"),
  tls: tlsSchema.optional(),
  /** How long connecting, and each wait for the broker's acknowledgement, may take. */
  timeout_ms: z.number().int().positive().default(10_000),
};

export interface ConnectionConfig {
  url: string;
  username?: string;
  password?: string;
  client_id?: string;
  protocol_version: "3.1.1" | "5";
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
  if (config.password !== undefined && !config.username && !url.username) problem("password", "needs 'username'");
  if (config.tls && url.protocol !== "mqtts:" && url.protocol !== "wss:") problem("tls", "needs an mqtts:// or wss:// 'url'");
}

export interface SessionOptions {
  clientId: string;
  /** false: a persistent session; the broker keeps subscriptions and unacknowledged messages. */
  clean: boolean;
  /** MQTT 5: how long the broker keeps the session after a disconnect. */
  sessionExpiryS?: number;
  /** Set before the first packet arrives: a persistent session's queued messages come right after CONNACK. */
  handleMessage?: MqttClient["handleMessage"];
}

/**
 * Connects a client. The first connection fails fast with the reason; once connected, a lost
 * connection is reconnected every RECONNECT_MS in the background.
 */
export async function connectMqtt(
  config: ConnectionConfig,
  session: SessionOptions,
  ctx: PluginContext,
  where: string,
): Promise<{ client: MqttClient; sessionPresent: boolean }> {
  const url = new URL(config.url);
  const v5 = config.protocol_version === "5";
  const options: IClientOptions = {
    clientId: session.clientId,
    clean: session.clean,
    protocolVersion: v5 ? 5 : 4,
    username: config.username ?? (url.username ? decodeURIComponent(url.username) : undefined),
    password: config.password ?? (url.password ? decodeURIComponent(url.password) : undefined),
    keepalive: KEEPALIVE_S,
    connectTimeout: config.timeout_ms,
    reconnectPeriod: RECONNECT_MS,
    resubscribe: true,
    manualConnect: true,
  };
  if (v5 && session.sessionExpiryS !== undefined) options.properties = { sessionExpiryInterval: session.sessionExpiryS };
  if (config.tls) Object.assign(options, { ca: config.tls.ca, cert: config.tls.cert, key: config.tls.key, rejectUnauthorized: config.tls.reject_unauthorized });
  url.username = "";
  url.password = "";
  const { connect } = await import("mqtt"); // loaded when an MQTT pipeline first connects
  const client = connect(url.toString(), options);
  if (session.handleMessage) client.handleMessage = session.handleMessage;
  let sessionPresent = false;
  try {
    await new Promise<void>((resolve, reject) => {
      const fail = (error?: Error) => {
        client.off("connect", succeed);
        reject(error ?? new Error("the connection closed before the broker answered"));
      };
      const succeed = (connack: IConnackPacket) => {
        sessionPresent = connack.sessionPresent;
        client.off("error", fail);
        client.off("close", fail);
        resolve();
      };
      client.once("connect", succeed);
      client.once("error", fail);
      client.once("close", fail);
      client.connect();
    });
  } catch (error) {
    client.end(true);
    throw ctx.errors.transient(`${where}: cannot connect to MQTT ${serverOf(config)}: ${connectProblem(error, config, session.clientId)}`, error);
  }
  // Failed reconnects repeat every second: kept for the next error a batch reports, logged at debug.
  client.on("error", (error) => {
    lastErrors.set(client, messageOf(error));
    ctx.logger.debug(`${where}: MQTT error`, { error: messageOf(error) });
  });
  client.on("connect", () => lastErrors.delete(client));
  client.on("offline", () => ctx.logger.warn(`${where}: disconnected from MQTT ${serverOf(config)}, reconnecting`));
  client.on("reconnect", () => ctx.logger.debug(`${where}: reconnecting to MQTT ${serverOf(config)}`));
  return { client, sessionPresent };
}

const lastErrors = new WeakMap<MqttClient, string>();

/** Why a disconnected client is not connected yet, as far as it knows: " (last error: ...)" or "". */
export function lastErrorOf(client: MqttClient): string {
  const error = lastErrors.get(client);
  return error ? ` (last error: ${redactUrl(error)})` : "";
}

/** Ends a client at once, dropping whatever it has not written yet. */
export function endNow(client: MqttClient): Promise<void> {
  return new Promise((resolve) => client.end(true, {}, () => resolve()));
}

/**
 * Ends a client once what it has written so far (an acknowledgement) has left the process, or at
 * once when the socket does not drain within WRITE_DRAIN_MS: close() must not hang on a dead broker.
 * No DISCONNECT handshake: mqtt.js waits for nothing while a message waits for its acknowledgement.
 */
export async function endAfterWrites(client: MqttClient): Promise<void> {
  const stream = client.stream as unknown as { write(chunk: Uint8Array, callback: () => void): boolean } | undefined;
  if (client.connected && stream) {
    // A write's callback runs once it and every write before it have been handed to the socket.
    let timer: ReturnType<typeof setTimeout> | undefined;
    await new Promise<void>((resolve) => {
      timer = setTimeout(resolve, WRITE_DRAIN_MS);
      try {
        stream.write(new Uint8Array(0), () => resolve());
      } catch {
        resolve();
      }
    });
    clearTimeout(timer);
  }
  await endNow(client);
}

/**
 * Ends a client with a DISCONNECT, which the broker reads after every acknowledgement sent before
 * it; at once when that does not finish within WRITE_DRAIN_MS. Not while a message waits for its
 * acknowledgement: mqtt.js does not finish ending then (use endAfterWrites).
 */
export async function endGracefully(client: MqttClient): Promise<void> {
  if (!client.connected) return await endNow(client);
  let timer: ReturnType<typeof setTimeout> | undefined;
  const ended = new Promise<"ended">((resolve) => client.end(false, {}, () => resolve("ended")));
  const late = new Promise<"late">((resolve) => (timer = setTimeout(() => resolve("late"), WRITE_DRAIN_MS)));
  try {
    if ((await Promise.race([ended, late])) === "late") await endNow(client);
  } finally {
    clearTimeout(timer);
  }
}

const WRITE_DRAIN_MS = 2_000;

/** The server as errors name it: scheme, host and port, never credentials. */
export function serverOf(config: ConnectionConfig): string {
  const url = new URL(config.url);
  return `${url.protocol}//${url.host}${url.pathname.length > 1 ? url.pathname : ""}`;
}

export function redactUrl(url: string): string {
  return url.replace(/\/\/[^/@]*@/, "//***@");
}

/** A valid topic name to publish to: not empty, no wildcards, no NUL, at most 65535 bytes. */
export function topicNameProblem(topic: string): string | undefined {
  if (topic === "") return "it is empty";
  if (/[+#]/.test(topic)) return "\"+\" and \"#\" are wildcards, which a published topic may not contain";
  if (topic.includes("\u0000")) return "it contains a NUL character";
  if (Buffer.byteLength(topic) > TOPIC_MAX_BYTES) return `it is longer than ${TOPIC_MAX_BYTES} bytes`;
  return undefined;
}

/** A valid topic filter to subscribe to: "+" fills a whole level, "#" only the whole last one. */
export function isTopicFilter(filter: string): boolean {
  if (filter === "" || filter.includes("\u0000") || Buffer.byteLength(filter) > TOPIC_MAX_BYTES) return false;
  const levels = filter.split("/");
  return levels.every((level, i) => (level.includes("+") ? level === "+" : level.includes("#") ? level === "#" && i === levels.length - 1 : true));
}

/** A client id made of a pipeline name: characters brokers may refuse become "-". */
export function clientIdOf(prefix: string, pipeline: string): string {
  return `${prefix}${pipeline}`.replace(/[^0-9A-Za-z_-]/g, "-");
}

/** Why connecting failed, in words: which credentials the server refused. */
function connectProblem(error: unknown, config: ConnectionConfig, clientId: string): string {
  const code = (error as { code?: unknown })?.code;
  const text = messageOf(error);
  const refusedLogin = code === 4 || code === 134 || code === 5 || code === 135 || /not authorized|bad user ?name or password/i.test(text);
  if (refusedLogin) {
    if (config.username) return `the server refused 'username' "${config.username}" with its 'password' (${text})`;
    if (new URL(config.url).username) return `the server refused the credentials in 'url' (${text})`;
    return `the server requires credentials: set 'username' and 'password' (${text})`;
  }
  if (code === 2 || code === 133) return `the server refused the client id "${clientId}" (${text}); set another 'client_id'`;
  return redactUrl(text);
}
