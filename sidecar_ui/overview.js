// The Overview tab: the events/s chart (the last 5 minutes from the history store, then
// counted live), the error rate over the last minute, the status cards (events lost,
// health, DLQ pending), the losses table, and the newest events table, which takes live
// events in batches drawn at most once per animation frame.

import * as P from "./panels.js";
import { isError } from "./session-tracker.js";

export const EVENT_ROWS = 50;

// The health card for a /readyz answer. Ready while a sink lags or fails is "degraded",
// naming the sinks and why, never a green "ready".
export function healthView(h) {
  if (!h.ready) return { text: "not ready", cls: "bad" };
  if (h.status !== "degraded") return { text: "ready", cls: "good" };
  const names = (h.degraded || []).map((d) => `${d.sink} (${d.reasons.join(", ")})`);
  return { text: `degraded: ${names.join(", ")}`, cls: "warn" };
}

// The line under the losses table naming the event names past [agent] max_series_per_name
// (status.series; agent/cardinality.py): their new tag sets were folded into
// {overflow: "true"}, kept, not lost. Null when none overflowed (or an older agent).
export function overflowView(series) {
  const names = Object.entries(series?.overflowed || {});
  if (!names.length) return null;
  const shown = names.slice(0, 5).map(([n, c]) => `${n} (${c.toLocaleString("en")})`);
  const more = names.length > 5 ? ` and ${names.length - 5} more` : "";
  return `past ${series.max_series_per_name} tag sets per hour, events kept with tags {overflow: true}: ` +
    `${shown.join(", ")}${more}`;
}

export class Overview {
  constructor({ $, doc, win, api }) {
    Object.assign(this, { $, doc, win, api });
    this.charts = null;
    this.pending = [];
    this.framePending = false;
    this.second = { n: 0, errors: 0 };
    this.minute = []; // last 60 seconds of [events, errors]
  }

  // The events/s chart, once uPlot is loaded.
  setCharts(charts) {
    this.charts = charts;
    charts.add("rate", this.$("rate-chart"), { label: "events/s" });
  }

  // The first history load (newest first) replaces the table's placeholder.
  showRecent(events) {
    const body = this.$("events").tBodies[0];
    body.replaceChildren(...events.map(P.eventRow));
    if (!events.length) P.fill(this.$("events"), [], "no events yet: they appear here as they arrive");
  }

  add(events) {
    for (const e of events) {
      this.second.n++;
      if (isError(e)) this.second.errors++;
    }
    this.pending.push(...events);
    if (!this.framePending) {
      this.framePending = true;
      this.win.requestAnimationFrame(() => this.renderPending());
    }
  }

  renderPending() {
    this.framePending = false;
    const batch = this.pending.splice(0).slice(-EVENT_ROWS);
    if (!batch.length) return;
    const body = this.$("events").tBodies[0];
    if (body.querySelector("td.empty")) body.replaceChildren();
    const frag = this.doc.createDocumentFragment();
    for (let i = batch.length - 1; i >= 0; i--) frag.append(P.eventRow(batch[i]));
    body.prepend(frag);
    while (body.rows.length > EVENT_ROWS) body.deleteRow(body.rows.length - 1);
  }

  // The events/s chart starts with the last 5 minutes from the history store (every
  // name, counted per second); live counting takes over from the current second.
  async backfillRate() {
    const now = Math.floor(Date.now() / 1000);
    const q = new URLSearchParams({ all: "1", agg: "count", from: String(now - 300), to: String(now), step: "1" });
    try {
      const s = await this.api.get(`/api/v1/series?${q}`);
      s.t.forEach((t, i) => { if (t < now) this.charts.push("rate", t, s.v[i] ?? 0); });
    } catch { /* the chart fills live */ }
  }

  // Every second: the last second's count goes to the chart and the minute's error rate.
  tick() {
    const now = Date.now() / 1000;
    this.charts.push("rate", Math.floor(now), this.second.n);
    this.minute.push([this.second.n, this.second.errors]);
    if (this.minute.length > 60) this.minute.shift();
    this.$("rate").textContent = P.num(this.second.n);
    const [n, err] = this.minute.reduce((a, b) => [a[0] + b[0], a[1] + b[1]], [0, 0]);
    const er = this.$("error-rate");
    er.textContent = n ? `${((100 * err) / n).toFixed(2)} %` : "–";
    er.classList.toggle("bad", n > 0 && err / n > 0.001);
    this.second = { n: 0, errors: 0 };
  }

  // One line after the losses table, made here on first use (index.html needs no change).
  showOverflow(text) {
    let el = this.$("series-overflow");
    if (!el && text) {
      el = this.doc.createElement("p");
      el.id = "series-overflow";
      el.className = "warn small";
      this.$("losses").after(el);
    }
    if (el) {
      el.textContent = text || "";
      el.hidden = !text;
    }
  }

  async refreshStatus() {
    try {
      const s = await this.api.get("/api/v1/status");
      this.$("agent-id").textContent = `${s.agent_id} · v${s.version}`;
      const lost = Object.values(s.losses).reduce((a, b) => a + b, 0);
      this.$("lost").textContent = P.num(lost);
      this.$("lost").classList.toggle("bad", lost > 0);
      this.$("dlq-pending").textContent = P.num(s.dlq.pending_events);
      const l = await this.api.get("/api/v1/losses");
      P.fill(this.$("losses"), l.entries.map((e) => P.row([e.reason, e.sink || "–", P.num(e.count)])), "nothing lost");
      this.showOverflow(overflowView(s.series));
      const h = await this.win.fetch("/readyz").then((r) => r.json());
      const health = this.$("health");
      const view = healthView(h);
      health.textContent = view.text;
      health.title = h.problems.join("\n");
      health.className = `figure ${view.cls}`;
    } catch {
      this.$("health").textContent = "unreachable";
      this.$("health").className = "figure bad";
    }
  }
}
