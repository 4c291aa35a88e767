// @ts-check
// publish(): one tide.outbox_publish call on the caller's connection or transaction, so the message
// commits with the caller's own writes or not at all. Works with postgres.js and node-postgres.

import { describe } from "./errors.js";

/** @typedef {import("./index.js").Queryable} Queryable */
/** @typedef {import("./index.js").PublishOptions} PublishOptions */
/** @typedef {import("./index.js").RawJson} RawJson */

// The four-argument form (the three-argument one only calls it with a NULL topic). JSON goes in as
// text, so that no driver serializes it a second time.
const PUBLISH_SQL = "SELECT tide.outbox_publish($1::text, $2::text, $3::text::jsonb, $4::text::jsonb)::text AS id";

/**
 * @param {Queryable} tx
 * @param {string} outbox
 * @param {unknown} payload
 * @param {Record<string, unknown> | null} [headers]
 * @param {PublishOptions} [options]
 * @returns {Promise<string>}
 */
export async function publish(tx, outbox, payload, headers, options = {}) {
  if (typeof outbox !== "string" || outbox === "") {
    throw new TypeError(`publish: outbox must be the name of an outbox (got ${describe(outbox)})`);
  }
  if (headers != null && (typeof headers !== "object" || Array.isArray(headers))) {
    throw new TypeError(`publish: headers must be an object (got ${describe(headers)})`);
  }
  const topic = options.topic ?? null;
  if (topic !== null && typeof topic !== "string") {
    throw new TypeError(`publish: options.topic must be a string (got ${describe(topic)})`);
  }
  const values = [outbox, topic, jsonText("payload", payload), jsonText("headers", headers ?? {})];
  if (isPostgresJs(tx)) {
    const [row] = await tx.unsafe(PUBLISH_SQL, /** @type {any[]} */ (values), { prepare: true });
    return row.id;
  }
  if (tx !== null && typeof tx === "object" && typeof tx.query === "function") {
    const result = await tx.query(PUBLISH_SQL, values);
    return result.rows[0].id;
  }
  throw new TypeError(
    `publish: tx must be a postgres.js sql or transaction (sql.begin(async (tx) => ...)) or a node-postgres ` +
      `client (got ${describe(tx)})`,
  );
}

/**
 * @param {string} text
 * @returns {RawJson}
 */
export function rawJson(text) {
  if (typeof text !== "string") throw new TypeError(`rawJson: text must be a string (got ${describe(text)})`);
  return Object.freeze({ rawJson: text });
}

/**
 * @param {unknown} tx
 * @returns {tx is import("postgres").Sql<any>}
 */
function isPostgresJs(tx) {
  return typeof tx === "function" && typeof (/** @type {{ unsafe?: unknown }} */ (tx)).unsafe === "function";
}

/**
 * The JSON text PostgreSQL parses into jsonb: rawJson text as it is, anything else serialized.
 * @param {string} what
 * @param {unknown} value
 */
function jsonText(what, value) {
  if (value !== null && typeof value === "object" && typeof (/** @type {any} */ (value)).rawJson === "string" &&
      Object.keys(value).length === 1) {
    return /** @type {RawJson} */ (value).rawJson;
  }
  let text;
  try {
    text = JSON.stringify(value);
  } catch (error) {
    throw new TypeError(
      `publish: ${what} cannot be serialized as JSON (${/** @type {Error} */ (error).message}); ` +
        `pass rawJson(text) for numbers a JavaScript number cannot hold`,
      { cause: error },
    );
  }
  if (text === undefined) throw new TypeError(`publish: ${what} must be a JSON value (got ${describe(value)})`);
  return text;
}
