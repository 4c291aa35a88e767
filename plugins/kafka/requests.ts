// How a Kafka sink batch goes out: records with their size on the wire, cut into requests that fit the
// broker's limit (max_request_bytes), and which broker errors no retry can fix (too large: split and
// find the record; the rest: dead-letter).

import { Buffer } from "node:buffer";
import type { Message } from "kafkajs";
import type { OutboxMessage } from "../../core/plugin.ts";
import { kafkaErrorTypes } from "./connection.ts";

/** The broker refused a request for its size: the same records in smaller requests may pass. */
const TOO_LARGE_TYPES = new Set(["MESSAGE_TOO_LARGE", "RECORD_LIST_TOO_LARGE"]);

/** Error types of records or topics that retrying cannot fix. */
const PERMANENT_TYPES = new Set([
  ...TOO_LARGE_TYPES,
  "INVALID_TOPIC_EXCEPTION",
  "INVALID_RECORD",
  "CORRUPT_MESSAGE",
  "POLICY_VIOLATION",
  "UNSUPPORTED_FOR_MESSAGE_FORMAT",
]);

export interface PendingRecord {
  message: OutboxMessage;
  topic: string;
  record: Message;
  /** The record's size on the wire, roughly: key, value, headers and their framing. */
  bytes: number;
}

export function isPermanent(error: unknown): boolean {
  return kafkaErrorTypes(error).some((type) => PERMANENT_TYPES.has(type));
}

export function isTooLarge(error: unknown): boolean {
  return kafkaErrorTypes(error).some((type) => TOO_LARGE_TYPES.has(type));
}

/**
 * The records in order, cut into requests of at most `limit` bytes. A record larger than the limit
 * goes alone: the broker (or the topic's own limit) decides.
 */
export function requests(records: PendingRecord[], limit: number): PendingRecord[][] {
  const groups: PendingRecord[][] = [];
  let current: PendingRecord[] = [];
  let bytes = BATCH_OVERHEAD_BYTES;
  for (const record of records) {
    if (current.length > 0 && bytes + record.bytes > limit) {
      groups.push(current);
      current = [];
      bytes = BATCH_OVERHEAD_BYTES;
    }
    current.push(record);
    bytes += record.bytes;
  }
  if (current.length > 0) groups.push(current);
  return groups;
}

// Record framing in Kafka's format v2, generously: length, attributes, timestamp and offset deltas,
// key and value lengths (varints); per header its two lengths. The batch header comes on top, once.
const RECORD_OVERHEAD_BYTES = 32;
const HEADER_OVERHEAD_BYTES = 10;
const BATCH_OVERHEAD_BYTES = 70;

export function recordBytes(record: Message): number {
  let bytes = RECORD_OVERHEAD_BYTES + byteLength(record.key) + byteLength(record.value);
  const headers = record.headers ?? {};
  for (const name in headers) {
    bytes += HEADER_OVERHEAD_BYTES + Buffer.byteLength(name) + byteLength(headers[name] as string | Buffer | undefined);
  }
  return bytes;
}

function byteLength(value: string | Buffer | null | undefined): number {
  if (value === null || value === undefined) return 0;
  return typeof value === "string" ? Buffer.byteLength(value) : value.byteLength;
}

export function sizeOf(records: PendingRecord[]): number {
  return records.reduce((sum, r) => sum + r.bytes, BATCH_OVERHEAD_BYTES);
}
