// The relay's HTTP token (--http-token): which routes ask for it, how a request presents it
// (`Authorization: Bearer <token>`, or HTTP Basic with the token as password, for browsers), and the
// constant-time comparison. Probes stay open by default so that orchestrators and Prometheus keep
// working; `--http-token-scope all` closes them too.

import { Buffer } from "node:buffer";
import { createHash, timingSafeEqual } from "node:crypto";
import type { Context, MiddlewareHandler } from "hono";
import { INGEST_PREFIX, type RouteTable } from "./routes.ts";

/** "api": the token guards everything but the probes; "all": the probes too. */
export type HttpTokenScope = "api" | "all";
export const HTTP_TOKEN_SCOPES: readonly HttpTokenScope[] = ["api", "all"];

export interface HttpAuth {
  token: string;
  scope: HttpTokenScope;
}

/** Open without a token under scope "api": liveness, readiness and the Prometheus scrape. */
export const PROBE_PATHS: readonly string[] = ["/livez", "/readyz", "/health", "/metrics"];

export const MIN_HTTP_TOKEN_LENGTH = 16;

/**
 * Why a token cannot be used, or undefined. The value itself is never quoted: it is a secret.
 * The characters are those an `Authorization: Bearer` header may carry (RFC 6750).
 */
export function httpTokenProblem(token: string): string | undefined {
  if (!/^[A-Za-z0-9._~+/-]+=*$/.test(token)) {
    return "may hold only letters, digits and - . _ ~ + / (then = padding), no spaces; generate one with: openssl rand -hex 32";
  }
  if (token.length < MIN_HTTP_TOKEN_LENGTH) {
    return `must be at least ${MIN_HTTP_TOKEN_LENGTH} characters (got ${token.length}); generate one with: openssl rand -hex 32`;
  }
  return undefined;
}

/**
 * Asks for the token on every route except the probes (scope "api") and the ingest routes whose
 * handler authenticates the request itself (a signed webhook source). Everything else is closed by
 * default, including paths that do not exist, so that a new route cannot be left open by mistake.
 */
export function requireToken(auth: HttpAuth, routes: RouteTable | undefined): MiddlewareHandler {
  const expected = digest(auth.token);
  return async (c, next) => {
    // The same pathname the ingest route handler looks up, so that both agree on the route.
    const pathname = new URL(c.req.url).pathname;
    if (auth.scope === "api" && PROBE_PATHS.includes(pathname)) return await next();
    if (pathname.startsWith(INGEST_PREFIX) && routes?.find(pathname)?.authenticates) return await next();
    const problem = credentialProblem(c.req.header("authorization"), expected);
    if (problem) return unauthorized(c, pathname, problem);
    return await next();
  };
}

function credentialProblem(header: string | undefined, expected: Buffer): string | undefined {
  if (!header) {
    return 'this relay asks for its HTTP token (--http-token): send the header "Authorization: Bearer <token>"';
  }
  const [scheme = "", value = ""] = header.trim().split(/\s+/, 2);
  let given: string;
  if (/^bearer$/i.test(scheme)) {
    given = value;
  } else if (/^basic$/i.test(scheme)) {
    // Browsers: any user name, the token as password.
    const decoded = Buffer.from(value, "base64").toString("utf8");
    given = decoded.slice(decoded.indexOf(":") + 1);
  } else {
    return `the Authorization header must be "Bearer <token>" (got the scheme "${scheme.slice(0, 20)}")`;
  }
  // Digests have equal length whatever was sent, so the comparison takes the same time.
  if (!timingSafeEqual(digest(given), expected)) return "the token does not match this relay's --http-token";
  return undefined;
}

function digest(token: string): Buffer {
  return createHash("sha256").update(token).digest();
}

function unauthorized(c: Context, pathname: string, problem: string): Response {
  const message = `unauthorized: ${problem}`;
  // The status page is opened in a browser, which can only answer a Basic challenge.
  c.header("WWW-Authenticate", pathname === "/" ? 'Basic realm="pg-tide", charset="UTF-8"' : 'Bearer realm="pg-tide"');
  return pathname.startsWith("/api/") ? c.json({ error: message }, 401) : c.text(`${message}\n`, 401);
}
