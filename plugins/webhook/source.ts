// Source "webhook": an HTTP route on the relay's server (/ingest/<path>) that writes each request
// into the pipeline's inbox. The caller gets 200 only after the inbox row is committed (202 would
// promise less), 401 for a bad signature, 413 for an oversize body, 503 when writing failed.
// Signatures: a plain HMAC-SHA256 of the body (optionally with a signed timestamp), GitHub, Stripe,
// and Standard Webhooks. With a signature, the event id comes only from what the signature covers:
// a captured request replayed with a fresh id header must land on the row it already wrote.

import { Buffer } from "node:buffer";
import { createHash, createHmac, timingSafeEqual } from "node:crypto";
import { z } from "zod";
import type { InboundMessage, SourceBatch, SourceDefinition } from "../../core/plugin.ts";
import { cloudEventId, inboundPayload } from "../shared.ts";
import { secretBytes } from "./sign.ts";

const configSchema = z
  .strictObject({
    /** Served at /ingest/<path> on --metrics-addr. */
    path: z.string().regex(/^\/?[A-Za-z0-9_.~-]+(\/[A-Za-z0-9_.~-]+)*\/?$/, "must be a URL path like \"payments\""),
    signature: z.strictObject({
      scheme: z.enum(["hmac-sha256", "github", "stripe", "standard-webhooks"]),
      secret: z.string().min(1),
      /** hmac-sha256 only: the header carrying `sha256=<hex>` (default X-Tide-Signature). */
      header: z.string().min(1).optional(),
      /**
       * hmac-sha256 only: a header carrying the unix time the request was signed at. The signature
       * then covers `<timestamp>.<body>`, and a request older than tolerance_seconds is refused.
       */
      timestamp_header: z.string().min(1).optional(),
      /** stripe, standard-webhooks, and hmac-sha256 with timestamp_header: how old a signed timestamp may be. */
      tolerance_seconds: z.number().int().positive().default(300),
    }).optional(),
    /** Accept requests without a signature: anyone who can reach the route can then write into the inbox. */
    allow_unsigned: z.boolean().default(false),
    max_body_bytes: z.number().int().positive().default(1_048_576),
    /** How long a request waits for its inbox commit before answering 503. */
    timeout_ms: z.number().int().positive().default(30_000),
  })
  .superRefine((config, issues) => {
    const problem = (path: string[], message: string) => issues.addIssue({ code: "custom", path, message });
    if (!config.signature && !config.allow_unsigned) {
      problem(
        ["signature"],
        "required: configure how senders sign their requests (scheme \"hmac-sha256\", \"github\", \"stripe\" or " +
          "\"standard-webhooks\" and the secret), or set \"allow_unsigned\": true to let anyone who can reach the route write into the inbox",
      );
    }
    if (config.signature && config.allow_unsigned) problem(["allow_unsigned"], "cannot be combined with 'signature'");
    for (const key of ["header", "timestamp_header"] as const) {
      if (config.signature?.[key] && config.signature.scheme !== "hmac-sha256") {
        problem(["signature", key], "applies to scheme \"hmac-sha256\" only");
      }
    }
  });

export type WebhookSourceConfig = z.output<typeof configSchema>;

interface Pending {
  message: InboundMessage;
  settle: (response: Response) => void;
}

