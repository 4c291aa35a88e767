// The health a pipeline worker reports: counters, the last error, the retry attempt that drives its
// backoff, and a circuit breaker. Shared by forward and reverse workers.
//
// Circuit breaker: after CIRCUIT_THRESHOLD consecutive failures the circuit opens and the worker
// stops hammering the target: it waits a cooldown (the policy's maximum backoff, at most
// CIRCUIT_PROBE_MS, so that delivery resumes within seconds once the target is back) and then makes
// one probe attempt (half-open). Success closes the circuit; another failure opens it again.
// The state shown is `open` for the whole cooldown and `half-open` only once the probe is under way.

import type { RelayEvents } from "./events.ts";
import { toError } from "../errors.ts";
import type { Logger } from "../log.ts";
import { backoffDelay, type BackoffPolicy, DEFAULT_BACKOFF } from "./backoff.ts";

export const CIRCUIT_THRESHOLD = 5;
/** The longest an open circuit waits before its probe. */
export const CIRCUIT_PROBE_MS = 5_000;
export type CircuitState = "closed" | "open" | "half-open";

export class WorkerStatus {
  healthy = true;
  lastError: string | null = null;
  lastErrorAt: Date | null = null;
  /** The last connect or delivered batch: an error before it is past. */
  lastSuccessAt: Date | null = null;
  /** Consecutive failed attempts; 0 after a success. */
  attempt = 0;
  delivered = 0;
  filtered = 0;
  deadLettered = 0;
  failures = 0;
  /** Messages the filter could not decide on (they were skipped or dead-lettered). */
  filterErrors = 0;
  #circuit: "closed" | "open" = "closed";
  /** When the open circuit's cooldown ends and the probe attempt begins (0: not scheduled yet). */
  #probeAt = 0;

  /** open while waiting out the cooldown, half-open from the probe attempt until its outcome. */
  get circuit(): CircuitState {
    if (this.#circuit === "open" && this.#probeAt > 0 && Date.now() >= this.#probeAt) return "half-open";
    return this.#circuit;
  }
  /** True while the worker has read everything and waits for a wake-up or the next poll. */
  waiting = false;

  constructor(
    private readonly pipeline: string,
    private readonly direction: "forward" | "reverse",
    private readonly log: Logger,
    private readonly events?: RelayEvents,
  ) {}

  /** Records a failed attempt (it will be retried) and logs it with its scope. */
  fail(error: unknown, what: string, fields: Record<string, unknown> = {}): void {
    const err = toError(error);
    this.healthy = false;
    this.attempt += 1;
    this.failures += 1;
    this.lastError = err.message;
    this.lastErrorAt = new Date();
    this.log.warn(what, { ...fields, attempt: this.attempt, error: err });
    this.events?.failed?.(this.pipeline, this.direction, err);
    if (this.circuit === "half-open" || (this.circuit === "closed" && this.attempt >= CIRCUIT_THRESHOLD)) {
      if (this.circuit === "closed") this.log.warn("circuit opened: attempts paused between probes", { failures: this.attempt });
      this.#circuit = "open";
      this.#probeAt = 0;
    }
  }

  /**
   * The filter could not decide on a message. Counted and shown as the last error, but the pipeline
   * stays healthy: the message is skipped or dead-lettered and delivery goes on. Logged once per
   * distinct error, not once per message.
   */
  filterFailed(error: Error): void {
    this.filterErrors += 1;
    const repeated = error.message === this.lastError;
    this.lastError = error.message;
    this.lastErrorAt = new Date();
    if (!repeated) this.log.warn("the filter could not decide on a message", { error });
    this.events?.filterFailed?.(this.pipeline, error);
  }

  /** How long to wait before the next attempt. An open circuit waits the cooldown, then probes once. */
  retryDelay(policy: BackoffPolicy = DEFAULT_BACKOFF): number {
    if (this.#circuit === "open") {
      const cooldown = Math.min(policy.maxMs, CIRCUIT_PROBE_MS);
      this.#probeAt = Date.now() + cooldown;
      return cooldown;
    }
    return backoffDelay(this.attempt, policy);
  }

  succeed(): void {
    if (!this.healthy) this.log.info("pipeline recovered", { after_attempts: this.attempt });
    this.healthy = true;
    this.lastSuccessAt = new Date();
    this.attempt = 0;
    this.#circuit = "closed";
    this.#probeAt = 0;
  }
}
