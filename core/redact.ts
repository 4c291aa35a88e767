// Secret masking for anything tide shows to people: configs (`pg-tide check`, status, logs) and
// free text (error messages that quote a connection URL). The SQL function tide.redact (behind
// `relay_get_config`) masks the same way; tests/sql/redaction_parity.test.ts keeps the two equal.

/**
 * Keys whose values are secrets, matched case-insensitively anywhere in the key
 * (`client_secret`, `SASL_PASSWORD`, `apiKey`, `credentials`).
 * Kept to plain alternation and bracket expressions so that its `source` also works as a
 * PostgreSQL regular expression (`key ~* pattern`): no lookarounds, no `\b`.
 */
export const SECRET_KEY_PATTERN =
  /password|passwd|passphrase|secret|token|api[_-]?key|credential|private[_-]?key|authorization|signing[_-]?key|cookie/i;

/** What a masked value becomes. */
export const REDACTED = "***";

/** True when a value stored under `key` must not be shown. */
export function isSecretKey(key: string): boolean {
  return SECRET_KEY_PATTERN.test(key);
}

/**
 * Deep copy of a JSON-like value with secrets masked: primitives under secret-looking keys become
 * "***", and inside any string the credential shapes of redactText are masked. Everything inside an
 * object under a secret key is masked (`credentials: { user, pass }`); an object under an ordinary
 * key is walked, so `sasl: { mechanism, username, password }` keeps its mechanism and username.
 * null stays null so that "not set" remains visible. tide.redact in SQL does the same.
 */
export function redactConfig(value: Record<string, unknown>): Record<string, unknown>;
export function redactConfig(value: unknown): unknown;
export function redactConfig(value: unknown): unknown {
  return redactValue(value, false);
}

/**
 * Masks the credential shapes that turn up in free text (errors, logs, response bodies a target
 * echoes back): URL passwords (`postgres://user:***@host`) and URL userinfo without a colon, which
 * is a token (`nats://***@host`); secret query parameters (`?token=***&page=2`); `password=...`
 * pairs; JSON pairs under a secret-looking key (`"password": "***"`); `Authorization:` and `Cookie:`
 * header lines; and `Bearer` / `Basic` credentials wherever they stand.
 *
 * Every pattern runs in linear time: the text may come from a message or a remote server.
 */
export function redactText(text: string): string {
  return text
    .replace(URL_PASSWORD, `$1${REDACTED}@`)
    .replace(URL_TOKEN, `$1${REDACTED}@`)
    .replace(QUERY_SECRET, `$1${REDACTED}`)
    .replace(KEYWORD_PASSWORD, `$1${REDACTED}`)
    .replace(JSON_SECRET, `$1${REDACTED}"`)
    .replace(HEADER_SECRET, `$1${REDACTED}`)
    .replace(AUTH_SCHEME, `$1${REDACTED}`);
}

// A URL scheme, at most 32 characters: unbounded, every letter of a long word would start a scan
// to its end (quadratic time). A longer scheme still matches by its last 32 characters.
const SCHEME = "[a-z][a-z0-9+.-]{0,31}://";

// scheme://user:password@  — the password runs to the last "@" before the path, so an unencoded
// "@" inside it is still masked. A double quote ends it because URLs inside JSON text are common
// and passwords containing `"` are not; when in doubt this masks too much rather than too little.
const URL_PASSWORD = new RegExp(`(${SCHEME}[^\\s:@/?#"]*:)[^\\s/?#"]*@`, "gi");

// scheme://token@ — userinfo without a colon (`nats://TOKEN@host`, `https://ghp_x@github.com`) is a
// token, or a user name that cannot be told apart from one.
const URL_TOKEN = new RegExp(`(${SCHEME})[^\\s:/?#"]+@`, "gi");

// ?name=value and &name=value with a secret name: one matching SECRET_KEY_PATTERN (`access_token`,
// `X-Amz-Credential`), or one that is a secret in URLs but too common a config key to mask there:
// any name containing "signature" (`X-Amz-Signature`), exactly "key" (Google API keys) or "sig"
// (Azure SAS). The value runs to the next "&", "#", whitespace or double quote; an empty value
// stays visible. Names are bounded (100 characters either side of the secret word) to keep the
// scan linear.
const QUERY_SECRET = new RegExp(
  `([?&](?:[^\\s=&#"?]{0,100}(?:${SECRET_KEY_PATTERN.source}|signature)[^\\s=&#"?]{0,100}|key|sig)=)[^\\s&#"]+`,
  "gi",
);

// libpq keyword strings and query parameters: `password=secret`, `password='a b'`, `?sslpassword=x&`.
// A quoted value without its closing quote is masked to the end.
const KEYWORD_PASSWORD = /(\b[a-z_]*(?:password|passwd)\s*=\s*)(?:'(?:[^'\\]|\\.)*'?|[^\s&'";]+)/gi;

// "client_secret": "value" and "Authorization": ["value"] in JSON text (a response body that echoes
// the request): the string value, or the first string of a list, under a secret-looking key.
const JSON_SECRET = new RegExp(
  `("[^"\\\\]{0,100}(?:${SECRET_KEY_PATTERN.source})[^"\\\\]{0,100}"\\s*:\\s*\\[?\\s*")(?:[^"\\\\]|\\\\.)*"?`,
  "gi",
);

// Header lines as HTTP servers echo them: `Authorization: Bearer x`, `Cookie: session=x`. The value
// runs to the end of the line, or to a double quote or backslash (the end of a JSON string).
const HEADER_SECRET = /(\b(?:proxy-authorization|authorization|set-cookie|cookie|x-api-key|x-auth-token)[ \t]*:[ \t]*)[^\r\n"\\]+/gi;

// `Bearer <token>` and `Basic <credentials>` under any key and in any text: the word that follows.
const AUTH_SCHEME = /(\b(?:bearer|basic)[ \t]+)[a-z0-9._~+/-]+=*/gi;

const PEM_PRIVATE_KEY = /-----BEGIN [A-Z ]*PRIVATE KEY-----/;

function redactValue(value: unknown, underSecretKey: boolean): unknown {
  if (value === null || value === undefined) return value;
  if (Array.isArray(value)) return value.map((item) => redactValue(item, underSecretKey));
  if (isPlainObject(value)) {
    // fromEntries defines own properties, so a JSON key "__proto__" stays data.
    return Object.fromEntries(
      Object.entries(value).map(([key, child]) => [key, redactValue(child, underSecretKey || isSecretKey(key))]),
    );
  }
  if (underSecretKey) return REDACTED;
  // A PEM private key (ssl.key, tls.key) is a secret whatever its key is called.
  if (typeof value === "string" && PEM_PRIVATE_KEY.test(value)) return REDACTED;
  if (typeof value === "string") return redactText(value);
  return value;
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  if (typeof value !== "object" || value === null) return false;
  const proto = Object.getPrototypeOf(value);
  return proto === Object.prototype || proto === null;
}
