// Waiting pipelines are checked by one shared, read-only query (tide.consumer_probe) instead of each
// polling its outbox. A pipeline that was busy a moment ago is checked every few milliseconds, so a
// message published right after is delivered at once without NOTIFY on the publish path; the longer
// it stays idle, the less often it is checked (the wait grows with the time it has been idle, up to
// its poll interval). An idle relay costs one cheap read per poll interval for all of its pipelines,
// and never a write.

import type { Sql } from "../db.ts";
import { toError } from "../errors.ts";
import type { Logger } from "../log.ts";
import type { Wakeup } from "./backoff.ts";

/** How often a pipeline that was busy a moment ago is checked. */
export const PROBE_MIN_INTERVAL_MS = 2;
/**
 * The wait between two checks is the time the pipeline has been idle divided by this (at least
 * PROBE_MIN_INTERVAL_MS, at most its poll interval): after 100 ms idle it is checked every 2 ms,
 * after 1 s every 20 ms, after 12.5 s every 250 ms. A message that ends an idle spell waits at most
 * about 2 % of that spell more than with NOTIFY.
 */
export const PROBE_BACKOFF_RATIO = 50;

/**
 * How long a pipeline that the probe watches waits before reading by itself anyway: a safety net, not
 * the way it learns of new messages (the probe, or a NOTIFY, wakes it at once).
 */
const PROBED_WAIT_MS = 60_000;

/** A waiting pipeline, as the probe sees it. */
export interface ProbeWatch {
  outbox: string;
  group: string;
  /** The longest wait between two checks: the pipeline's poll interval. */
  pollMs: number;
  /** When the pipeline last read a batch (Date.now()); 0 for never. */
  busyAt: number;
  /** Called once, when the pipeline has something to read or the probe could not tell. */
  wake(): void;
}

interface Schedule {
  dueAt: number;
}

export class IdleProbe {
  readonly #sql: Sql;
  readonly #relayGroupId: string;
  readonly #log: Logger;
  readonly #watched = new Map<ProbeWatch, Schedule>();
  #timer: ReturnType<typeof setTimeout> | undefined;
  #timerAt = Infinity;
  #probing = false;
  #stopped = false;

  constructor(sql: Sql, relayGroupId: string, log: Logger) {
    this.#sql = sql;
    this.#relayGroupId = relayGroupId;
    this.#log = log;
  }

  /** Checks for `watch` until it has something to read (then wakes it once); returns the way to stop. */
  watch(watch: ProbeWatch): () => void {
    this.#watched.set(watch, { dueAt: Date.now() + this.#interval(watch) });
    this.#schedule();
    return () => void this.#watched.delete(watch);
  }

  stop(): void {
    this.#stopped = true;
    clearTimeout(this.#timer);
    this.#watched.clear();
  }

  #interval(watch: ProbeWatch): number {
    const idleMs = Date.now() - watch.busyAt;
    return Math.min(watch.pollMs, Math.max(PROBE_MIN_INTERVAL_MS, idleMs / PROBE_BACKOFF_RATIO));
  }

  /** One timer for every watched pipeline, set for the earliest one due; one probe at a time. */
  #schedule(): void {
    if (this.#stopped || this.#probing) return;
    let next = Infinity;
    for (const { dueAt } of this.#watched.values()) next = Math.min(next, dueAt);
    if (next === this.#timerAt) return;
    clearTimeout(this.#timer);
    this.#timerAt = next;
    if (next === Infinity) return;
    this.#timer = setTimeout(() => {
      this.#timerAt = Infinity;
      void this.#probe();
    }, Math.max(0, next - Date.now()));
  }

  async #probe(): Promise<void> {
    const now = Date.now();
    const due = [...this.#watched].filter(([, schedule]) => schedule.dueAt <= now).map(([watch]) => watch);
    if (due.length === 0) return this.#schedule();
    this.#probing = true;
    try {
      const rows = await this.#sql<{ outbox_name: string; group_name: string }[]>`
        SELECT outbox_name, group_name
          FROM tide.consumer_probe(${this.#relayGroupId}, ${due.map((w) => w.outbox)}::text[], ${due.map((w) => w.group)}::text[])`;
      const ready = new Set(rows.map((row) => JSON.stringify([row.outbox_name, row.group_name])));
      for (const watch of due) {
        const schedule = this.#watched.get(watch);
        if (!schedule) continue; // woken meanwhile (a NOTIFY) or stopped
        if (ready.has(JSON.stringify([watch.outbox, watch.group]))) {
          this.#watched.delete(watch);
          watch.wake();
          continue;
        }
        schedule.dueAt = Date.now() + this.#interval(watch);
      }
    } catch (error) {
      // The pipelines read by themselves: they report the database's trouble and retry.
      this.#log.debug("probing the waiting pipelines failed; waking them", { error: toError(error) });
      for (const watch of due) {
        if (this.#watched.delete(watch)) watch.wake();
      }
    } finally {
      this.#probing = false;
      this.#schedule();
    }
  }
}

/**
 * A pipeline with nothing to read waits until `probe` finds something for it, `wakeup` is set (a
 * NOTIFY, or the probe), `dueAt` (Date.now(): a parked message due for a retry) comes, or `signal`
 * aborts. Without a probe, it polls at its poll interval.
 */
export async function waitForWork(probe: IdleProbe | undefined, watch: Omit<ProbeWatch, "wake">, wakeup: Wakeup, dueAt: number,
  signal: AbortSignal): Promise<void> {
  const unwatch = probe?.watch({ ...watch, wake: () => wakeup.set() });
  try {
    const dueMs = Math.max(0, dueAt - Date.now());
    await wakeup.wait(Math.min(probe ? Math.max(watch.pollMs, PROBED_WAIT_MS) : watch.pollMs, dueMs), signal);
  } finally {
    unwatch?.();
  }
}
