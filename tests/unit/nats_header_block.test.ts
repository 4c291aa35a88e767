// The NATS sink writes its headers itself (plugins/nats/header_block.ts) rather than through nats.js's
// MsgHdrs: the bytes on the wire must be the ones nats.js would send, and what nats.js refuses must be
// refused too.

import { describe, expect, it } from "bun:test";
import { headers as natsHeaders } from "@nats-io/transport-node";
import { HeaderBlock } from "../../plugins/nats/header_block.ts";

type Step = ["append" | "set", string, string];

function both(steps: Step[]): [string, string] {
  const ours = new HeaderBlock();
  const theirs = natsHeaders();
  for (const [op, name, value] of steps) {
    ours[op](name, value);
    theirs[op](name, value);
  }
  const decoder = new TextDecoder();
  return [decoder.decode(ours.encode()), decoder.decode((theirs as unknown as { encode(): Uint8Array }).encode())];
}

describe("the NATS sink's header block", () => {
  it("encodes what nats.js encodes: names as given, values trimmed, set replacing every value of the name", () => {
    const cases: Step[][] = [
      [],
      [["append", "Nats-Msg-Id", "orders:1"]],
      [["append", "traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"], ["append", "event_type", " order.created "]],
      [["append", "a", "1"], ["append", "b", "2"], ["set", "a", "3"]],
      [["append", "x", "1"], ["append", "x", "2"], ["set", "x", "only"]],
      [["append", "name", "café 😀 \"quoted\""], ["append", "big", "9007199254740993"]],
      [["append", "Content-Type", "application/cloudevents+json; charset=utf-8"], ["set", "ce-id", "o:1"]],
    ];
    for (const steps of cases) {
      const [ours, theirs] = both(steps);
      expect(ours).toBe(theirs);
    }
  });

  it("refuses the names and values nats.js refuses", () => {
    for (const name of ["has:colon", "has space", "tab\there", "é"]) {
      expect(HeaderBlock.validName(name)).toBe(false);
      expect(() => natsHeaders().append(name, "v")).toThrow();
      expect(() => new HeaderBlock().append(name, "v")).toThrow();
    }
    for (const name of ["traceparent", "Nats-Msg-Id", "x!#$%&'*+-.^_`|~"]) expect(HeaderBlock.validName(name)).toBe(true);
    // nats.js would write an empty name as a line ": value"; the sink leaves such a header out.
    expect(HeaderBlock.validName("")).toBe(false);
    expect(() => natsHeaders().append("a", "line\nbreak")).toThrow();
    expect(() => new HeaderBlock().append("a", "line\nbreak")).toThrow("cannot contain");
  });
});
