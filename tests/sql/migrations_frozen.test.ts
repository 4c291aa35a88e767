// A released migration is never edited: an installed database has already run it and will not run
// it again, so an edit would reach fresh installs only and leave upgraded databases behind. Changes
// go into a new numbered file. This pins the text of every released migration; a new migration is
// added here once it is released (lands on main).

import { describe, expect, it } from "bun:test";
import { createHash } from "node:crypto";
import { MIGRATIONS } from "../../core/schema.ts";

/** sha256 (first 16 hex digits) of each released migration's text. */
const RELEASED: Record<number, string> = {
  1: "02e0540a9368e84d",
  2: "590475e00e674a75",
  3: "4ee67f0ea1890bc8",
  4: "cba7ed52229ade82",
  5: "ab5fd038652a0bb4",
  6: "42a051396727f37b",
  7: "ceeb7502d8597a40",
  8: "fc969f5a55a49c15",
  9: "13fc863fd646088e",
  10: "8b1bffb54c006823",
  11: "52ada33058cd175e",
  12: "2cd5dba8bf3c880a",
  13: "3cad51b3e04e343b",
  14: "c954e2ea8f7afad9",
};

describe("released migrations", () => {
  it("are unchanged: a change to the schema is a new migration", () => {
    const edited = MIGRATIONS.filter((m) => m.version in RELEASED)
      .filter((m) => createHash("sha256").update(m.sql).digest("hex").slice(0, 16) !== RELEASED[m.version])
      .map((m) => `${String(m.version).padStart(3, "0")}_${m.name}.sql`);
    expect(edited).toEqual([]);
  });

  it("are all still there, numbered without gaps", () => {
    expect(MIGRATIONS.map((m) => m.version)).toEqual(Array.from({ length: MIGRATIONS.length }, (_, i) => i + 1));
    for (const version of Object.keys(RELEASED).map(Number)) expect(MIGRATIONS.some((m) => m.version === version)).toBe(true);
  });
});
