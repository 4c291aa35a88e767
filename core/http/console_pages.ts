// The console's dead-letter and "where is my event?" pages: server-rendered with the front page's
// layout, no scripts. They do not refresh themselves, so an operator can read a payload in peace.

import type { DeadLetter, DlqStatus, TraceRow } from "./operations.ts";
import { DLQ_STATUSES } from "./operations.ts";
import { esc, layout, timeAgo } from "./status_page.ts";

export interface DeadLetterPageData {
  relayId: string;
  relayGroupId: string;
  query: { pipeline?: string; status?: DlqStatus };
  deadLetters: DeadLetter[];
  actionsEnabled: boolean;
  notice?: string;
  error?: string;
}

export function renderDeadLetterPage(data: DeadLetterPageData): string {
  const pipeline = data.query.pipeline ?? "";
  const status = data.query.status ?? "open";
  const here = `/dlq?${new URLSearchParams({ ...(pipeline ? { pipeline } : {}), status })}`;
  const disabled = data.actionsEnabled ? "" : ` disabled title="needs the relay's --http-token"`;
  const post = (path: string, label: string) =>
    `<form class="inline" method="post" action="${path}?return=${encodeURIComponent(here)}"><button${disabled}>${label}</button></form>`;
  const rows = data.deadLetters.map((d) =>
    `<tr data-dead-letter="${d.id}"><td class="num">${d.id}</td><td>${esc(d.pipeline)}</td><td>${esc(`${d.outbox}:${d.message_id}`)}</td>
<td>${esc(d.topic ?? "")}</td><td class="num">${d.attempts}</td><td>${d.status}</td><td class="when">${timeAgo(d.failed_at)}</td>
<td class="error">${esc(d.error)}</td>
<td><details><summary>payload</summary><pre class="payload">${esc(d.payload)}</pre></details>
<details><summary>headers</summary><pre class="headers">${esc(JSON.stringify(d.headers, null, 2))}</pre></details></td>
<td>${d.status === "open" || d.status === "resolved" ? post(`/api/v1/dlq/${d.id}/replay`, "Replay") : ""}
${d.status === "open" || d.status === "requeued" ? post(`/api/v1/dlq/${d.id}/discard`, "Discard") : ""}</td></tr>`
  ).join("\n");
  const replayAll = pipeline && status === "open" && data.deadLetters.length > 0
    ? `<p>${post(`/api/v1/pipelines/${encodeURIComponent(pipeline)}/dlq/replay`, `Replay all open dead letters of ${esc(pipeline)}`)}</p>`
    : "";
  return layout({
    title: "pg-tide dead letters",
    relayId: data.relayId,
    relayGroupId: data.relayGroupId,
    notice: data.notice,
    body: `<h2>Dead letters</h2>
${data.error ? `<div class="banner">${esc(data.error)}</div>` : ""}
<form method="get" action="/dlq"><label>Pipeline <input name="pipeline" value="${esc(pipeline)}"></label>
<label>Status <select name="status">${DLQ_STATUSES.map((s) => `<option${s === status ? " selected" : ""}>${s}</option>`).join("")}</select></label>
<button>Show</button></form>
<p class="meta">Replay asks the pipeline's owner to deliver the message again; discard marks it resolved, never delivered.</p>
${replayAll}
<table id="dead-letters">
<thead><tr><th class="num">Id</th><th>Pipeline</th><th>Message</th><th>Topic</th><th class="num">Attempts</th><th>Status</th><th>Failed</th>
<th>Error</th><th>Content</th><th></th></tr></thead>
<tbody>
${rows || `<tr><td colspan="10" class="off">No ${status === "all" ? "" : `${status} `}dead letters${pipeline ? ` for ${esc(pipeline)}` : ""}.</td></tr>`}
</tbody>
</table>`,
  });
}

export interface TracePageData {
  relayId: string;
  relayGroupId: string;
  key: string;
  places: TraceRow[];
  error?: string;
}

const STATE_CLASS: Record<string, string> = {
  delivered: "ok",
  processed: "ok",
  "dead-lettered": "bad",
  failed: "bad",
  "not found": "off",
  discarded: "off",
};

export function renderTracePage(data: TracePageData): string {
  const rows = data.places.map((r) =>
    `<tr data-kind="${r.kind}" data-state="${esc(r.state)}"><td>${r.kind}</td><td>${esc(r.place ?? "")}</td>
<td>${esc(r.kind === "outbox" ? r.consumer_group ?? "" : r.event_id ?? "")}</td><td>${esc(r.relay_group_id ?? "")}</td><td>${esc(r.pipeline ?? "")}</td>
<td class="${STATE_CLASS[r.state] ?? ""}">${esc(r.state)}</td><td class="num">${r.attempts ?? ""}</td>
<td class="when">${r.at ? timeAgo(r.at) : ""}</td><td class="error">${esc(r.detail ?? "")}</td></tr>`
  ).join("\n");
  const empty = data.key
    ? `No outbox message or inbox event matches ${esc(data.key)}.`
    : "Give an outbox message id (42), its dedup key (orders:42) or an inbox event id.";
  return layout({
    title: "pg-tide: where is my event?",
    relayId: data.relayId,
    relayGroupId: data.relayGroupId,
    body: `<h2>Where is my event?${data.key ? ` <code>${esc(data.key)}</code>` : ""}</h2>
${data.error ? `<div class="banner">${esc(data.error)}</div>` : ""}
<p class="meta">Outbox messages: per consumer group, delivered, pending, dead-lettered, replay requested or discarded. Inbox events: processed, pending, failed or dead-lettered.</p>
<table id="trace">
<thead><tr><th>Kind</th><th>Outbox / inbox</th><th>Group / event id</th><th>Relay group</th><th>Pipeline</th><th>State</th>
<th class="num">Attempts</th><th>Since</th><th>Detail</th></tr></thead>
<tbody>
${rows || `<tr><td colspan="9" class="off">${empty}</td></tr>`}
</tbody>
</table>`,
  });
}
