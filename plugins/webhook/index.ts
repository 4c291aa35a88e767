// Sink "webhook": delivers messages as HTTP requests, one per message (in order) or one per batch.
// 2xx acknowledges; 408, 429, 5xx, network errors and timeouts are worth a retry; any other
// answer is permanent and sends the message to the DLQ.

import { lookup } from "node:dns/promises";
import { isIP } from "node:net";
import ipaddr from "ipaddr.js";
import { z } from "zod";
import type { DeliveryFailure, OutboxMessage, PluginContext, SinkDefinition } from "../../core/plugin.ts";
import { createSigner, secretBytes } from "./sign.ts";
import { PROBE_MESSAGE, cloudEventHeaderValue, payloadBody, traceContextOf, withPayload, messageOf, keyOrInstead } from "../shared.ts";

const HEADER_NAME = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;
const HEADER_VALUE = /^[\t\x20-\x7e\x80-\xff]*$/;

const configSchema = z
  .strictObject({
    url: z.url({ protocol: /^https?$/, error: "must be an http(s) URL" }).optional(),
    /** Per-message URL, e.g. `https://hooks.example.com/{event_type}`; single mode only. */
    url_template: z.string().min(1).optional(),
    method: z.enum(["POST", "PUT"]).default("POST"),
    headers: z
      .record(
        z.string().regex(HEADER_NAME, "must be a valid HTTP header name"),
        z.string().regex(HEADER_VALUE, "must be Latin-1 text without line breaks"),
      )
      .default({}),
    timeout_ms: z.number().int().positive().default(10_000),
    mode: z.enum(["single", "batch"]).default("single"),
    signing: z
      .strictObject({
        scheme: z.enum(["hmac-sha256", "standard-webhooks"]),
        secret: z.string().min(1),
        header: z.string().regex(HEADER_NAME, "must be a valid HTTP header name").optional(),
        /** hmac-sha256 only: send the unix time in this header and sign "<timestamp>.<body>". */
        timestamp_header: z.string().regex(HEADER_NAME, "must be a valid HTTP header name").optional(),
      })
      .optional(),
    /** Retry every non-2xx answer until 2xx, 4xx included (they go to the DLQ otherwise). */
    retry_client_errors: z.boolean().default(false),
    /** Refuse targets that are, or resolve to, loopback/private/link-local addresses. */
    ssrf_guard: z.boolean().default(false),
  })
  .apply(keyOrInstead, "url", "url_template")
  .superRefine((config, issues) => {
    const problem = (path: string[], message: string) => issues.addIssue({ code: "custom", path, message });
    if (config.url_template && config.mode === "batch") {
      problem(["url_template"], "needs mode \"single\": a batch goes to one URL");
    }
    for (const key of ["header", "timestamp_header"] as const) {
      if (config.signing?.[key] && config.signing.scheme !== "hmac-sha256") {
        problem(["signing", key], "applies to scheme \"hmac-sha256\" only");
      }
    }
    if (config.signing) {
      try {
        secretBytes(config.signing.scheme, config.signing.secret);
      } catch (error) {
        problem(["signing", "secret"], (error as Error).message);
      }
    }
  });

export type WebhookConfig = z.output<typeof configSchema>;

const webhookSink: SinkDefinition<WebhookConfig> = {
  type: "webhook",
  kind: "sink",
  summary: "POSTs each message (or each batch) to an HTTP endpoint, optionally signed",
  config: configSchema,
  example: {
    url: "https://hooks.example.com/orders",
    mode: "single",
    timeout_ms: 10000,
    signing: { scheme: "standard-webhooks", secret: "whsec_c2VjcmV0LWZvci10aGUtZXhhbXBsZQ==" },
  },
  create: createWebhookSink,
};

export default webhookSink;

interface Failure {
  error: Error;
  retriable: boolean;
  /** The target answered and refused this message (a 4xx retried by retry_client_errors). */
  refused?: boolean;
}

