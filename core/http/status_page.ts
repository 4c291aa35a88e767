// The operations console's front page: server-rendered HTML with inline SVG charts, no build step
// and no scripts; it refreshes itself every few seconds. Actions are plain HTML forms that post to
// the API (core/http/http_console.ts) and come back here with the outcome as a notice. The dead-letter
// and trace pages (core/http/console_pages.ts) share this page's layout.

import type { ApiPipeline } from "./http.ts";
import { HISTORY_STEP_MS, type InboxCounts } from "./metrics.ts";
import type { UnreadConsumerGroup, WalSlotStatus } from "./status.ts";

export interface StatusPageData {
  relayId: string;
  relayGroupId: string;
  pipelines: ApiPipeline[];
  /** Every inbox of the database (tide.inbox_stats); the section is left out when there is none. */
  inboxes?: InboxCounts[];
  /** Consumer groups no pipeline reads, with messages waiting (tide.unread_consumer_groups). */
  unreadGroups?: UnreadConsumerGroup[];
  /** Tables captured from the WAL and their slots (tide.wal_capture_status); left out when there is none. */
  walSlots?: WalSlotStatus[];
  error?: string;
  /** The relay has an HTTP token, so the page offers its actions (pause, resume, replay). */
  actionsEnabled?: boolean;
  /** The outcome of the action that led back here. */
  notice?: string;
}

/**
 * The head, style and navigation every console page shares. After an action the page's refresh
 * goes back to / so that the action's notice shows once.
 */
