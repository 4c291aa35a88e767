// @ts-check
// The errors the client reports, and the checks that produce its option errors.

/** PostgreSQL's SQLSTATE for a claim that no longer holds its message (sql/009_inbox_claims.sql). */
export const CLAIM_LOST_SQLSTATE = "TD001";

export class ClaimLostError extends Error {
  static SQLSTATE = CLAIM_LOST_SQLSTATE;

  /**
   * @param {string} inbox
   * @param {string} messageId
   * @param {string} claimId
   * @param {unknown} cause the database's error, which says what became of the message
   */
  constructor(inbox, messageId, claimId, cause) {
    super(
      `inbox "${inbox}": claim ${claimId} lost message ${messageId}; what the handler wrote through its ` +
        `transaction was rolled back (${toError(cause).message})`,
      { cause },
    );
    this.name = "ClaimLostError";
    this.inbox = inbox;
    this.messageId = messageId;
    this.claimId = claimId;
  }
}

/** @param {unknown} error */
export function isClaimLost(error) {
  return typeof error === "object" && error !== null && /** @type {{ code?: unknown }} */ (error).code === CLAIM_LOST_SQLSTATE;
}

/** @param {unknown} value */
export function toError(value) {
  return value instanceof Error ? value : new Error(typeof value === "string" ? value : JSON.stringify(value) ?? String(value));
}

/**
 * @param {string} where
 * @param {string} name
 * @param {unknown} value
 * @param {number} min
 * @returns {number}
 */
export function wholeNumber(where, name, value, min) {
  if (typeof value !== "number" || !Number.isSafeInteger(value) || value < min) {
    throw new RangeError(`${where}: ${name} must be a whole number of at least ${min} (got ${describe(value)})`);
  }
  return value;
}

/** @param {unknown} value */
export function describe(value) {
  if (typeof value === "string") return JSON.stringify(value);
  if (typeof value === "function") return "a function";
  if (typeof value === "bigint") return `${value}n`;
  try {
    return JSON.stringify(value) ?? String(value);
  } catch {
    return String(value);
  }
}
