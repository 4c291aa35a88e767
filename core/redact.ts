// Secret masking for anything tide shows to people: configs (`pg-tide check`, status, logs) and
// free text (error messages that quote a connection URL). The SQL function `relay_get_config`
// masks the same keys, so the key list lives in one exported pattern.

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
 * "***", and URL passwords inside any string become `scheme://user:***@host`. Everything inside
 * an object under a secret key is masked (`credentials: { user, pass }`); an object under an
 * ordinary key is walked, so `sasl: { mechanism, username, password }` keeps its mechanism and
 * username. null stays null so that "not set" remains visible. tide.redact in SQL does the same.
 */
export function redactConfig(value: Record<string, unknown>): Record<string, unknown>;
export function redactConfig(value: unknown): unknown;
export function redactConfig(value: unknown): unknown {
  return redactValue(value, false);
}

/** Masks passwords in URLs (`postgres://user:***@host`) and `password=...` pairs in free text. */
export function redactText(text: string): string {
  return text.replace(URL_PASSWORD, `$1${REDACTED}@`).replace(KEYWORD_PASSWORD, `$1${REDACTED}`);
}

// scheme://user:password@  — the password runs to the last "@" before the path, so an unencoded
// "@" inside it is still masked. A double quote ends it because URLs inside JSON text are common
// and passwords containing `"` are not; when in doubt this masks too much rather than too little.
const URL_PASSWORD = /([a-z][a-z0-9+.-]*:\/\/[^\s:@/?#"]*:)[^\s/?#"]*@/gi;

// libpq keyword strings and query parameters: `password=secret`, `password='a b'`, `?sslpassword=x&`.
const KEYWORD_PASSWORD = /(\b[a-z_]*(?:password|passwd)\s*=\s*)(?:'(?:[^'\\]|\\.)*'|[^\s&'";]+)/gi;

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