export function layout(options: { title: string; relayId: string; relayGroupId: string; refresh?: boolean; notice?: string; body: string }): string {
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
${options.refresh ? `<meta http-equiv="refresh" content="${REFRESH_SECONDS}${options.notice ? "; url=/" : ""}">` : ""}
<title>${esc(options.title)}</title>
<style>${STYLE}</style>
</head>
<body>
<h1>pg-tide</h1>
<nav><a href="/">Pipelines</a> · <a href="/dlq">Dead letters</a> ·
<form class="inline" method="get" action="/trace"><label>Where is my event? <input name="key" size="28" placeholder="message id, outbox:id or inbox event id"></label> <button>Find</button></form></nav>
<div class="meta">relay ${esc(options.relayId)} · relay group ${esc(options.relayGroupId)}${options.refresh ? ` · refreshes every ${REFRESH_SECONDS} s` : ""}</div>
${options.notice ? `<div class="notice" role="status">${esc(options.notice)}</div>` : ""}
${options.body}
</body>
</html>
`;
}

const STYLE = `
  body { font: 14px/1.4 system-ui, sans-serif; margin: 2rem; color: #1d2733; }
  h1 { font-size: 1.4rem; margin: 0 0 .25rem; }
  nav { margin: .25rem 0; } nav a { color: #1a73e8; }
  .meta { color: #5b6775; margin-bottom: 1.5rem; }
  .lane { color: #5b6775; font-size: 0.85em; }
  table { border-collapse: collapse; width: 100%; }
  th, td { text-align: left; padding: .45rem .6rem; border-bottom: 1px solid #e3e7ec; vertical-align: top; }
  th { background: #f5f7f9; font-weight: 600; }
  .ok { color: #137333; font-weight: 600; } .bad { color: #b3261e; font-weight: 600; } .off { color: #8a94a0; }
  .num { text-align: right; font-variant-numeric: tabular-nums; }
  .error { color: #b3261e; font-size: 12px; max-width: 28rem; overflow-wrap: anywhere; }
  .past { color: #8a94a0; font-size: 12px; max-width: 28rem; overflow-wrap: anywhere; }
  .when { color: #5b6775; font-size: 12px; white-space: nowrap; }
  .charts { display: flex; flex-wrap: wrap; gap: 1.5rem; margin-top: 2rem; }
  figure { margin: 0; } figcaption { font-weight: 600; margin-bottom: .25rem; }
  h2 { font-size: 1.1rem; margin: 2rem 0 .5rem; }
  .banner { background: #fdecea; color: #b3261e; padding: .6rem .8rem; margin-bottom: 1rem; }
  .notice { background: #e8f0fe; color: #174ea6; padding: .6rem .8rem; margin-bottom: 1rem; }
  form.inline { display: inline; margin: 0; }
  button { font: inherit; font-size: 12px; padding: .15rem .5rem; }
  pre { margin: .25rem 0; white-space: pre-wrap; overflow-wrap: anywhere; max-width: 36rem; font-size: 12px; }
`;


export const REFRESH_SECONDS = 5;

export function renderStatusPage(data: StatusPageData): string {
  const actions = data.actionsEnabled === true;
  const rows = data.pipelines.map((p) => renderRow(p, actions)).join("\n");
  // Throughput and history are the pipeline's (all its lanes): one set of charts per pipeline.
  const charts = data.pipelines.filter((p) => p.lane === 0 && p.history.length > 0).map(renderCharts).join("\n");
  return layout({
    title: "pg-tide status",
    relayId: data.relayId,
    relayGroupId: data.relayGroupId,
    refresh: true,
    notice: data.notice,
    body: `${data.error ? `<div class="banner">Cannot read the catalog: ${esc(data.error)}</div>` : ""}
${actions ? "" : `<p class="meta">Read-only: start the relay with --http-token to pause, resume and replay from this page.</p>`}
<table id="pipelines">
<thead><tr><th>Pipeline</th><th>Direction</th><th>From → to</th><th>State</th><th>Owner</th><th>Config</th>
<th class="num">Position</th><th class="num">Lag</th><th class="num">Msg/s (1 min)</th><th class="num">DLQ</th><th>Last error</th><th>Last success</th><th></th></tr></thead>
<tbody>
${rows || `<tr><td colspan="13" class="off">No pipelines yet: create one with tide.relay_set_outbox or tide.relay_set_inbox.</td></tr>`}
</tbody>
</table>
${renderInboxes(data.inboxes ?? [], actions)}
${renderUnreadGroups(data.unreadGroups ?? [])}
${renderWalSlots(data.walSlots ?? [])}
<div class="charts">
${charts}
</div>`,
  });
}

function renderRow(p: ApiPipeline, actions: boolean): string {
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
  const dlq = p.dlq_depth > 0 ? `<a href="/dlq?pipeline=${encodeURIComponent(p.name)}">${p.dlq_depth}</a>` : "0";
  return `<tr data-pipeline="${esc(p.name)}"${p.lanes > 1 ? ` data-lane="${p.lane}"` : ""}><td>${esc(p.name)}${laneNote(p)}</td><td>${p.direction}</td><td>${esc(from)} → ${esc(to)}</td><td>${state}${heldNote(p)}</td>
<td>${esc(p.owner ?? "")}</td>${configCell(p)}<td class="num">${p.committed_offset ?? ""}</td>${lagCell(p)}${throughputCell(p)}
<td class="num">${dlq}</td>${errorCell(p)}<td class="when">${p.last_success_at ? timeAgo(p.last_success_at) : ""}</td>
<td>${pauseForm(p, actions)}</td></tr>`;
}

// A pipeline with `lanes` has a row per lane: each its own owner, position and lag.
function laneNote(p: ApiPipeline): string {
  return p.lanes > 1 ? `<br><span class="lane" data-lane-note>lane ${p.lane + 1} of ${p.lanes}</span>` : "";
}

// isolate_poison: messages parked with their key, waiting for a retry, while other keys flow.
function heldNote(p: ApiPipeline): string {
  return p.held > 0 ? `<br><span class="bad" data-held="${p.held}">${p.held} held back with ${p.held === 1 ? "its key" : "their keys"}</span>` : "";
}

// Throughput counts every lane of the pipeline: shown once, on its first lane's row.
function throughputCell(p: ApiPipeline): string {
  if (p.lanes > 1 && p.lane > 0) return `<td class="num"></td>`;
  return `<td class="num"${p.lanes > 1 ? ` title="all ${p.lanes} lanes"` : ""}>${p.throughput_per_second}</td>`;
}

// "v3" once the owner runs the catalog's version; "v2, v3 pending" while it restarts with it.
function configCell(p: ApiPipeline): string {
  if (p.applied_version === null || !p.owner) return `<td class="num" title="config version in the catalog">v${p.config_version}</td>`;
  if (p.applied_version === p.config_version) return `<td class="num" title="the owner runs the current config">v${p.config_version}</td>`;
  return `<td class="num bad" title="the owner still runs an older config">v${p.applied_version}, v${p.config_version} pending</td>`;
}

// A current error is red; one the pipeline has recovered from is grey history with its time.
function errorCell(p: ApiPipeline): string {
  if (!p.last_error) return `<td></td>`;
  const when = p.last_error_at ? ` <span class="when">${timeAgo(p.last_error_at)}</span>` : "";
  if (p.error_is_past) return `<td class="past" data-error="past">${esc(p.last_error)}${when}</td>`;
  return `<td class="error" data-error="current">${esc(p.last_error)}${when}</td>`;
}

function pauseForm(p: ApiPipeline, actions: boolean): string {
  const verb = p.enabled ? "pause" : "resume";
  const disabled = actions ? "" : ` disabled title="needs the relay's --http-token"`;
  return `<form class="inline" method="post" action="/api/v1/pipelines/${encodeURIComponent(p.name)}/${verb}?return=/"><button${disabled}>${
    p.enabled ? "Pause" : "Resume"
  }</button></form>`;
}

/** `<time>` with the UTC instant in its title and how long ago as text. */
export function timeAgo(at: Date | string): string {
  const date = typeof at === "string" ? new Date(at) : at;
  return `<time datetime="${date.toISOString()}" title="${date.toISOString()}">${age(date)} ago</time>`;
}

// A reverse pipeline has no lag tide can measure (its source keeps the offsets): it shows what
// waits in its inbox for the application instead.
function lagCell(p: ApiPipeline): string {
  if (p.direction === "forward") return `<td class="num">${p.lag ?? ""}</td>`;
  if (p.inbox_pending === null) return `<td class="num"></td>`;
  return `<td class="num" title="inbox rows the application has not processed yet">${p.inbox_pending} pending</td>`;
}

// What waits for the applications that work each inbox (claimed and failed are part of pending).
function renderInboxes(inboxes: InboxCounts[], actions: boolean): string {
  if (inboxes.length === 0) return "";
  const rows = inboxes.map((i) =>
    `<tr data-inbox="${esc(i.inbox)}"><td>${esc(i.inbox)}</td><td class="num">${i.pending}</td><td class="num">${i.claimed}</td><td class="num">${i.failed}</td>
<td class="num">${i.dead_lettered}</td><td class="num">${i.oldest_pending_at ? age(i.oldest_pending_at) : ""}</td><td>${
      i.failed + i.dead_lettered > 0
        ? `<form class="inline" method="post" action="/api/v1/inboxes/${encodeURIComponent(i.inbox)}/replay-failed?return=/"><button${
          actions ? "" : ` disabled title="needs the relay's --http-token"`
        }>Replay failed</button></form>`
        : ""
    }</td></tr>`
  ).join("\n");
  return `<h2>Inboxes</h2>
<table>
<thead><tr><th>Inbox</th><th class="num">Pending</th><th class="num">Claimed</th><th class="num">Failed</th>
<th class="num">Dead letters</th><th class="num">Oldest pending</th><th></th></tr></thead>
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

// A replication slot holds the server's WAL until a relay confirms past it: its lag is disk the
// database cannot recycle. Paused and dropped captures say why and since when.
function renderWalSlots(slots: WalSlotStatus[]): string {
  if (slots.length === 0) return "";
  const good = new Set(["streaming"]);
  const rows = slots.map((s) => {
    const css = good.has(s.state) ? "ok" : s.state === "not read" ? "off" : "bad";
    const why = s.state_reason ? `<br><span class="past">${esc(s.state_reason)}${s.state_at ? ` ${timeAgo(s.state_at)}` : ""}</span>` : "";
    return `<tr data-wal-slot="${esc(s.slot)}" data-state="${esc(s.state)}"><td>${esc(s.table)}</td><td>${esc(s.outbox)}</td><td><code>${esc(s.slot)}</code></td>
<td><span class="${css}">${esc(s.state)}</span>${why}</td><td class="num" data-lag-bytes="${s.lag_bytes ?? ""}">${s.lag_bytes === null ? "" : bytes(s.lag_bytes)}</td>
<td class="num">${bytes(s.lag_limit_bytes)}, then ${esc(s.on_lag_limit)}</td><td class="num">${ageOf(s.confirmed_age_seconds)} ago</td></tr>`;
  }).join("\n");
  return `<h2>WAL capture slots</h2>
<p class="meta">The server keeps the WAL behind each slot until a relay has written it into the outbox and confirmed it.</p>
<table id="wal-slots">
<thead><tr><th>Table</th><th>Outbox</th><th>Slot</th><th>State</th><th class="num">Lag</th><th class="num">Limit</th><th class="num">Confirmed</th></tr></thead>
<tbody>
${rows}
</tbody>
</table>`;
}

/** 512 B, 3.4 KiB, 12.0 MiB, 1.2 GiB. */
function bytes(n: number): string {
  if (n < 1024) return `${n} B`;
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let value = n / 1024;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${value.toFixed(1)} ${units[unit]}`;
}

function ageOf(seconds: number): string {
  return age(new Date(Date.now() - seconds * 1000));
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
  const times = p.history.map((h) => new Date(h.at));
  const throughput = p.history.map((h) => h.messages / (HISTORY_STEP_MS / 1000));
  const lag = p.history.map((h) => h.lag ?? 0);
  return `<figure><figcaption>${esc(p.name)}</figcaption>
${lineChart(times, throughput, "#1a73e8", "messages/s")}
${p.direction === "forward" ? lineChart(times, lag, "#e37400", "lag (messages)") : ""}
</figure>`;
}

/**
 * A line chart of the last minutes: a value axis (0 and the maximum) and a time axis labelled with
 * UTC clock times (start, middle, end), with the latest value in the caption.
 */
function lineChart(times: Date[], values: number[], color: string, label: string): string {
  const width = 360, height = 90, left = 40, right = 8, top = 6, bottom = 20;
  const plotW = width - left - right, plotH = height - top - bottom;
  const max = Math.max(1, ...values);
  const step = values.length > 1 ? plotW / (values.length - 1) : 0;
  const x = (i: number) => left + i * step;
  const y = (v: number) => top + plotH - (v / max) * plotH;
  const points = values.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
  const ticks = values.length > 1 ? [0, Math.floor((values.length - 1) / 2), values.length - 1] : [0];
  const timeLabels = [...new Set(ticks)].map((i, n, all) => {
    const anchor = all.length === 1 ? "start" : n === 0 ? "start" : n === all.length - 1 ? "end" : "middle";
    return `<text class="x-tick" x="${x(i).toFixed(1)}" y="${height - 6}" font-size="10" fill="#5b6775" text-anchor="${anchor}">${clock(times[i])}</text>`;
  }).join("");
  const latest = values.at(-1) ?? 0;
  return `<svg width="${width}" height="${height + 16}" role="img" aria-label="${label} over time (UTC)">
<rect x="${left}" y="${top}" width="${plotW}" height="${plotH}" fill="#f8fafb" stroke="#e3e7ec"/>
<text class="y-tick" x="${left - 4}" y="${top + 8}" font-size="10" fill="#5b6775" text-anchor="end">${round(max)}</text>
<text class="y-tick" x="${left - 4}" y="${top + plotH}" font-size="10" fill="#5b6775" text-anchor="end">0</text>
<polyline fill="none" stroke="${color}" stroke-width="2" points="${points}"/>
${timeLabels}
<text x="${left}" y="${height + 12}" font-size="11" fill="#5b6775">${label}: ${round(latest)} now (max ${round(max)}); time in UTC</text>
</svg>`;
}

/** HH:MM:SS in UTC. */
function clock(at: Date | undefined): string {
  return at ? at.toISOString().slice(11, 19) : "";
}

function round(n: number): string {
  return Number.isInteger(n) ? String(n) : n.toFixed(1);
}

export function esc(text: string): string {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}
