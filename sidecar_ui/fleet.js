// The Fleet tab: every agent seen in `sidecar_agent.heartbeat` events (agent/heartbeat.py),
// one row each: live or stale (no heartbeat for 3 of its intervals), last seen, events/s
// in and out, events lost, DLQ, breakers, version. It works from any live source (a
// collector's stream, Supabase Realtime) plus the last hour of heartbeats from history.
// Picking an agent filters the other tabs by agent_id; picking it again shows all.

import * as P from "./panels.js";

export const HEARTBEAT_EVENT = "sidecar_agent.heartbeat";
export const STALE_INTERVALS = 3;

// The newest heartbeat of each agent. Pure state: no DOM.
export class Fleet {
  constructor({ now = () => Date.now() / 1000 } = {}) {
    this.now = now;
    this.agents = new Map(); // agent_id -> its newest heartbeat event
  }

  // Takes any events; keeps the newest heartbeat per agent. True when something changed.
  ingest(events) {
    let changed = false;
    for (const e of events) {
      if (e.name !== HEARTBEAT_EVENT || !e.agent_id) continue;
      const had = this.agents.get(e.agent_id);
      if (!had || e.ts > had.ts) {
        this.agents.set(e.agent_id, e);
        changed = true;
      }
    }
    return changed;
  }

  // One summary per agent, sorted by id.
  list() {
    const now = this.now();
    return [...this.agents.values()].map((e) => {
      const d = e.data || {};
      const interval = Number(d.interval_s) || 30;
      return {
        id: e.agent_id, last: e.ts, stale: now - e.ts > STALE_INTERVALS * interval, interval,
        version: d.version || "", inRate: d.events_in_per_s ?? null, outRate: d.events_out_per_s ?? null,
        lost: d.lost ?? 0, losses: d.losses || {}, dlq: d.dlq_depth ?? 0, breakers: d.breakers || {},
      };
    }).sort((a, b) => a.id.localeCompare(b.id));
  }

  // The fleet's totals for the agentless overview's cards.
  totals() {
    const all = this.list();
    return { agents: all.length, stale: all.filter((a) => a.stale).length,
      lost: all.reduce((n, a) => n + a.lost, 0), dlq: all.reduce((n, a) => n + a.dlq, 0) };
  }
}

function breakerCell(breakers) {
  const entries = Object.entries(breakers);
  const open = entries.filter(([, s]) => s !== "closed");
  const text = entries.length ? (open.length ? open.map(([n, s]) => `${n}: ${s}`).join(", ") : "all closed") : "–";
  return P.cell(text, open.length ? "bad" : "");
}

export class FleetTab {
  // `selected()`: the agent the page is filtered by (or null); `onPick(id)` changes it.
  constructor({ $, doc, fleet, selected, onPick }) {
    Object.assign(this, { $, doc, fleet, selected, onPick });
  }

  load() {
    const agents = this.fleet.list();
    const pick = this.selected();
    const rows = agents.map((a) => {
      const button = this.doc.createElement("button");
      button.textContent = a.id === pick ? "show all" : "filter";
      button.addEventListener("click", () => this.onPick(a.id === pick ? null : a.id));
      const tr = P.row([a.id, P.cell(a.stale ? "stale" : "live", a.stale ? "bad" : "good"), P.time(a.last),
        a.inRate == null ? "–" : a.inRate.toFixed(1), a.outRate == null ? "–" : a.outRate.toFixed(1),
        P.cell(P.num(a.lost), a.lost ? "bad" : ""), P.num(a.dlq), breakerCell(a.breakers), a.version, button],
      { agent: a.id, state: a.stale ? "stale" : "live" });
      tr.classList.toggle("on", a.id === pick);
      return tr;
    });
    P.fill(this.$("fleet"), rows, "no agent heartbeats seen yet (agents send one every [agent] heartbeat_s)");
    const stale = agents.filter((a) => a.stale).length;
    P.setStatus(this.$("fleet-status"), `${agents.length} agents seen, ${stale} stale` + (pick ? `; showing ${pick} only` : ""));
  }
}
