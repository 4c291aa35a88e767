// How one publish's failures are sorted (core/engine/forward_batch.ts sortFailures): what is sent
// again, and whether the worker must wait before sending it. Messages a sink held back untried behind
// a message that is now parked (isolate_poison) or dead-lettered are sent again at once: waiting out
// a backoff for them would hold every other key behind a poison message.

import { describe, expect, it } from "bun:test";
import { sortFailures } from "../../core/engine/forward_batch.ts";
import { outboxMessage } from "../../core/message.ts";

const message = (id: number, key: string) =>
  outboxMessage({ id: BigInt(id), outbox: "o", topic: null, payload: JSON.stringify({ key }), headers: {}, createdAt: new Date() });

const batch = [message(1, "K"), message(2, "A"), message(3, "K"), message(4, "B")];
const keys = new Map(batch.map((m) => [m.id, JSON.parse(m.payloadText).key as string]));
const refused = { id: 1n, error: new Error("422"), retriable: true, refused: true };
const heldBack = (id: number) => ({ id: BigInt(id), error: new Error("not sent"), retriable: true, heldBack: true });

describe("sorting a publish's failures", () => {
  it("parks a poison message with its key's later ones and resends the other keys held back behind it at once", () => {
    const so = { attempts: new Map<bigint, number>(), dead: [], parked: [] as { message: { id: bigint } }[] };
    const sorted = sortFailures(batch, [refused, heldBack(2), heldBack(3), heldBack(4)], keys, 5, so as never);
    expect(so.parked.map((p) => p.message.id)).toEqual([1n, 3n]);
    expect(sorted.retry.map((m) => m.id)).toEqual([2n, 4n]);
    expect(sorted.untried).toBe(true);
    expect(sorted.outage).toBe(false);
  });

  it("resends at once what was held back behind a message dead-lettered for good", () => {
    const so = { attempts: new Map<bigint, number>(), dead: [] as { message: { id: bigint } }[], parked: [] };
    const sorted = sortFailures(batch, [{ ...refused, retriable: false }, heldBack(2), heldBack(3), heldBack(4)], undefined, 5, so as never);
    expect(so.dead.map((d) => d.message.id)).toEqual([1n]);
    expect(sorted.retry.map((m) => m.id)).toEqual([2n, 3n, 4n]);
    expect(sorted.untried).toBe(true);
  });

  it("waits (untried false) when a message that failed is itself sent again, or the target looks down", () => {
    const retried = sortFailures(batch, [refused, heldBack(2), heldBack(3), heldBack(4)], undefined, 5,
      { attempts: new Map(), dead: [], parked: [] });
    expect(retried.retry.map((m) => m.id)).toEqual([1n, 2n, 3n, 4n]);
    expect(retried.untried).toBe(false);
    const down = sortFailures(batch, [{ ...refused, refused: false }, heldBack(2), heldBack(3), heldBack(4)], keys, 5,
      { attempts: new Map(), dead: [], parked: [] });
    expect(down.outage).toBe(true);
    expect(down.untried).toBe(false);
  });
});
