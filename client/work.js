// @ts-check
// work(): a worker loop over tide.inbox_claim. It claims a batch, runs up to `concurrency` handlers,
// each in a transaction that ends with the fenced tide.inbox_mark_processed, marks a failure with
// tide.inbox_mark_failed, and waits longer and longer between claims while the inbox is empty. The
// guarantees (no two workers hold a message at once, a lost claim cannot mark it) live in the SQL
// functions (sql/009_inbox_claims.sql); this file only drives them.

import { ClaimLostError, describe, isClaimLost, toError, wholeNumber } from "./errors.js";

/** @typedef {import("./index.js").Handler} Handler */
/** @typedef {import("./index.js").InboxMessage} InboxMessage */
/** @typedef {import("./index.js").WorkOptions} WorkOptions */
/** @typedef {import("./index.js").Worker} Worker */
/** @typedef {import("postgres").Sql<any>} Sql */

export const DEFAULT_VISIBILITY_TIMEOUT_MS = 30_000;
export const DEFAULT_MIN_IDLE_MS = 50;
export const DEFAULT_MAX_IDLE_MS = 2_000;
const FIRST_RETRY_DELAY_MS = 1_000;
const MAX_RETRY_DELAY_MS = 300_000;

/**
 * @typedef {object} ClaimedRow
 * @property {string} id
 * @property {string} event_id
 * @property {string | null} source
 * @property {string} payload
 * @property {Record<string, any>} headers
 * @property {Date} received_at
 * @property {number} retry_count
 * @property {string | null} last_error
 * @property {string} claim_id
 * @property {Date} claimed_until
 */

/**
 * @param {Sql} sql
 * @param {string} inbox
 * @param {Handler} handler
 * @param {WorkOptions} [options]
 * @returns {Worker}
 */
export function work(sql, inbox, handler, options = {}) {
  if (typeof sql !== "function" || typeof (/** @type {any} */ (sql)).begin !== "function") {
    throw new TypeError(`work: sql must be a postgres.js client, postgres(url) (got ${describe(sql)})`);
  }
  if (typeof inbox !== "string" || inbox === "") {
    throw new TypeError(`work: inbox must be the name of an inbox (got ${describe(inbox)})`);
  }
  if (typeof handler !== "function") throw new TypeError(`work: handler must be a function (got ${describe(handler)})`);
  return new InboxWorker(sql, inbox, handler, parseOptions(options));
}

/**
 * @typedef {object} Settings
 * @property {number} concurrency
 * @property {number} batchSize
 * @property {number} visibilityTimeout
 * @property {string[] | null} orderingKey
 * @property {(attempt: number) => number} retryDelay
 * @property {number} minIdleMs
 * @property {number} maxIdleMs
 * @property {AbortSignal | undefined} signal
 * @property {(error: Error, message?: InboxMessage) => void} onError
 */

/** @implements {Worker} */
class InboxWorker {
  /** @type {Promise<void>} */
  stopped;
  #sql;
  #inbox;
  #handler;
  #settings;
  /** Claimed, not started yet. @type {ClaimedRow[]} */
  #queue = [];
  /** @type {Set<Promise<void>>} */
  #running = new Set();
  #stopping = false;
  /** Ends the loop's current wait early (a handler finished, or stop()). */
  #wake = () => {};

  /**
   * @param {Sql} sql
   * @param {string} inbox
   * @param {Handler} handler
   * @param {Settings} settings
   */
  constructor(sql, inbox, handler, settings) {
    this.#sql = sql;
    this.#inbox = inbox;
    this.#handler = handler;
    this.#settings = settings;
    const { signal } = settings;
    if (signal?.aborted) this.#stopping = true;
    signal?.addEventListener("abort", () => void this.stop(), { once: true });
    this.stopped = this.#loop();
  }

  stop() {
    this.#stopping = true;
    this.#wake();
    return this.stopped;
  }

