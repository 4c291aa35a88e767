// Inbox event ids are the key of a unique btree index, and a btree entry must fit in a third of a
// page: one oversized id (a 6 kB Idempotency-Key) would fail the insert of its whole batch, again on
// every redelivery. So an id longer than MAX_EVENT_ID_BYTES is stored as `sha256:<hex>` of its UTF-8
// bytes, which is still stable (a redelivery maps to the same row) and fits. tide.inbox_event_id in
// sql/003_inbox.sql applies the same rule to direct inbox_insert_batch calls; both must agree.

import { createHash } from "node:crypto";

/** Longer ids (in UTF-8 bytes) are replaced by their hash. */
export const MAX_EVENT_ID_BYTES = 512;

/** The event id as stored: the id itself, or `sha256:<64 hex digits>` when it is too long. */
export function boundEventId(id: string): string {
  // A UTF-8 character is at most 4 bytes: shorter strings need no encoding to be known short enough.
  if (id.length * 4 <= MAX_EVENT_ID_BYTES) return id;
  const bytes = new TextEncoder().encode(id);
  if (bytes.byteLength <= MAX_EVENT_ID_BYTES) return id;
  return `sha256:${createHash("sha256").update(bytes).digest("hex")}`;
}
