// The status page: server-rendered HTML with inline SVG charts, no build step and no scripts; it
// refreshes itself every few seconds.

import type { ApiPipeline } from "./http.ts";
import type { InboxCounts } from "./metrics.ts";
import type { UnreadConsumerGroup } from "./status.ts";

export interface StatusPageData {
  relayId: string;
  relayGroupId: string;
  pipelines: ApiPipeline[];
  /** Every inbox of the database (tide.inbox_stats); the section is left out when there is none. */
  inboxes?: InboxCounts[];
  /** Consumer groups no pipeline reads, with messages waiting (tide.unread_consumer_groups). */
  unreadGroups?: UnreadConsumerGroup[];
  error?: string;
}

export const REFRESH_SECONDS = 5;

export function renderStatusPage(data: StatusPageData): string {
  const rows = data.pipelines.map(renderRow).join("\n");
  const charts = data.pipelines.filter((p) => p.history.length > 0).map(renderCharts).join("\n");
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="refresh" content="${REFRESH_SECONDS}">
<title>pg-tide status</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 2rem; color: #1d2733; }
  h1 { font-size: 1.4rem; margin: 0 0 .25rem; }
  .meta { color: #5b6775; margin-bottom: 1.5rem; }
  table { border-collapse: collapse; width: 100%; }
  th, td { text-align: left; padding: .45rem .6rem; border-bottom: 1px solid #e3e7ec; vertical-align: top; }
  th { background: #f5f7f9; font-weight: 600; }
  .ok { color: #137333; font-weight: 600; } .bad { color: #b3261e; font-weight: 600; } .off { color: #8a94a0; }
  .num { text-align: right; font-variant-numeric: tabular-nums; }
  .error { color: #b3261e; font-size: 12px; max-width: 28rem; overflow-wrap: anywhere; }
  .charts { display: flex; flex-wrap: wrap; gap: 1.5rem; margin-top: 2rem; }
  figure { margin: 0; } figcaption { font-weight: 600; margin-bottom: .25rem; }
  h2 { font-size: 1.1rem; margin: 2rem 0 .5rem; }
  .banner { background: #fdecea; color: #b3261e; padding: .6rem .8rem; margin-bottom: 1rem; }
</style>
</head>
<body>
<h1>pg-tide</h1>
<div class="meta">relay ${esc(data.relayId)} · relay group ${esc(data.relayGroupId)} · refreshes every ${REFRESH_SECONDS} s</div>
${data.error ? `<div class="banner">Cannot read the catalog: ${esc(data.error)}</div>` : ""}
<table>
<thead><tr><th>Pipeline</th><th>Direction</th><th>From → to</th><th>State</th><th>Owner</th>
<th class="num">Position</th><th class="num">Lag</th><th class="num">Msg/s (1 min)</th><th class="num">DLQ</th><th>Last error</th></tr></thead>
<tbody>
${rows || `<tr><td colspan="10" class="off">No pipelines yet: create one with tide.relay_set_outbox or tide.relay_set_inbox.</td></tr>`}
</tbody>
</table>
${renderInboxes(data.inboxes ?? [])}
${renderUnreadGroups(data.unreadGroups ?? [])}
<div class="charts">
${charts}
</div>
</body>
</html>
`;
}

function renderRow(p: ApiPipeline): string {
  const from = p.direction === "forward" ? `outbox ${p.outbox}` : p.plugin_type;
  const to = p.direction === "forward" ? p.plugin_type : `inbox ${p.inbox}`;
  const state = !p.enabled
    ? `<span class="off">disabled</span>`
    : p.healthy === false
    ? `<span class="bad">failing${p.retry_attempt ? ` (attempt ${p.retry_attempt})` : ""}${
      p.circuit && p.circuit !== "closed" ? `, circuit ${p.circuit}` : ""
    }</span>`
    : p.owner_alive || p.owned_here
    ? `<span class="ok">healthy</span>`
    : `<span class="off">no owner</span>`;
  return `<tr><td>${esc(p.name)}</td><td>${p.direction}</td><td>${esc(from)} → ${esc(to)}</td><td>${state}</td>
<td>${esc(p.owner ?? "")}</td><td class="num">${p.committed_offset ?? ""}</td>${lagCell(p)}<td class="num">${p.throughput_per_second}</td>
<td class="num">${p.dlq_depth}</td><td class="error">${esc(p.last_error ?? "")}</td></tr>`;
}

// A reverse pipeline has no lag tide can measure (its source keeps the offsets): it shows what
// waits in its inbox for the application instead.
function lagCell(p: ApiPipeline): string {
  if (p.direction === "forward") return `<td class="num">${p.lag ?? ""}</td>`;
  if (p.inbox_pending === null) return `<td class="num"></td>`;
  return `<td class="num" title="inbox rows the application has not processed yet">${p.inbox_pending} pending</td>`;
}

// What waits for the applications that work each inbox (claimed and failed are part of pending).
function renderInboxes(inboxes: InboxCounts[]): string {
  if (inboxes.length === 0) return "";
  const rows = inboxes.map((i) =>
    `<tr><td>${esc(i.inbox)}</td><td class="num">${i.pending}</td><td class="num">${i.claimed}</td><td class="num">${i.failed}</td>
<td class="num">${i.dead_lettered}</td><td class="num">${i.oldest_pending_at ? age(i.oldest_pending_at) : ""}</td></tr>`
  ).join("\n");
  return `<h2>Inboxes</h2>
<table>
<thead><tr><th>Inbox</th><th class="num">Pending</th><th class="num">Claimed</th><th class="num">Failed</th>
<th class="num">Dead letters</th><th class="num">Oldest pending</th></tr></thead>
<tbody>
${rows}
</tbody>
</table>`;
}

// A deleted pipeline's group keeps its messages from the retention sweep until someone drops it.
function renderUnreadGroups(groups: UnreadConsumerGroup[]): string {
  if (groups.length === 0) return "";
  const rows = groups.map((g) =>
    `<tr><td>${esc(g.outbox)}</td><td>${esc(g.group)}</td><td>${esc(g.relay_group_id)}</td><td class="num">${g.lag}</td>
<td class="num">${age(g.position_moved_at)} ago</td><td><code>SELECT tide.drop_consumer_group('${esc(g.group)}', '${esc(g.outbox)}');</code></td></tr>`
  ).join("\n");
  return `<h2>Consumer groups no pipeline reads</h2>
<p class="meta">Nothing moves their position: the retention sweep keeps their waiting messages until an application reads them or the group is dropped.</p>
<table>
<thead><tr><th>Outbox</th><th>Group</th><th>Relay group</th><th class="num">Waiting</th><th class="num">Position moved</th><th>To drop it</th></tr></thead>
<tbody>
${rows}
</tbody>
</table>`;
}

/** "42 s", "7 min", "3 h", "2 d": how long ago `at` was. */
function age(at: Date): string {
  const seconds = Math.max(0, Math.round((Date.now() - at.getTime()) / 1000));
  if (seconds < 120) return `${seconds} s`;
  if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
  if (seconds < 172800) return `${Math.round(seconds / 3600)} h`;
  return `${Math.round(seconds / 86400)} d`;
}

function renderCharts(p: ApiPipeline): string {
  const throughput = p.history.map((h) => h.messages / 10);
  const lag = p.history.map((h) => h.lag ?? 0);
  return `<figure><figcaption>${esc(p.name)}</figcaption>
${sparkline(throughput, "#1a73e8", "messages/s")}
${p.direction === "forward" ? sparkline(lag, "#e37400", "lag") : ""}
</figure>`;
}

/** A small line chart of the last minutes with its latest value and the maximum. */
function sparkline(values: number[], color: string, label: string): string {
  const width = 320, height = 70, pad = 4;
  const max = Math.max(1, ...values);
  const step = values.length > 1 ? (width - 2 * pad) / (values.length - 1) : 0;
  const points = values
    .map((v, i) => `${(pad + i * step).toFixed(1)},${(height - pad - (v / max) * (height - 2 * pad)).toFixed(1)}`)
    .join(" ");
  const latest = values.at(-1) ?? 0;
  return `<svg width="${width}" height="${height + 16}" role="img" aria-label="${label}">
<rect x="0" y="0" width="${width}" height="${height}" fill="#f8fafb" stroke="#e3e7ec"/>
<polyline fill="none" stroke="${color}" stroke-width="2" points="${points}"/>
<text x="4" y="${height + 13}" font-size="11" fill="#5b6775">${label}: ${round(latest)} (max ${round(max)}) over ${values.length * 10} s</text>
</svg>`;
}

function round(n: number): string {
  return Number.isInteger(n) ? String(n) : n.toFixed(1);
}

function esc(text: string): string {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}
