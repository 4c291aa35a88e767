// Keyed lanes: the lane settings of a pipeline and the names of its lanes. A pipeline with `lanes`
// = N splits its outbox into N lanes by a key (`lane_key`, default the `key` header); each lane is its
// own consumer group and its own unit of ownership, so the lanes spread over the relays while every
// key keeps its order (all of a key's messages are in one lane, delivered in the outbox's order).
//
// The database decides the lane while a lane reads (sql/015, tide.message_lane), so a lane receives
// only its own messages. Lanes made before schema version 15 are read whole and this relay picks its
// lane's messages with laneOf (FNV-1a), the rule their positions were made with.

import { ConfigError } from "../errors.ts";
import { stringifyJson } from "../json.ts";
import type { OutboxMessage } from "../plugin.ts";

export const MAX_LANES = 64;
export const DEFAULT_LANE_KEY = "headers.key";

/** Where a pipeline's lane key is: `headers.key`, `payload.customer_id`, `payload.a.b`. */
export interface LaneKey {
  root: "headers" | "payload";
  path: string[];
  /** As configured, for messages and status. */
  text: string;
}

/** The lane settings of a forward pipeline, checked (pipeline_config.ts calls it where the config enters). */
export interface LaneConfig {
  lanes: number;
  key: LaneKey;
}

const LANE_KEY_PATTERN = /^(headers|payload)((\.[^.\s]+)+)$/;

/** Parses `lanes` and `lane_key` of a pipeline config; `where` names the pipeline in errors. */
export function laneConfig(config: Record<string, unknown>, where: string): LaneConfig {
  const lanes = config.lanes ?? 1;
  if (typeof lanes !== "number" || !Number.isInteger(lanes) || lanes < 1 || lanes > MAX_LANES) {
    throw new ConfigError(`${where}: 'lanes' must be a whole number from 1 to ${MAX_LANES} (got ${JSON.stringify(lanes)})`);
  }
  const keyText = config.lane_key ?? DEFAULT_LANE_KEY;
  const match = typeof keyText === "string" ? LANE_KEY_PATTERN.exec(keyText) : null;
  if (!match) {
    throw new ConfigError(`${where}: 'lane_key' must be a path like "headers.key" or "payload.customer_id" ` +
      `(got ${JSON.stringify(keyText)})`);
  }
  return { lanes, key: { root: match[1] as LaneKey["root"], path: match[2].slice(1).split("."), text: keyText as string } };
}

/** The number of lanes a (possibly unchecked) config asks for; 1 for anything not valid (its worker then fails to start with the reason). */
export function laneCount(config: Record<string, unknown>): number {
  const lanes = config.lanes;
  return typeof lanes === "number" && Number.isInteger(lanes) && lanes >= 1 && lanes <= MAX_LANES ? lanes : 1;
}

/** The consumer group of a lane: the pipeline's group for lane 0, `<group>.lane-<i>-of-<n>` otherwise (as tide.lane_group). */
export function laneGroup(group: string, lane: number, lanes: number): string {
  return lane === 0 ? group : `${group}.lane-${lane}-of-${lanes}`;
}

/** The name of a unit of ownership, whose hash is its advisory lock key (as tide.ownership_unit). */
export function ownershipUnit(pipeline: string, lane: number, lanes: number): string {
  return lanes <= 1 ? pipeline : `${pipeline}#${lane}`;
}

/**
 * The lane of a message: FNV-1a (32 bit) of the key's UTF-8 text, modulo the number of lanes. A
 * string key is its text; any other value its exact JSON text (a number as written: `10` and `10.0`
 * are different keys). A message without the key (missing or null) goes to lane 0.
 */
export function laneOf(message: OutboxMessage, key: LaneKey, lanes: number): number {
  if (lanes <= 1) return 0;
  const text = laneKeyText(message, key);
  return text === null ? 0 : fnv1a(text) % lanes;
}

/** The key's text as laneOf hashes it, or null (lane 0). Sinks use it as a record key. */
export function laneKeyText(message: OutboxMessage, key: LaneKey): string | null {
  let value: unknown = key.root === "headers" ? message.headers : message.payload;
  for (const part of key.path) {
    if (value === null || typeof value !== "object" || Array.isArray(value)) return null;
    value = (value as Record<string, unknown>)[part];
  }
  if (value === undefined || value === null) return null;
  return typeof value === "string" ? value : stringifyJson(value);
}

const ENCODER = new TextEncoder();

/** 32-bit FNV-1a of a string's UTF-8 bytes, as an unsigned number. */
export function fnv1a(text: string): number {
  let hash = 0x811c9dc5;
  for (const byte of ENCODER.encode(text)) {
    hash ^= byte;
    hash = Math.imul(hash, 0x01000193);
  }
  return hash >>> 0;
}
