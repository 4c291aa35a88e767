#!/usr/bin/env node
// Runs after npm install: small, idempotent fixes to dependencies, each waiting for an upstream
// release. Each patch names the issue and says what goes wrong without it.
//
// 1. postgres.js 3.4.x can throw an uncatchable TypeError from a queued write after its socket closed
//    (porsager/postgres#1066, #1154, #1208; fix proposed in #1209). On the relay's reserved
//    advisory-lock connection that kills the process whenever PostgreSQL drops the connection. Guard
//    nextWrite the same way: fail the pending queries with CONNECTION_CLOSED instead of throwing.
//    tests/relay/observability.test.ts cuts a live connection to prove the relay survives.
// 2. kafkajs 2.2.x schedules a timer with a negative delay when it is not throttled (throttledUntil
//    is -1), and Bun prints a TimeoutNegativeWarning to stderr, breaking --log-format json output.
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
  {
    files: ["kafkajs/src/network/requestQueue/index.js"],
    mark: "/* tide: no negative timeout */",
    before: "      }, scheduleAt)\n",
    after: "      }, Math.max(0, scheduleAt)) /* tide: no negative timeout */\n",
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
