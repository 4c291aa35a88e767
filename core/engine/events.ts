// What pipeline workers report as they go; metrics and the status API listen. Every hook is
// optional and must not throw.

import type { OutboxMessage } from "../plugin.ts";

export interface RelayEvents {
  /**
   * A forward batch was acknowledged by the sink; `messages` are the ones delivered, `startedAt`
   * (Date.now()) when its delivery began.
   */
  delivered?(pipeline: string, messages: OutboxMessage[], startedAt?: number): void;
  /** A reverse batch was committed into the inbox. */
  consumed?(pipeline: string, inserted: number, duplicates: number): void;
  /** A delivery, read or write attempt failed (it will be retried). */
  failed?(pipeline: string, direction: "forward" | "reverse", error: Error): void;
  /** Messages went to the dead-letter queue. */
  deadLettered?(pipeline: string, count: number): void;
  /** Messages were skipped by the pipeline's filter. */
  filtered?(pipeline: string, count: number): void;
  /** The filter could not decide on a message (evaluation error or non-bool result). */
  filterFailed?(pipeline: string, error: Error): void;
  /** An acknowledgement was refused as stale (fencing): the batch will be read again. */
  staleAck?(pipeline: string): void;
}

/** One RelayEvents that calls each of the given ones in turn. */
export function combineEvents(...all: (RelayEvents | undefined)[]): RelayEvents {
  const list = all.filter((e): e is RelayEvents => e !== undefined);
  return {
    delivered: (...args) => list.forEach((e) => e.delivered?.(...args)),
    consumed: (...args) => list.forEach((e) => e.consumed?.(...args)),
    failed: (...args) => list.forEach((e) => e.failed?.(...args)),
    deadLettered: (...args) => list.forEach((e) => e.deadLettered?.(...args)),
    filtered: (...args) => list.forEach((e) => e.filtered?.(...args)),
    filterFailed: (...args) => list.forEach((e) => e.filterFailed?.(...args)),
    staleAck: (...args) => list.forEach((e) => e.staleAck?.(...args)),
  };
}
