// Named failpoints: places in the engine where a test can make the relay crash, pause or fail, to
// prove that no crash or pause at that point loses or skips a message. Enabled only through the
// environment, e.g. TIDE_FAILPOINTS="forward.after-publish=crash,forward.before-commit@3=pause=2000".
//
// Actions: `crash` ends the process at once (SIGKILL: no cleanup, no drain, nothing flushed),
// `pause=<ms>` holds that code path for ms milliseconds, `error` throws there. `name@N` fires only
// the Nth time the point is reached; without it, crash fires at the first hit and pause/error at
// every hit. Unknown names are refused at start, so a typo cannot make a test pass vacuously.

import { ConfigError } from "../errors.ts";
import { env } from "../runtime.ts";

export const FAILPOINTS = [
  "forward.after-read",
  "forward.after-partial-publish",
  "forward.after-publish",
  "forward.before-commit",
  "forward.after-commit",
  "coordinator.holding-locks",
  "coordinator.reacquiring",
  "reverse.after-inbox-commit",
  // Reached by the kafka sink in transactional mode: the batch's records are sent, the transaction is not committed.
  "kafka.before-commit",
  // WAL capture (core/capture/wal_capture.ts): a source transaction read from the slot and written, its outbox
  // transaction not committed; committed, the slot's position not confirmed.
  "wal.before-outbox-commit",
  "wal.after-outbox-commit",
] as const;

export type FailpointName = (typeof FAILPOINTS)[number];

type Action = { kind: "crash" } | { kind: "error" } | { kind: "pause"; ms: number };

interface Failpoint {
  action: Action;
  /** Fire only at this hit (1-based); undefined: every hit. */
  at: number | undefined;
  hits: number;
}

/** Parses a TIDE_FAILPOINTS value; throws a ConfigError naming the bad entry. */
export function parseFailpoints(spec: string | undefined): Map<FailpointName, Failpoint> {
  const points = new Map<FailpointName, Failpoint>();
  for (const entry of (spec ?? "").split(",").map((s) => s.trim()).filter(Boolean)) {
    const match = /^([a-z.-]+)(?:@(\d+))?=(crash|error|pause=(\d+))$/.exec(entry);
    if (!match) {
      throw new ConfigError(`TIDE_FAILPOINTS: cannot read "${entry}": expected name[@N]=crash|error|pause=<ms>`);
    }
    const [, name, at, action, ms] = match;
    if (!(FAILPOINTS as readonly string[]).includes(name)) {
      throw new ConfigError(`TIDE_FAILPOINTS: unknown failpoint "${name}"; known: ${FAILPOINTS.join(", ")}`);
    }
    points.set(name as FailpointName, {
      action: action === "crash" ? { kind: "crash" } : action === "error" ? { kind: "error" } : { kind: "pause", ms: Number(ms) },
      at: at === undefined ? undefined : Number(at),
      hits: 0,
    });
  }
  return points;
}

let active: Map<FailpointName, Failpoint> | undefined;
/** The TIDE_FAILPOINTS text `active` was parsed from. */
let loadedFrom: string | undefined;

/** Reads TIDE_FAILPOINTS (again only when it changed); the relay calls it at start so that a bad value stops it there. */
export function loadFailpoints(): void {
  // Read again when it changed: a relay started in-process (the tests) sees the value of its start.
  const text = env("TIDE_FAILPOINTS");
  if (active !== undefined && text === loadedFrom) return;
  active = parseFailpoints(text);
  loadedFrom = text;
}

/** Reached a named point: does nothing unless TIDE_FAILPOINTS names it. */
export async function failpoint(name: FailpointName): Promise<void> {
  if (active === undefined) loadFailpoints();
  if (active!.size === 0) return;
  const point = active!.get(name);
  if (!point) return;
  point.hits += 1;
  if (point.at !== undefined && point.hits !== point.at) return;
  switch (point.action.kind) {
    case "crash":
      process.kill(process.pid, "SIGKILL");
      await new Promise(() => {}); // the signal is on its way; nothing after this point may run
      return;
    case "pause":
      await new Promise((resolve) => setTimeout(resolve, (point.action as { ms: number }).ms));
      return;
    case "error":
      throw new Error(`failpoint ${name}: injected error`);
  }
}

/** Whether a failpoint is configured (a batch is only split when partial-publish is). */
export function failpointEnabled(name: FailpointName): boolean {
  if (active === undefined) loadFailpoints();
  return active!.has(name);
}

/**
 * A forward batch handed to `publish` (the sink), then forward.after-publish. With
 * forward.after-partial-publish set, the batch goes out in two halves with that failpoint between
 * them (a crash after the sink took part of it). The sink's failures for the whole batch.
 */
export async function publishThroughFailpoints<M, F>(publish: (batch: M[]) => Promise<F[]>, pending: M[]): Promise<F[]> {
  if (!failpointEnabled("forward.after-partial-publish") || pending.length < 2) {
    const failures = await publish(pending);
    await failpoint("forward.after-publish");
    return failures;
  }
  const half = Math.ceil(pending.length / 2);
  const first = await publish(pending.slice(0, half));
  await failpoint("forward.after-partial-publish");
  const second = await publish(pending.slice(half));
  await failpoint("forward.after-publish");
  return [...first, ...second];
}
