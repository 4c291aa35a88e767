// Opens PostgreSQL connections the way every part of tide wants them: bigint ids as BigInt, notices
// kept out of the output, and connection errors that name the server without its password.

import postgres from "postgres";
import { ConfigError, ConnectionError, toError } from "./errors.ts";
import { redactText } from "./redact.ts";

/** A client whose int8 values are BigInt (ids stay exact). */
export type Sql = postgres.Sql<{ bigint: bigint }>;
export type ReservedSql = postgres.ReservedSql<{ bigint: bigint }>;

export interface ConnectOptions {
  /** Pool size; the relay adds dedicated connections for locks and LISTEN on top. */
  max?: number;
  applicationName?: string;
  /**
   * Server-side idle_in_transaction_session_timeout: a process frozen inside a transaction (SIGSTOP,
   * a VM pause) must not hold row locks that keep the next owner of its pipelines waiting.
   */
  idleInTransactionTimeoutMs?: number;
  /** A session that must live as long as the process (it holds session locks): never recycled. */
  keepAlive?: boolean;
}

export function connect(url: string, options: ConnectOptions = {}): Sql {
  checkPostgresUrl(url);
  const connection: Record<string, string> = { application_name: options.applicationName ?? "pg-tide" };
  if (options.idleInTransactionTimeoutMs) {
    connection.idle_in_transaction_session_timeout = String(options.idleInTransactionTimeoutMs);
  }
  return postgres(url, {
    max: options.max ?? 4,
    types: { bigint: postgres.BigInt },
    onnotice: () => {},
    connection,
    ...(options.keepAlive ? { max_lifetime: null } : {}),
  });
}

/**
 * postgres.js reads anything as a URL: `localhost:5432/app` becomes a login as role "unknown". A
 * database URL must say what it is.
 */
export function checkPostgresUrl(url: string): void {
  if (/^postgres(ql)?:\/\//i.test(url)) return;
  throw new ConfigError(
    `the PostgreSQL URL must start with postgres:// or postgresql://, like postgres://USER@HOST:5432/DATABASE ` +
      `(got ${JSON.stringify(redactText(url))})`,
  );
}

/** Fails fast with a readable error when the server cannot be reached. */
export async function verifyConnection(sql: Sql, url: string): Promise<void> {
  try {
    await sql`SELECT 1`;
  } catch (error) {
    throw new ConnectionError(`cannot connect to PostgreSQL at ${redactText(url)}: ${toError(error).message}`, {
      cause: error,
    });
  }
}
