// Waiting: capped exponential backoff with jitter between retries, a sleep that an abort signal cuts
// short, and a deadline for a promise.

export interface BackoffPolicy {
  initialMs: number;
  maxMs: number;
}

export const DEFAULT_BACKOFF: BackoffPolicy = { initialMs: 200, maxMs: 30_000 };

/**
 * Delay before retry number `attempt` (1 = first retry): random in [c/2, c] where
 * c = min(max, initial * 2^(attempt-1)).
 */
export function backoffDelay(attempt: number, policy: BackoffPolicy = DEFAULT_BACKOFF): number {
  const ceiling = Math.min(policy.maxMs, policy.initialMs * 2 ** Math.max(0, attempt - 1));
  // "Equal jitter": the wait still grows with each attempt, and many relays retrying one broken
  // target do not hit it in lockstep.
  return Math.round(ceiling / 2 + Math.random() * (ceiling / 2));
}

/** Resolves after `ms`, or early (without throwing) when the signal aborts or `wake` is called. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const done = () => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal?.addEventListener("abort", done, { once: true });
  });
}

export const TIMED_OUT = Symbol("timed out");

/** The promise's value, or TIMED_OUT when it has not settled within `ms` (a rejection is thrown). */
export async function within<T>(promise: PromiseLike<T>, ms: number): Promise<T | typeof TIMED_OUT> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<typeof TIMED_OUT>((resolve) => (timer = setTimeout(() => resolve(TIMED_OUT), ms)));
  try {
    return await Promise.race([promise, late]);
  } finally {
    clearTimeout(timer);
  }
}

/** A wake-up flag a loop can wait on with a timeout: set() ends the current or next wait early. */
export class Wakeup {
  #pending = false;
  #resolve: (() => void) | undefined;

  set(): void {
    this.#pending = true;
    this.#resolve?.();
  }

  async wait(ms: number, signal?: AbortSignal): Promise<void> {
    if (this.#pending || signal?.aborted) {
      this.#pending = false;
      return;
    }
    const controller = new AbortController();
    const onAbort = () => controller.abort();
    signal?.addEventListener("abort", onAbort, { once: true });
    this.#resolve = () => controller.abort();
    await sleep(ms, controller.signal);
    signal?.removeEventListener("abort", onAbort);
    this.#resolve = undefined;
    this.#pending = false;
  }
}
