// pg-tide/client: publish into an outbox inside your own transaction, and work an inbox from any
// number of processes. The types of client/index.js; docs/client.md shows both in use.

import type { Sql, TransactionSql } from "postgres";

/** Anything `publish` can run its statement on. */
export type Queryable =
  /** postgres.js: `sql`, or the `tx` of `sql.begin(async (tx) => ...)`. */
  | Sql<any>
  | TransactionSql<any>
  /** node-postgres: a `Client` or a pool's client inside `BEGIN` ... `COMMIT`, or a `Pool`. */
  | NodePostgresQueryable;

export interface NodePostgresQueryable {
  query(text: string, values: unknown[]): Promise<{ rows: any[] }>;
}

/** JSON text passed to PostgreSQL as it is, for numbers a JavaScript number cannot hold. */
export interface RawJson {
  readonly rawJson: string;
}

export interface PublishOptions {
  /** The message's topic (a routing label, `{topic}` in pipeline templates). */
  topic?: string | null;
}

/**
 * Appends one message to `outbox` in the transaction `tx` runs in: it commits with your own writes,
 * or not at all. `payload` is any JSON value (or `rawJson(text)`); `headers` a JSON object.
 * Resolves to the message's id in the outbox.
 */
export function publish(
  tx: Queryable,
  outbox: string,
  payload: unknown,
  headers?: Record<string, unknown> | null,
  options?: PublishOptions,
): Promise<string>;

/** Marks JSON text to be published as it is: `publish(tx, "orders", rawJson('{"amount": 12345678901234567890}'))`. */
export function rawJson(text: string): RawJson;

/** A message handed to a `work` handler, claimed by this worker until `claimedUntil`. */
export interface InboxMessage<Payload = any> {
  /** The row's id in the inbox table. */
  readonly id: string;
  /** The message's dedup key (`<outbox>:<id>` for messages from a tide outbox). */
  readonly eventId: string;
  readonly source: string | null;
  /** The payload, parsed. */
  readonly payload: Payload;
  /** The payload as PostgreSQL returned it (exact numbers). */
  readonly payloadText: string;
  readonly headers: Record<string, any>;
  readonly receivedAt: Date;
  /** 1 on the first attempt; failed attempts and claims that ran out count. */
  readonly attempt: number;
  /** Why the previous attempt failed, if one did. */
  readonly lastError: string | null;
  /** The claim this worker holds the message under. */
  readonly claimId: string;
  /** When the claim runs out: another worker may then take the message. */
  readonly claimedUntil: Date;
  /**
   * Moves the claim's deadline to `ms` (default: the worker's visibilityTimeout) from now, for a
   * handler that needs longer. Rejects with ClaimLostError when another worker took the message.
   */
  extendClaim(ms?: number): Promise<Date>;
}

/**
 * Processes one message. It runs inside a transaction (`tx`) that also marks the message processed:
 * database writes made through `tx` commit together with that mark or not at all. Throwing marks
 * the message failed with the error's message (it is retried after `retryDelay`, and dead-lettered
 * after the inbox's max_retries).
 */
export type Handler<Payload = any> = (message: InboxMessage<Payload>, tx: TransactionSql<any>) => unknown | Promise<unknown>;

export interface WorkOptions {
  /** Handlers running at once in this worker (default 1). Each holds a connection while it runs. */
  concurrency?: number;
  /** Most messages one claim asks for (default: concurrency). */
  batchSize?: number;
  /** Milliseconds a claim lasts before another worker may take the message (default 30000). */
  visibilityTimeout?: number;
  /**
   * Handle messages of one key strictly one after another, across all workers of the inbox: a path
   * into the payload or the headers, `"headers.key"` or `["payload", "account_id"]`. Every worker of
   * the inbox must use the same key. Messages without the key are not ordered.
   */
  orderingKey?: string | readonly string[];
  /** Milliseconds before a failed message may be claimed again: a number, or a function of the
   * attempt that failed (default: 1 s, doubling per attempt, at most 5 minutes). */
  retryDelay?: number | ((attempt: number) => number);
  /** When a claim finds nothing, wait this long before the next (default 50 ms), doubling... */
  minIdleMs?: number;
  /** ...up to this (default 2000 ms). */
  maxIdleMs?: number;
  /** Stops the worker when aborted, like `worker.stop()`. */
  signal?: AbortSignal;
  /**
   * Called with every error the worker survives: a handler that threw (after the message was marked
   * failed), a claim lost to another worker (ClaimLostError), the database unreachable. Default:
   * console.error.
   */
  onError?: (error: Error, message?: InboxMessage) => void;
}

export interface Worker {
  /**
   * Stops claiming, lets every message already claimed finish (processed or failed), then resolves.
   * Safe to call more than once.
   */
  stop(): Promise<void>;
  /** Resolves when the worker has stopped. */
  readonly stopped: Promise<void>;
}

/**
 * Works inbox `inbox` until stopped: claims messages (no other worker gets them while the claim
 * lasts), runs `handler` for each, marks each processed or failed, and waits longer and longer
 * between claims while the inbox is empty. Run as many workers, in as many processes, as you like.
 * `sql` is a postgres.js client whose pool has room for `concurrency` transactions and one more
 * connection.
 */
export function work<Payload = any>(sql: Sql<any>, inbox: string, handler: Handler<Payload>, options?: WorkOptions): Worker;

/** The claim a worker held a message under ended: another worker claimed the message after it ran out. */
export class ClaimLostError extends Error {
  readonly inbox: string;
  readonly messageId: string;
  readonly claimId: string;
  /** The SQLSTATE PostgreSQL reports a lost claim with. */
  static readonly SQLSTATE: "TD001";
}
