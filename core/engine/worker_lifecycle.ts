// What a forward and a reverse worker do alike with their plugin (a sink, a source): connect it,
// retrying until it answers, and stop it: let the batch in flight finish, abort the plugin when
// draining takes too long, leave behind one that ignores the abort, then close it. Stopping never
// hangs on a plugin; a batch left behind is not acknowledged, so the next owner delivers it again.

import { sleep, TIMED_OUT, within, type BackoffPolicy } from "./backoff.ts";
import type { Logger } from "../log.ts";
import type { WorkerStatus } from "./worker_status.ts";

/** How long a plugin gets to react to an abort (or to close) before the worker stops waiting for it. */
export const ABANDON_MS = 5_000;

/** Connects the plugin (`what`: "sink", "source"), retrying after `retry`'s backoff until it answers or `stop` aborts. */
export async function connectPlugin(connect: () => Promise<void>, what: string, status: WorkerStatus, retry: BackoffPolicy,
  stop: AbortSignal): Promise<void> {
  while (!stop.aborted) {
    try {
      await connect();
      status.succeed();
      return;
    } catch (error) {
      status.fail(error, `connecting the ${what} failed`);
      await sleep(status.retryDelay(retry), stop);
    }
  }
}

/**
 * Waits for the worker's `loop` up to `drainMs`, then aborts the plugin (`abort`) and leaves the loop
 * behind ABANDON_MS later; then closes the plugin (`close`, called then), waiting ABANDON_MS at most.
 */
export async function drainAndClose(loop: Promise<void> | undefined, abort: AbortController, drainMs: number,
  close: () => Promise<void> | undefined, what: string, log: Logger): Promise<void> {
  const timer = setTimeout(() => abort.abort(), drainMs);
  try {
    if ((await within(loop ?? Promise.resolve(), drainMs + ABANDON_MS)) === TIMED_OUT) {
      log.warn(`the ${what} did not stop when aborted; its batch is left unacknowledged`, { abandoned_after_ms: drainMs + ABANDON_MS });
    }
  } finally {
    clearTimeout(timer);
    abort.abort();
    const closing = close()?.catch((error) => log.warn(`closing the ${what} failed`, { error }));
    if (closing && (await within(closing, ABANDON_MS)) === TIMED_OUT) log.warn(`closing the ${what} did not finish; left behind`);
  }
}
