// DOM rendering for the panels: small functions that turn state into table rows.

// Formatters are made on first use: the first NumberFormat costs ~15 ms (locale data),
// which should not delay the page's first request.
let fmt = null;
let valueFmt = null;
export const num = (n) => (n == null ? "–" : (fmt ??= new Intl.NumberFormat()).format(n));
// An event's value, readable: 0.041218119 -> 0.0412181.
export const value = (v) => (v == null ? "" : (valueFmt ??= new Intl.NumberFormat(undefined, { maximumSignificantDigits: 6 })).format(v));
export const time = (ts) => (ts ? new Date(ts * 1000).toLocaleTimeString() : "–");
const show = (v) => (v == null ? "" : typeof v === "object" ? JSON.stringify(v) : String(v));

export function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

export function row(cells, attrs = {}) {
  const tr = document.createElement("tr");
  tr.append(...cells.map((c) => (c instanceof Node ? wrap(c) : cell(show(c)))));
  for (const [k, v] of Object.entries(attrs)) tr.dataset[k] = v;
  return tr;
}

function wrap(node) {
  if (node.tagName === "TD") return node;
  const td = document.createElement("td");
  td.append(node);
  return td;
}

export function fill(table, rows, emptyText) {
  const body = table.tBodies[0];
  if (!rows.length) {
    const td = cell(emptyText, "empty");
    td.colSpan = table.tHead.rows[0].cells.length;
    const tr = document.createElement("tr");
    tr.append(td);
    body.replaceChildren(tr);
  } else {
    body.replaceChildren(...rows);
  }
}

export function setStatus(el, text, kind = "") {
  el.textContent = text;
  el.className = `status ${kind}`;
  el.hidden = !text;
}

export function eventRow(e) {
  const tags = Object.entries(e.tags || {}).map(([k, v]) => `${k}=${v}`).join(" ");
  // The stream omits defaults (msgspec omit_defaults): a missing kind is "gauge".
  return row([time(e.ts), e.name, e.kind ?? "gauge", value(e.value), e.source, tags], { id: e.id });
}

export function sinkRow(s) {
  const breaker = s.policies?.breaker_state ?? "–";
  const stateCls = ["ok", "idle", "sending"].includes(s.state) ? "good" : s.state === "disabled" ? "warn" : "bad";
  return row([s.name, cell(s.state, stateCls), cell(String(breaker), breaker === "open" ? "bad" : ""), num(s.sent),
    num(s.lag_events), s.lag_s == null ? "0" : s.lag_s.toFixed(1), num(s.dlq_pending), s.last_error || ""], { sink: s.name });
}

export function dlqRow(e) {
  return row([e.id, e.sink, num(e.count), e.status, e.attempts, e.error, time(e.updated)], { id: String(e.id) });
}

export function flagRow(f, onSet, onClear) {
  let input;
  if (f.type === "enum") {
    input = document.createElement("select");
    for (const c of f.choices) input.append(new Option(c, c, false, c === f.value));
  } else {
    input = document.createElement("input");
    input.value = show(f.value);
  }
  input.name = f.name;
  const set = document.createElement("button");
  set.textContent = "Set";
  set.addEventListener("click", () => onSet(f, input.value));
  const clear = document.createElement("button");
  clear.textContent = "Clear";
  clear.disabled = f.layer !== "override";
  clear.addEventListener("click", () => onClear(f));
  const tools = document.createElement("td");
  tools.append(input, " ", set, " ", clear);
  const name = cell(f.name);
  name.title = f.description || "";
  return row([name, show(f.value), f.layer, show(f.default), tools], { flag: f.name });
}

// A forwarding process (a status `forwarders` entry). "gone" once its connection closed;
// its last counts stay (the owner lists up to 32 departed ones).
export function forwarderRow(f) {
  return row([String(f.pid), cell(f.connected ? "connected" : "gone", f.connected ? "good" : "muted"), num(f.events),
    num(f.batches), time(f.last_seen), cell(num(f.lost), f.lost ? "bad" : ""), num(f.spilled)], { pid: String(f.pid) });
}

// The Sessions tab: active sessions and the agents seen, from a SessionTracker.
export function fillSessions(sessionsTable, agentsTable, tracker) {
  fill(sessionsTable, tracker.activeSessions().map((s) => row([s.id, num(s.count), cell(num(s.errors), s.errors ? "bad" : ""), time(s.first), time(s.last)], { session: s.id })), "no active sessions");
  fill(agentsTable, tracker.agentList().map((a) => row([a.id, time(a.last), num(a.count), a.rate.toFixed(1)], { agent: a.id })), "no agents seen yet");
}
