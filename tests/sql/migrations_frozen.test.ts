// A released migration is never edited: an installed database has already run it and will not run
// it again, so an edit would reach fresh installs only and leave upgraded databases behind. Changes
// go into a new numbered file. This pins the statements of every released migration (whole-line
// comments may still be corrected); a new migration is added here once it is released (lands on main).

import { describe, expect, it } from "bun:test";
import { createHash } from "node:crypto";
import { MIGRATIONS } from "../../core/schema.ts";

/** sha256 (first 16 hex digits) of each released migration's text without its whole-line comments. */
const RELEASED: Record<number, string> = {
  1: "36d7e9a441996c1c",
  2: "0bc4e9b1cd702453",
  3: "d333f62346d00c45",
  4: "74d5bb8b6502c863",
  5: "085612527637baf5",
  6: "fea04e139152bfa8",
  7: "22e23f2651626a5c",
  8: "e2d0a230aafbe9d8",
  9: "f4360095c6f41c44",
  10: "389820096d19b4a0",
  11: "5980a9bb8e92ff84",
  12: "e5967ad7eff8c2c4",
  13: "d4f142c6c6a9136f",
  14: "fd6708986d9ec274",
  15: "0039a0a0effc6d1d",
};

/** The text without whole-line `--` comments (what a database runs). */
function statements(sql: string): string {
  return sql.split("\n").filter((line) => !line.trimStart().startsWith("--")).join("\n");
}

describe("released migrations", () => {
  it("are unchanged: a change to the schema is a new migration", () => {
    const edited = MIGRATIONS.filter((m) => m.version in RELEASED)
      .filter((m) => createHash("sha256").update(statements(m.sql)).digest("hex").slice(0, 16) !== RELEASED[m.version])
      .map((m) => `${String(m.version).padStart(3, "0")}_${m.name}.sql`);
    expect(edited).toEqual([]);
  });

  it("are all still there, numbered without gaps", () => {
    expect(MIGRATIONS.map((m) => m.version)).toEqual(Array.from({ length: MIGRATIONS.length }, (_, i) => i + 1));
    for (const version of Object.keys(RELEASED).map(Number)) expect(MIGRATIONS.some((m) => m.version === version)).toBe(true);
  });
});