function createWebhookSink(config: WebhookConfig, ctx: PluginContext) {
  const where = `webhook sink "${ctx.pipeline}"`;
  const sign = config.signing ? createSigner(config.signing) : undefined;
  // close() aborts requests in flight; ctx.signal does the same when the pipeline stops.
  const closing = new AbortController();
  // Checked now, as a config error, rather than on the first message: an unknown placeholder, and
  // a placeholder that could choose the host.
  const templateOrigin = config.url_template ? fixedOrigin(config.url_template, ctx, where) : undefined;

  const transient = (message: string, cause?: unknown): Failure => ({
    error: ctx.errors.transient(`${where}: ${message}`, cause),
    retriable: true,
  });
  const permanent = (message: string, cause?: unknown): Failure => ({
    error: ctx.errors.permanent(`${where}: ${message}`, cause),
    retriable: false,
  });

  async function send(rawUrl: string, body: string, headers: Headers, messageId: string): Promise<Failure | undefined> {
    let url: URL;
    try {
      url = new URL(rawUrl);
      if (url.protocol !== "http:" && url.protocol !== "https:") throw new Error(`unsupported scheme ${url.protocol}`);
      if (sign) for (const [name, value] of Object.entries(await sign(body, messageId, unixSeconds()))) headers.set(name, value);
    } catch (error) {
      // The URL may carry credentials, and this message ends up in logs and the DLQ.
      const shown = rawUrl.replace(/\/\/[^/?#]*@/, "//***@");
      return permanent(`cannot build the request for ${shown}: ${messageOf(error)}`, error);
    }
    moveCredentialsToHeader(url, headers);
    const target = `${config.method} ${url.origin}${url.pathname}`;
    if (config.ssrf_guard) {
      const refusal = await guardTarget(url.hostname, target);
      if (refusal) return refusal;
    }
    const timeout = AbortSignal.timeout(config.timeout_ms);
    let response: Response;
    try {
      response = await fetch(url, {
        method: config.method,
        headers,
        body,
        // A followed 301/302 would turn the POST into a GET and drop the body; say so instead.
        redirect: "manual",
        signal: AbortSignal.any([ctx.signal, closing.signal, timeout]),
      });
    } catch (error) {
      if (timeout.aborted) return transient(`${target}: no response within ${config.timeout_ms} ms`, error);
      if (ctx.signal.aborted || closing.signal.aborted) return transient(`${target}: aborted, sink stopping`, error);
      return transient(`${target} failed: ${messageOf(error)}`, error);
    }
    const status = response.status;
    if (status >= 200 && status < 300) {
      await response.body?.cancel().catch(() => {});
      return undefined;
    }
    const answer = `${target} answered ${status}${await bodySnippet(response)}`;
    // 408, 429 and 5xx say the target is unwell, not that the message is wrong: an outage.
    if (status === 408 || status === 429 || status >= 500) return transient(answer);
    if (config.retry_client_errors) return { ...transient(answer), refused: true };
    return permanent(status >= 300 && status < 400 ? `${answer} (redirects are not followed)` : answer);
  }

  async function guardTarget(hostname: string, target: string): Promise<Failure | undefined> {
    const host = hostname.replace(/^\[(.*)\]$/, "$1");
    let addresses: string[];
    try {
      addresses = isIP(host) ? [host] : (await lookup(host, { all: true })).map((entry) => entry.address);
    } catch (error) {
      return transient(`${target}: cannot resolve ${host}: ${messageOf(error)}`, error);
    }
    // The request resolves the name again; a hostile DNS server could answer differently then.
    // This guard stops configuration mistakes and naive SSRF, not DNS rebinding.
    const blocked = addresses.find(isPrivateAddress);
    if (blocked === undefined) return undefined;
    return permanent(`${target}: refused by ssrf_guard, ${host} is a private or loopback address (${blocked})`);
  }

  async function publishSingle(batch: OutboxMessage[]): Promise<DeliveryFailure[]> {
    const failures: DeliveryFailure[] = [];
    for (const [index, message] of batch.entries()) {
      const failure = await sendOne(message);
      if (!failure) continue;
      failures.push({ id: message.id, ...failure });
      if (!failure.retriable) continue;
      // Stop here: sending later messages would deliver them before this one on retry.
      for (const later of batch.slice(index + 1)) {
        const error = ctx.errors.transient(
          `${where}: not sent because message ${message.id} before it failed: ${failure.error.message}`,
          failure.error,
        );
        failures.push({ id: later.id, error, retriable: true, heldBack: true });
      }
      break;
    }
    return failures;
  }

  async function sendOne(message: OutboxMessage): Promise<Failure | undefined> {
    let url: string;
    try {
      url = config.url ?? renderUrl(config.url_template!, templateOrigin, message, ctx);
    } catch (error) {
      return permanent(`url_template "${config.url_template}" failed for message ${message.id}: ${messageOf(error)}`, error);
    }
    const headers = baseHeaders(message.dedupKey, message.outbox);
    headers.set("X-Tide-Event-Type", headerSafe(message.eventType));
    headers.set("X-Tide-Message-Id", message.id.toString());
    // CloudEvents HTTP binding: structured mode is told by the content type alone; binary mode puts
    // every attribute in a ce- header and datacontenttype in Content-Type.
    if (message.contentType) headers.set("Content-Type", message.contentType);
    for (const [name, value] of Object.entries(message.cloudEventAttributes ?? {})) headers.set(`ce-${name}`, cloudEventHeaderValue(value));
    for (const [name, value] of Object.entries(traceContextOf(message.headers))) headers.set(name, value);
    return send(url, payloadBody(message), withStaticHeaders(headers), message.dedupKey);
  }

  async function publishBatch(batch: OutboxMessage[]): Promise<DeliveryFailure[]> {
    const first = batch[0]!;
    const last = batch[batch.length - 1]!;
    const idempotencyKey = `${first.dedupKey}..${last.id}`;
    if (first.cloudEventAttributes) {
      // One request cannot carry each event's attributes in its headers.
      const refusal = permanent(
        "wire_format \"cloudevents-binary\" sends one event per request: use mode \"single\", or wire_format " +
          "\"cloudevents\", whose events a batch carries as a CloudEvents batch",
      );
      return batch.map((m) => ({ id: m.id, ...refusal }));
    }
    // Structured CloudEvents go as the binding's batch: a JSON array of the events themselves.
    const cloudEvents = first.contentType === CLOUDEVENTS_JSON;
    const body = cloudEvents
      ? `[${batch.map(payloadBody).join(",")}]`
      : `[${batch
        .map((m) => withPayload({ id: m.id.toString(), dedup_key: m.dedupKey, topic: m.topic, event_type: m.eventType, headers: m.headers }, m))
        .join(",")}]`;
    const base = baseHeaders(idempotencyKey, first.outbox);
    if (cloudEvents) base.set("Content-Type", CLOUDEVENTS_BATCH_JSON);
    const headers = withStaticHeaders(base);
    const failure = await send(config.url!, body, headers, idempotencyKey);
    if (!failure) return [];
    // A rejection means "retry the whole batch"; a refusal that retrying cannot fix is reported
    // for every message instead, so that the batch reaches the DLQ rather than blocking the pipeline.
    if (failure.retriable && !failure.refused) throw failure.error;
    return batch.map((m) => ({ id: m.id, ...failure }));
  }

  function withStaticHeaders(headers: Headers): Headers {
    // Configured headers win over tide's defaults (e.g. a different Content-Type).
    for (const [name, value] of Object.entries(config.headers)) headers.set(name, value);
    return headers;
  }

  return {
    async connect() {},
    async publish(batch: OutboxMessage[]): Promise<DeliveryFailure[]> {
      if (batch.length === 0) return [];
      return config.mode === "batch" ? publishBatch(batch) : publishSingle(batch);
    },
    async close() {
      closing.abort();
    },
  };
}

const VALUE_MARK = "\u0000";
const CLOUDEVENTS_JSON = "application/cloudevents+json; charset=utf-8";
const CLOUDEVENTS_BATCH_JSON = "application/cloudevents-batch+json; charset=utf-8";

/**
 * The origin (scheme, host, port) that a url_template fixes before its first placeholder, or
 * undefined for a template without placeholders. A placeholder inside the origin is a config error:
 * a message's values would choose the host the request goes to.
 */
function fixedOrigin(template: string, ctx: PluginContext, where: string): string | undefined {
  const probe = ctx.render(template, PROBE_MESSAGE, { value: () => VALUE_MARK });
  if (!probe.includes(VALUE_MARK)) return undefined;
  const prefix = /^https?:\/\/[^/?#]+(?=[/?#])/i.exec(probe.slice(0, probe.indexOf(VALUE_MARK)))?.[0];
  let origin: string | undefined;
  try {
    if (prefix) origin = new URL(prefix).origin;
  } catch {
    // reported below
  }
  if (origin === undefined || origin === "null") {
    throw ctx.errors.config(
      `${where}: 'url_template' "${template}": a placeholder may not choose the scheme, host or port; ` +
        `start the template with a fixed "https://host/" and put placeholders in the path or query`,
    );
  }
  return origin;
}

/**
 * Renders a url_template with every value percent-encoded, so that a value fills one path segment
 * or one query value and cannot add "/", "?", "#" or "@". Throws when a value would still move the
 * request elsewhere: a "." or ".." segment, or another origin.
 */
function renderUrl(template: string, origin: string | undefined, message: OutboxMessage, ctx: PluginContext): string {
  const url = ctx.render(template, message, {
    value(value, placeholder) {
      if (value === "." || value === "..") {
        throw new Error(`{${placeholder}} is "${value}", which would move up the URL path; values may not be "." or ".."`);
      }
      return encodeURIComponent(value);
    },
  });
  const path = url.replace(/^https?:\/\/[^/?#]*/i, "").split(/[?#]/, 1)[0]!;
  if (path.split("/").some((segment) => /^(\.|%2e){1,2}$/i.test(segment))) {
    throw new Error(`the rendered path "${path}" has a "." or ".." segment, which would move up the URL path`);
  }
  if (origin !== undefined && new URL(url).origin !== origin) {
    throw new Error(`the rendered URL's origin is not ${origin}`);
  }
  return url;
}

function baseHeaders(idempotencyKey: string, outbox: string): Headers {
  return new Headers({
    "Content-Type": "application/json",
    "Idempotency-Key": headerSafe(idempotencyKey),
    "X-Tide-Outbox": headerSafe(outbox),
  });
}

// `https://user:pass@host` would make fetch throw on some runtimes: send it as Basic auth instead.
function moveCredentialsToHeader(url: URL, headers: Headers): void {
  if (!url.username && !url.password) return;
  const credentials = `${decodeURIComponent(url.username)}:${decodeURIComponent(url.password)}`;
  const bytes = new TextEncoder().encode(credentials);
  if (!headers.has("Authorization")) headers.set("Authorization", `Basic ${btoa(String.fromCharCode(...bytes))}`);
  url.username = "";
  url.password = "";
}

// What ssrf_guard refuses, by ipaddr.js's classification of the address.
const REFUSED_IPV4 = new Set(["unspecified", "broadcast", "multicast", "linkLocal", "loopback", "carrierGradeNat", "private", "reserved"]);
const REFUSED_IPV6 = new Set(["unspecified", "linkLocal", "multicast", "loopback", "uniqueLocal", "deprecatedSiteLocal", "discard"]);
// IPv6 addresses that carry an IPv4 one in their last 32 bits: IPv4-mapped, IPv4-translated
// (rfc6145), the NAT64 well-known prefix (rfc6052) and the deprecated IPv4-compatible ::/96.
const CARRIES_IPV4 = new Set(["ipv4Mapped", "rfc6145", "rfc6052"]);
const IPV4_COMPATIBLE = ipaddr.parseCIDR("::/96");
const NAT64_WELL_KNOWN = ipaddr.parseCIDR("64:ff9b::/96");

/**
 * Loopback, private, link-local, CGNAT, unspecified, multicast and reserved ranges, IPv4 and IPv6,
 * and an IPv6 address that leads to one of them through the IPv4 address it carries. Anything
 * that is not an address (node:net's isIP says so) is refused rather than guessed at.
 */
export function isPrivateAddress(address: string): boolean {
  const ip = address.replace(/%.*$/, "");
  if (isIP(ip) === 0) return true;
  const parsed = ipaddr.parse(ip);
  if (parsed.kind() === "ipv4") return REFUSED_IPV4.has(parsed.range());
  const v6 = parsed as ipaddr.IPv6;
  const range: string = v6.range();
  if (REFUSED_IPV6.has(range)) return true;
  // The NAT64 local-use prefix 64:ff9b:1::/48 leads into the operator's own network.
  if (range === "rfc6052" && !v6.match(NAT64_WELL_KNOWN)) return true;
  if (!CARRIES_IPV4.has(range) && !v6.match(IPV4_COMPATIBLE)) return false;
  const bytes = v6.toByteArray();
  return REFUSED_IPV4.has(new ipaddr.IPv4(bytes.slice(12)).range());
}

// Header values must be Latin-1 without control characters; beyond printable ASCII, percent-encode.
function headerSafe(value: string): string {
  return /^[\x20-\x7e]*$/.test(value) ? value : encodeURIComponent(value);
}

async function bodySnippet(response: Response): Promise<string> {
  try {
    const text = (await response.text()).trim();
    return text ? `: ${text.length > 200 ? `${text.slice(0, 200)}…` : text}` : "";
  } catch {
    return "";
  }
}

function unixSeconds(): number {
  return Math.floor(Date.now() / 1000);
}