  async #loop() {
    const { concurrency, minIdleMs, maxIdleMs } = this.#settings;
    let idleMs = minIdleMs;
    while (!this.#stopping) {
      if (this.#running.size >= concurrency) {
        await this.#wait();
        continue;
      }
      if (this.#queue.length > 0) {
        this.#start(/** @type {ClaimedRow} */ (this.#queue.shift()));
        continue;
      }
      /** @type {ClaimedRow[]} */
      let rows;
      try {
        rows = await this.#claim();
      } catch (error) {
        this.#report(toError(error));
        rows = [];
      }
      if (rows.length === 0) {
        await this.#wait(idleMs);
        idleMs = Math.min(idleMs * 2, maxIdleMs);
        continue;
      }
      idleMs = minIdleMs;
      this.#queue.push(...rows);
    }
    // Stopping: what this worker claimed is finished, not left to run out.
    while (this.#queue.length > 0 || this.#running.size > 0) {
      while (this.#queue.length > 0 && this.#running.size < concurrency) this.#start(/** @type {ClaimedRow} */ (this.#queue.shift()));
      await this.#wait();
    }
  }

  /** @returns {Promise<ClaimedRow[]>} */
  async #claim() {
    const { batchSize, visibilityTimeout, orderingKey } = this.#settings;
    return /** @type {ClaimedRow[]} */ (/** @type {unknown} */ (await this.#sql`
      SELECT id::text AS id, event_id, source, payload::text AS payload, headers, received_at, retry_count,
             last_error, claim_id::text AS claim_id, claimed_until
        FROM tide.inbox_claim(${this.#inbox}, ${batchSize}, ${`${visibilityTimeout} milliseconds`}::interval,
                              ${orderingKey}::text[])`));
  }

  /** @param {ClaimedRow} row */
  #start(row) {
    const task = this.#process(row).catch((error) => this.#report(toError(error)));
    this.#running.add(task);
    void task.finally(() => {
      this.#running.delete(task);
      this.#wake();
    });
  }

  /** @param {ClaimedRow} row */
  async #process(row) {
    const message = this.#message(row);
    const inbox = this.#inbox;
    try {
      await this.#sql.begin(async (tx) => {
        await this.#handler(message, tx);
        await tx`SELECT tide.inbox_mark_processed(${inbox}, ${row.id}::bigint, ${row.claim_id}::bigint)`;
      });
      return;
    } catch (error) {
      if (error instanceof ClaimLostError) return this.#report(error, message);
      if (isClaimLost(error)) return this.#report(new ClaimLostError(inbox, row.id, row.claim_id, error), message);
      const failure = toError(error);
      try {
        const delay = this.#settings.retryDelay(message.attempt);
        await this.#sql`
          SELECT tide.inbox_mark_failed(${inbox}, ${row.id}::bigint, ${row.claim_id}::bigint,
                                        ${failure.message || failure.name},
                                        ${`${delay} milliseconds`}::interval)`;
      } catch (markError) {
        this.#report(isClaimLost(markError) ? new ClaimLostError(inbox, row.id, row.claim_id, markError) : toError(markError), message);
      }
      this.#report(failure, message);
    }
  }

  /**
   * @param {ClaimedRow} row
   * @returns {InboxMessage}
   */
  #message(row) {
    const sql = this.#sql;
    const inbox = this.#inbox;
    const settings = this.#settings;
    return {
      id: row.id,
      eventId: row.event_id,
      source: row.source,
      payload: JSON.parse(row.payload),
      payloadText: row.payload,
      headers: row.headers,
      receivedAt: row.received_at,
      attempt: row.retry_count + 1,
      lastError: row.last_error,
      claimId: row.claim_id,
      claimedUntil: row.claimed_until,
      async extendClaim(ms = settings.visibilityTimeout) {
        wholeNumber("extendClaim", "ms", ms, 1);
        try {
          const [{ until }] = await sql`
            SELECT tide.inbox_extend_claim(${inbox}, ${row.id}::bigint, ${row.claim_id}::bigint,
                                           ${`${ms} milliseconds`}::interval) AS until`;
          return until ?? row.claimed_until;
        } catch (error) {
          throw isClaimLost(error) ? new ClaimLostError(inbox, row.id, row.claim_id, error) : error;
        }
      },
    };
  }

  /**
   * Waits until a handler finishes or stop() is called, or at most `ms` milliseconds.
   * @param {number} [ms]
   */
  async #wait(ms) {
    /** @type {ReturnType<typeof setTimeout> | undefined} */
    let timer;
    await new Promise((resolve) => {
      this.#wake = () => resolve(undefined);
      if (ms !== undefined) timer = setTimeout(resolve, ms);
    });
    clearTimeout(timer);
    this.#wake = () => {};
  }

  /**
   * @param {Error} error
   * @param {InboxMessage} [message]
   */
  #report(error, message) {
    try {
      this.#settings.onError(error, message);
    } catch {
      // an error handler that throws must not stop the worker
    }
  }
}

/**
 * The default onError: one line on standard error that says which message it was about.
 * @param {Error} error
 * @param {InboxMessage} [message]
 */
function logError(error, message) {
  const about = message && !(error instanceof ClaimLostError) ? `message ${message.id} (attempt ${message.attempt}): ` : "";
  console.error(`pg-tide/client: ${about}${error.message}`);
}

/**
 * Checks every option once, here, and names the one that is wrong.
 * @param {WorkOptions} options
 * @returns {Settings}
 */
function parseOptions(options) {
  if (options === null || typeof options !== "object") throw new TypeError(`work: options must be an object (got ${describe(options)})`);
  const known = ["concurrency", "batchSize", "visibilityTimeout", "orderingKey", "retryDelay", "minIdleMs", "maxIdleMs", "signal", "onError"];
  for (const key of Object.keys(options)) {
    if (!known.includes(key)) throw new TypeError(`work: unknown option "${key}" (expected one of ${known.join(", ")})`);
  }
  const concurrency = wholeNumber("work", "concurrency", options.concurrency ?? 1, 1);
  const minIdleMs = wholeNumber("work", "minIdleMs", options.minIdleMs ?? DEFAULT_MIN_IDLE_MS, 1);
  const maxIdleMs = wholeNumber("work", "maxIdleMs", options.maxIdleMs ?? Math.max(DEFAULT_MAX_IDLE_MS, minIdleMs), minIdleMs);
  const onError = options.onError ?? logError;
  if (typeof onError !== "function") throw new TypeError(`work: onError must be a function (got ${describe(onError)})`);
  return {
    concurrency,
    batchSize: wholeNumber("work", "batchSize", options.batchSize ?? concurrency, 1),
    visibilityTimeout: wholeNumber("work", "visibilityTimeout", options.visibilityTimeout ?? DEFAULT_VISIBILITY_TIMEOUT_MS, 1),
    orderingKey: parseOrderingKey(options.orderingKey),
    retryDelay: parseRetryDelay(options.retryDelay),
    minIdleMs,
    maxIdleMs,
    signal: options.signal,
    onError,
  };
}

/**
 * @param {WorkOptions["orderingKey"]} key
 * @returns {string[] | null}
 */
function parseOrderingKey(key) {
  if (key === undefined || key === null) return null;
  const path = typeof key === "string" ? key.split(".") : Array.isArray(key) ? [...key] : null;
  if (!path || path.length < 2 || !["payload", "headers"].includes(path[0]) || path.some((p) => typeof p !== "string" || p === "")) {
    throw new TypeError(
      `work: orderingKey must be a path into the payload or the headers, like "headers.key" or ["payload", "account_id"] ` +
        `(got ${describe(key)})`,
    );
  }
  return path;
}

/**
 * @param {WorkOptions["retryDelay"]} delay
 * @returns {(attempt: number) => number}
 */
function parseRetryDelay(delay) {
  if (delay === undefined) return (attempt) => Math.min(FIRST_RETRY_DELAY_MS * 2 ** (attempt - 1), MAX_RETRY_DELAY_MS);
  if (typeof delay === "number") {
    wholeNumber("work", "retryDelay", delay, 0);
    return () => delay;
  }
  if (typeof delay === "function") {
    return (attempt) => wholeNumber("work", `retryDelay(${attempt})`, delay(attempt), 0);
  }
  throw new TypeError(`work: retryDelay must be milliseconds or a function of the attempt (got ${describe(delay)})`);
}
