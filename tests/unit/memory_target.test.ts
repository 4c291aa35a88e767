// The relay's soft memory ceiling (core/runtime.ts, `pg-tide run --memory-target-mib`): while it
// handles message payloads, a full garbage collection is forced only when the process is above the
// target; below it, the runtime collects on its own (forcing one every 16 MiB cost a third of the
// relay's CPU during a drain).

import { afterAll, describe, expect, it } from "bun:test";
import { DEFAULT_MEMORY_TARGET_MIB, forcedCollectionCount, handled, setMemoryTarget } from "../../core/runtime.ts";

const MiB = 1024 * 1024;

afterAll(() => setMemoryTarget(DEFAULT_MEMORY_TARGET_MIB));

describe("the memory target", () => {
  it("forces a collection every 16 MiB of payload while the process is above it", () => {
    setMemoryTarget(1); // every process is above 1 MiB
    handled(16 * MiB); // whatever was counted before, a check is due now or after the next
    handled(16 * MiB);
    const before = forcedCollectionCount();
    handled(8 * MiB);
    expect(forcedCollectionCount()).toBe(before);
    handled(8 * MiB);
    expect(forcedCollectionCount()).toBe(before + 1);
  });

  it("forces none below it", () => {
    setMemoryTarget(1024 * 1024); // 1 TiB
    const before = forcedCollectionCount();
    for (let i = 0; i < 8; i++) handled(16 * MiB);
    expect(forcedCollectionCount()).toBe(before);
  });
});
