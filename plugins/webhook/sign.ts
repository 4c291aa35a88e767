// Request signatures of the webhook sink: a plain HMAC of the body, or Standard Webhooks
// (https://www.standardwebhooks.com). Web Crypto only, so the same code runs on Bun and Deno.

export type SigningScheme = "hmac-sha256" | "standard-webhooks";

export interface SigningConfig {
  scheme: SigningScheme;
  /** hmac-sha256: used as UTF-8 bytes. standard-webhooks: `whsec_<base64>` is decoded, anything else used raw. */
  secret: string;
  /** hmac-sha256 only: where the signature goes. */
  header?: string;
  /**
   * hmac-sha256 only: a header for the unix time of sending. The signature then covers
   * `<timestamp>.<body>`, so that a receiver can refuse an old request replayed later.
   */
  timestamp_header?: string;
}

export const DEFAULT_SIGNATURE_HEADER = "X-Tide-Signature";

/**
 * Signs one request body. `messageId` is the idempotency key of the request (Standard Webhooks'
 * `webhook-id`), `nowSeconds` the unix time it is sent at. Returns the headers to add.
 */
export type Signer = (body: string, messageId: string, nowSeconds: number) => Promise<Record<string, string>>;

/**
 * hmac-sha256:       `<header>: sha256=<hex HMAC-SHA256(secret, body)>`; with a timestamp_header,
 *                    `<timestamp_header>: <unix seconds>` and the HMAC is over "<timestamp>.<body>"
 * standard-webhooks: `webhook-id`, `webhook-timestamp`, and
 *                    `webhook-signature: v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>`
 */
export function createSigner(config: SigningConfig): Signer {
  // Imported once per sink, lazily: create() must stay free of async work.
  let key: Promise<CryptoKey> | undefined;
  const hmac = async (data: string) => {
    key ??= crypto.subtle.importKey(
      "raw",
      secretBytes(config.scheme, config.secret),
      { name: "HMAC", hash: "SHA-256" },
      false,
      ["sign"],
    );
    return new Uint8Array(await crypto.subtle.sign("HMAC", await key, encoder.encode(data)));
  };

  if (config.scheme === "hmac-sha256") {
    const header = config.header ?? DEFAULT_SIGNATURE_HEADER;
    const timestampHeader = config.timestamp_header;
    if (!timestampHeader) return async (body) => ({ [header]: `sha256=${toHex(await hmac(body))}` });
    return async (body, _messageId, nowSeconds) => ({
      [timestampHeader]: String(nowSeconds),
      [header]: `sha256=${toHex(await hmac(`${nowSeconds}.${body}`))}`,
    });
  }
  return async (body, messageId, nowSeconds) => {
    const timestamp = String(nowSeconds);
    const signature = toBase64(await hmac(`${messageId}.${timestamp}.${body}`));
    return {
      "webhook-id": messageId,
      "webhook-timestamp": timestamp,
      "webhook-signature": `v1,${signature}`,
    };
  };
}

/** The HMAC key bytes for a secret; throws a plain Error when a `whsec_` secret is not base64. */
export function secretBytes(scheme: SigningScheme, secret: string): Uint8Array<ArrayBuffer> {
  if (scheme === "standard-webhooks" && secret.startsWith(WHSEC_PREFIX)) {
    const encoded = secret.slice(WHSEC_PREFIX.length);
    if (encoded === "" || !BASE64.test(encoded)) throw new Error(`a "${WHSEC_PREFIX}" secret must be followed by base64`);
    return fromBase64(encoded);
  }
  return encoder.encode(secret);
}

const WHSEC_PREFIX = "whsec_";
const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;
const encoder = new TextEncoder();

function toHex(bytes: Uint8Array): string {
  return Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
}

function toBase64(bytes: Uint8Array): string {
  return btoa(String.fromCharCode(...bytes));
}

function fromBase64(text: string): Uint8Array<ArrayBuffer> {
  return Uint8Array.from(atob(text), (char) => char.charCodeAt(0));
}
