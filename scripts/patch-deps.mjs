#!/usr/bin/env node
// Runs after npm install: the one fix tide applies to a dependency, idempotent, waiting for an
// upstream release. It names the issue and says what goes wrong without it.
//
// postgres.js 3.4.x (3.4.9 is the newest release) throws a TypeError from nextWrite when a query is
// written to a reserved connection whose socket has closed (porsager/postgres#1066, #1154, #1208;
// fix proposed in #1209, not released). It is thrown from a timer, out of reach of any await, so
// the process dies: WAL capture holds its transaction on a reserved connection (core/capture/wal_capture.ts)
// and rolls back on it after PostgreSQL ended the session. Steering clear of it in tide's code is
// not enough: release() hands the dead connection back to the pool, whose next query throws the
// same; and catching the throw process-wide leaves the write, and its query, stuck in the driver.
// So nextWrite is guarded as #1209 does: fail the pending queries with CONNECTION_CLOSED instead.
// tests/relay/driver_guard.test.ts proves the guard is in force under Bun and in a compiled binary.
// (kafkajs's negative timer delay is guarded at tide's boundary instead: plugins/kafka/timers.ts.)
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const modules = join(dirname(fileURLToPath(import.meta.url)), "..", "node_modules");

const PATCHES = [
  {
    files: ["postgres/src/connection.js", "postgres/cjs/src/connection.js", "postgres/cf/src/connection.js"],
    mark: "/* tide: guard closed socket */",
    before: "  function nextWrite(fn) {\n",
    after: `  function nextWrite(fn) {
    /* tide: guard closed socket */
    if (!socket) {
      chunk = nextWriteTimer = null
      error(Errors.connection('CONNECTION_CLOSED', options))
      return false
    }
`,
  },
];

let patched = 0;
for (const patch of PATCHES) {
  for (const file of patch.files.map((f) => join(modules, f))) {
    if (!existsSync(file)) continue;
    const text = readFileSync(file, "utf8");
    if (text.includes(patch.mark)) continue;
    if (!text.includes(patch.before)) {
      console.warn(`patch-deps: ${file} has changed shape; not patched (check whether upstream fixed it)`);
      continue;
    }
    writeFileSync(file, text.replace(patch.before, patch.after));
    patched += 1;
  }
}
if (patched) console.log(`patch-deps: patched ${patched} file(s)`);
