// pg-tide/client: publish into an outbox inside your own transaction, and work an inbox from any
// number of processes. Plain JavaScript with its types in index.d.ts, so that Node, Bun and Deno
// run it from node_modules without a build step; it needs nothing but the client you pass in.

export { publish, rawJson } from "./publish.js";
export { work } from "./work.js";
export { ClaimLostError } from "./errors.js";