export const webhookSource: SourceDefinition<WebhookSourceConfig> = {
  type: "webhook",
  kind: "source",
  summary: "Receives HTTP POSTs at /ingest/<path> on the relay and writes them into the inbox",
  config: configSchema,
  example: { path: "payments", signature: { scheme: "standard-webhooks", secret: "whsec_c2VjcmV0LWtleQ==" } },
  create(config, ctx) {
    const queue: Pending[] = [];
    let waiting: (() => void) | undefined;
    let unroute: (() => void) | undefined;

    const dropped = droppedHeaders(config.signature);

    async function handle(request: Request): Promise<Response> {
      if (request.method !== "POST") return text(405, "use POST");
      const declared = Number(request.headers.get("content-length") ?? "0");
      if (declared > config.max_body_bytes) return text(413, `body larger than ${config.max_body_bytes} bytes`);
      // Signatures are over the bytes as sent; the text is only decoded for the payload.
      const body = await readLimited(request, config.max_body_bytes);
      if (body === undefined) return text(413, `body larger than ${config.max_body_bytes} bytes`);
      if (config.signature) {
        const problem = verify(config.signature, request.headers, body);
        if (problem) {
          ctx.logger.warn("webhook rejected", { reason: problem });
          return text(401, `invalid signature: ${problem}`);
        }
      }
      const message = toMessage(request, body, config.signature?.scheme, dropped);
      return await new Promise<Response>((resolve) => {
        const timer = setTimeout(() => resolve(text(503, "the inbox did not commit in time; retry")), config.timeout_ms);
        queue.push({ message, settle: (response) => (clearTimeout(timer), resolve(response)) });
        waiting?.();
      });
    }

    return {
      async connect() {
        if (!ctx.http) {
          throw ctx.errors.config(`webhook source "${ctx.pipeline}": the relay serves no HTTP; set --metrics-addr`);
        }
        if (!unroute && !config.signature) {
          ctx.logger.warn(
            `webhook source "${ctx.pipeline}": allow_unsigned is true, so anyone who can reach /ingest/${trimSlashes(config.path)} ` +
              "can write into the inbox; configure 'signature' to accept only signed requests",
          );
        }
        // A signed route authenticates each request itself; an unsigned one is left to the server's own guard.
        unroute ??= ctx.http.route(config.path, handle, { authenticates: config.signature !== undefined });
      },
      async read(): Promise<SourceBatch | null> {
        while (queue.length === 0) {
          if (ctx.signal.aborted) return null;
          await new Promise<void>((resolve) => {
            waiting = resolve;
            ctx.signal.addEventListener("abort", () => resolve(), { once: true });
          });
          waiting = undefined;
        }
        const taken = queue.splice(0, ctx.batchSize);
        return {
          messages: taken.map((p) => p.message),
          async ack() {
            for (const p of taken) p.settle(json(200, { status: "accepted", event_id: p.message.eventId ?? null }));
          },
          async nack(error) {
            for (const p of taken) p.settle(text(503, `could not store the message: ${error.message}`));
          },
        };
      },
      async close() {
        unroute?.();
        unroute = undefined;
        for (const p of queue.splice(0)) p.settle(text(503, "the pipeline is stopping; retry"));
      },
    };
  },
};

type Signature = NonNullable<WebhookSourceConfig["signature"]>;
type Scheme = Signature["scheme"];

/** Returns why the signature is not valid, or undefined when it is. */
function verify(sig: Signature, headers: Headers, body: Uint8Array): string | undefined {
  const hmac = (key: Uint8Array | string, prefix: string) => createHmac("sha256", key).update(prefix).update(body).digest();
  switch (sig.scheme) {
    case "hmac-sha256":
    case "github": {
      const name = sig.scheme === "github" ? "x-hub-signature-256" : (sig.header ?? "x-tide-signature");
      const given = headers.get(name);
      if (!given?.startsWith("sha256=")) return `missing ${name}: sha256=<hex>`;
      let signed = "";
      if (sig.scheme === "hmac-sha256" && sig.timestamp_header) {
        const stale = staleness(headers.get(sig.timestamp_header), sig.tolerance_seconds, sig.timestamp_header);
        if (stale) return stale;
        signed = `${headers.get(sig.timestamp_header)}.`;
      }
      return same(given.slice(7), hmac(sig.secret, signed).toString("hex")) ? undefined : `${name} does not match`;
    }
    case "stripe": {
      const header = headers.get("stripe-signature");
      if (!header) return "missing Stripe-Signature";
      const parts = header.split(",").map((p) => p.split("=", 2) as [string, string]);
      const t = parts.find(([k]) => k === "t")?.[1];
      const stale = staleness(t, sig.tolerance_seconds, "the Stripe-Signature timestamp t");
      if (stale) return stale;
      const expected = hmac(sig.secret, `${t}.`).toString("hex");
      return parts.some(([k, v]) => k === "v1" && same(v, expected)) ? undefined : "no v1 signature matches";
    }
    case "standard-webhooks": {
      const id = headers.get("webhook-id");
      const t = headers.get("webhook-timestamp");
      const given = headers.get("webhook-signature");
      if (!id || !t || !given) return "missing webhook-id, webhook-timestamp or webhook-signature";
      const stale = staleness(t, sig.tolerance_seconds, "webhook-timestamp");
      if (stale) return stale;
      const expected = hmac(secretBytes("standard-webhooks", sig.secret), `${id}.${t}.`).toString("base64");
      return given.split(" ").some((s) => s.startsWith("v1,") && same(s.slice(3), expected)) ? undefined : "no v1 signature matches";
    }
  }
}

