// First page: agent status every 2 s and the newest events live over /api/v1/stream.
const MAX_ROWS = 50;
const $ = (id) => document.getElementById(id);
const fmt = new Intl.NumberFormat();

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

async function refreshStatus() {
  try {
    const res = await fetch("/api/v1/status");
    const s = await res.json();
    $("agent-id").textContent = `${s.agent_id} · v${s.version}`;
    $("committed").textContent = fmt.format(s.intake.committed);
    const lost = Object.values(s.losses).reduce((a, b) => a + b, 0);
    $("lost").textContent = fmt.format(lost);
    $("lost").classList.toggle("bad", lost > 0);
    $("backlog").textContent = s.journal ? fmt.format(s.journal.rows) : "–";
    $("dlq").textContent = fmt.format(s.dlq.pending_events);
    const body = $("sinks").tBodies[0];
    body.replaceChildren();
    for (const k of s.sinks) {
      const tr = document.createElement("tr");
      tr.append(cell(k.name), cell(k.state, k.state === "ok" || k.state === "idle" ? "" : "bad"),
        cell(fmt.format(k.sent)), cell(fmt.format(k.lag_events)), cell(fmt.format(k.dlq_pending)),
        cell(k.last_error || ""));
      body.append(tr);
    }
    if (!s.sinks.length) {
      const tr = document.createElement("tr");
      const td = cell("no sinks configured", "empty");
      td.colSpan = 6;
      tr.append(td);
      body.append(tr);
    }
  } catch (err) {
    $("agent-id").textContent = `status unavailable: ${err}`;
  }
}

function addEvents(events) {
  const body = $("events").tBodies[0];
  const placeholder = body.querySelector(".placeholder");
  if (placeholder) placeholder.remove();
  for (const e of events.slice(-MAX_ROWS)) {
    const tr = document.createElement("tr");
    tr.dataset.id = e.id;
    const tags = Object.entries(e.tags || {}).map(([k, v]) => `${k}=${v}`).join(" ");
    tr.append(cell(new Date(e.ts * 1000).toLocaleTimeString()), cell(e.name), cell(e.kind),
      cell(e.value == null ? "" : String(e.value)), cell(e.source), cell(tags));
    body.prepend(tr);
  }
  while (body.rows.length > MAX_ROWS) body.deleteRow(body.rows.length - 1);
}

function connect(delay = 500) {
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/api/v1/stream`);
  ws.onopen = () => { $("conn").textContent = "live"; $("conn").classList.add("live"); delay = 500; };
  ws.onmessage = (m) => {
    const msg = JSON.parse(m.data);
    if (msg.type === "events") addEvents(msg.events);
  };
  ws.onclose = () => {
    $("conn").textContent = "reconnecting…";
    $("conn").classList.remove("live");
    setTimeout(() => connect(Math.min(delay * 2, 10000)), delay);
  };
}

refreshStatus();
setInterval(refreshStatus, 2000);
connect();
