// The guard at tide's boundary with kafkajs for negative timer delays. kafkajs 2.2.x (its last
// release) schedules its request queue's throttle check with a negative delay whenever it is not
// throttled (throttledUntil is -1), and Bun prints a TimeoutNegativeWarning for each such timer
// straight to stderr, which breaks --log-format json. A process "warning" listener does not stop
// Bun printing it, so setTimeout is wrapped once, when a kafka client is built, to clamp a negative
// delay to 0 before it reaches the runtime: the timer fires as it would have (a delay below 1 ms
// is 1 ms either way), without the warning. Every other call passes through untouched.

let installed = false;

export function clampNegativeTimeouts(): void {
  if (installed) return;
  installed = true;
  const original = globalThis.setTimeout;
  const clamped = function (this: unknown, handler: unknown, delay?: unknown, ...args: unknown[]) {
    const safe = typeof delay === "number" && delay < 0 ? 0 : delay;
    return (original as (...a: unknown[]) => unknown).call(this ?? globalThis, handler, safe, ...args);
  };
  // Keep what hangs off setTimeout itself (util.promisify's custom implementation among it).
  for (const key of Reflect.ownKeys(original)) {
    if (key === "length" || key === "name" || key === "prototype") continue;
    Object.defineProperty(clamped, key, Object.getOwnPropertyDescriptor(original, key)!);
  }
  globalThis.setTimeout = clamped as unknown as typeof setTimeout;
}
