// Plain-text tables for the CLI's people-facing output.

/** Left-aligned columns separated by two spaces, one line per row, trailing spaces trimmed. */
export function columns(header: string[], body: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...body.map((row) => row[i].length)));
  return [header, ...body].map((row) => row.map((cell, i) => cell.padEnd(widths[i])).join("  ").trimEnd()).join("\n") + "\n";
}