/** Why a signed timestamp (unix seconds) is not acceptable, or undefined when it is. */
function staleness(timestamp: string | null | undefined, toleranceSeconds: number, name: string): string | undefined {
  if (!timestamp) return `missing ${name}`;
  // Number("") is 0 and Number("abc") is NaN, which no comparison refuses: only digits count.
  if (!/^\d{1,15}$/.test(timestamp)) return `${name} must be unix seconds (got "${timestamp.slice(0, 40)}")`;
  const age = Math.floor(Date.now() / 1000) - Number(timestamp);
  return Math.abs(age) > toleranceSeconds ? `${name} is outside the tolerance of ${toleranceSeconds} s` : undefined;
}

/**
 * Credentials a sender or a proxy adds, which the inbox must not keep: anyone who may read the
 * inbox could replay them. The configured signature headers are dropped as well.
 */
const CREDENTIAL_HEADER = /^(proxy-)?authorization$|^(set-)?cookie$|signature|secret|passw(or)?d|token|api[-_]?key|hmac|credential|session/i;

function droppedHeaders(sig: Signature | undefined): (name: string) => boolean {
  const configured = new Set([sig?.header?.toLowerCase()].filter((h): h is string => h !== undefined));
  return (name) => CREDENTIAL_HEADER.test(name) || configured.has(name.toLowerCase());
}

function toMessage(request: Request, bytes: Uint8Array, scheme: Scheme | undefined, dropped: (name: string) => boolean): InboundMessage {
  // The body goes into the inbox as it came (not JSON: as a JSON string); parsed only to find its id.
  const { payloadText, parsed } = inboundPayload(bytes);
  const headers: Record<string, string> = {};
  request.headers.forEach((value, key) => {
    if (!dropped(key)) headers[key] = value;
  });
  return {
    eventId: eventIdOf(scheme, request.headers, parsed),
    // The same body sent twice (a client retry without an id) maps to the same row.
    transportId: `webhook:${createHash("sha256").update(bytes).digest("hex").slice(0, 32)}`,
    payloadText,
    headers,
    source: `webhook:${new URL(request.url).pathname}`,
  };
}

/**
 * The request's own event id. Signed: only from what the signature covers (Standard Webhooks'
 * webhook-id, a Stripe event's id, a CloudEvents id in the body); else none, and the body's hash
 * identifies it. GitHub's X-GitHub-Delivery is not signed, so it is not used. Unsigned: the usual
 * id headers too.
 */
function eventIdOf(scheme: Scheme | undefined, headers: Headers, payload: unknown): string | undefined {
  const bodyId = typeof payload === "object" && payload !== null && typeof (payload as any).id === "string" && (payload as any).id !== ""
    ? (payload as any).id as string
    : undefined;
  switch (scheme) {
    case "standard-webhooks":
      return headers.get("webhook-id") ?? undefined;
    case "stripe":
      return bodyId;
    case "github":
      return undefined;
    case "hmac-sha256":
      return cloudEventId(payload);
    case undefined:
      return headers.get("webhook-id") ?? headers.get("x-github-delivery") ?? (headers.has("stripe-signature") ? bodyId : undefined) ??
        headers.get("idempotency-key") ?? headers.get("ce-id") ?? cloudEventId(payload) ?? undefined;
  }
}

async function readLimited(request: Request, limit: number): Promise<Uint8Array | undefined> {
  const reader = request.body?.getReader();
  if (!reader) return new Uint8Array();
  const chunks: Uint8Array[] = [];
  let size = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    size += value.byteLength;
    if (size > limit) {
      await reader.cancel();
      return undefined;
    }
    chunks.push(value);
  }
  return Buffer.concat(chunks);
}

function same(a: string, b: string): boolean {
  const x = Buffer.from(a);
  const y = Buffer.from(b);
  return x.length === y.length && timingSafeEqual(x, y);
}

function trimSlashes(path: string): string {
  return path.replace(/^\/+|\/+$/g, "");
}

function text(status: number, message: string): Response {
  return new Response(message + "\n", { status, headers: { "content-type": "text/plain" } });
}

function json(status: number, body: unknown): Response {
  return new Response(JSON.stringify(body), { status, headers: { "content-type": "application/json" } });
}
