// The dashboard's state and wiring: picks the data source from /api/v1/ui-config,
// switches it live when the flag changes, and feeds events to the panels.

import { Api, ApiError } from "./api.js";
import { ChartManager, uplotFactory } from "./chart-manager.js";
import * as P from "./panels.js";
import { RealtimeAdapter, rowToEvent } from "./realtime-adapter.js";
import { SessionTracker, isError } from "./session-tracker.js";
import { createSupabaseClient } from "./supabase-client.js";
import { MetricExplorer } from "./metric-explorer.js";

const MAX_ROWS = 50;
const FLAG_EVENT = "sidecar_agent.flag_changed";
const DATA_SOURCE_FLAG = "dashboard.data_source";

export class Dashboard {
  constructor(doc = document, win = window) {
    this.doc = doc;
    this.win = win;
    this.$ = (id) => doc.getElementById(id);
    this.api = new Api({ storage: win.sessionStorage, askToken: (again) => this.askToken(again) });
    this.tracker = new SessionTracker();
    this.uiConfig = null;
    this.adapter = null;
    this.supabase = null;
    this.pending = [];
    this.framePending = false;
    this.second = { n: 0, errors: 0 };
    this.minute = []; // last 60 seconds of [events, errors]
    this.tab = "overview";
    this.timers = [];
  }

  async start() {
    this.bindTabs();
    this.bindControls();
    // Nothing on the way to the first chart waits for anything else: the catalogue and
    // ui-config were requested by the page's preload links before this module ran, and
    // the explorer's series load while the live source connects.
    const names = this.api.get("/api/v1/names");
    names.catch(() => {}); // (its error is shown by the explorer)
    const uiConfig = this.api.get("/api/v1/ui-config").catch((err) => {
      this.banner(`cannot reach the agent: ${err.message}`);
      return { data_source: "websocket", supabase: null, store: false };
    });
    // uPlot is evaluated (~25 ms) only once the first series has been requested, so the
    // request and the evaluation overlap instead of queueing.
    let chartsReady;
    const charts = new Promise((resolve) => { chartsReady = resolve; });
    this.explorer = new MetricExplorer({ doc: this.doc, win: this.win, api: this.api, charts, fmt: P.value, els: {
      list: this.$("metric-list"), filter: this.$("metric-filter"), charts: this.$("metric-charts"), status: this.$("metric-status"),
      tags: this.$("metric-tags"), agg: this.$("metric-agg"), ranges: this.$("metric-ranges"),
    } });
    this.explorer.setVisible(this.tab === "metrics");
    await this.explorer.start(names); // returns once its series are requested, not loaded
    const { default: uPlot } = await import("./vendor/uplot/uPlot.esm.min.js");
    this.charts = new ChartManager({ createPlot: uplotFactory(uPlot), requestFrame: (cb) => this.win.requestAnimationFrame(cb) });
    chartsReady(this.charts);
    this.charts.add("rate", this.$("rate-chart"), { label: "events/s" });
    this.uiConfig = await uiConfig;
    this.$("agent-id").textContent = this.uiConfig.agent_id || "";
    if (this.uiConfig.store) this.backfillRate();
    this.refreshTab();
    await this.connect(this.uiConfig);
    this.every(1000, () => this.tick());
    this.every(2000, () => this.refreshStatus());
    this.every(5000, () => this.pollUiConfig());
    this.every(2000, () => this.refreshTab());
    this.refreshStatus();
    this.win.sidecarDashboard = this; // for tests and benchmarks
  }

  every(ms, fn) { this.timers.push(this.win.setInterval(fn, ms)); }

  banner(text) {
    const b = this.$("banner");
    b.textContent = text || "";
    b.hidden = !text;
  }

  // -- data source ----------------------------------------------------------------

  async connect(cfg) {
    // A live switch keeps the old source running until the new one is live, and the
    // two share one de-duplication window: no event falls into the gap, none shows twice.
    const old = this.adapter;
    const mode = cfg.data_source;
    const badge = this.$("data-source");
    badge.textContent = mode;
    badge.dataset.mode = mode;
    try {
      this.supabase = await createSupabaseClient(cfg);
      const loc = this.win.location;
      this.adapter = new RealtimeAdapter({
        mode,
        seen: old?.seen,
        wsUrl: `${loc.protocol === "https:" ? "wss" : "ws"}://${loc.host}/api/v1/stream`,
        WebSocketImpl: this.win.WebSocket,
        fetchImpl: (...a) => this.win.fetch(...a),
        supabase: this.supabase?.client,
        table: this.supabase?.table,
        schema: this.supabase?.schema,
        onEvents: (events, source) => this.onEvents(events, source),
        onStatus: () => this.showConnection(),
      });
      this.banner("");
      if (old) this.adapter.resumeFrom(Date.now() / 1000 - 1);
      else await this.loadRecent();
      this.adapter.start();
      if (old) this.retire(old, this.adapter);
    } catch (err) {
      if (old) old.stop();
      this.banner(`live data unavailable (${mode}): ${err.message}`);
      this.$("conn").textContent = "offline";
    }
  }

  // Stop the previous source once its successor is live (or after 10 s at the latest).
  retire(old, next) {
    const t0 = Date.now();
    const check = () => {
      if (this.adapter !== next || next.isLive() || Date.now() - t0 > 10000) old.stop();
      else this.win.setTimeout(check, 50);
    };
    check();
  }

  async loadRecent() {
    let events = [];
    try {
      if (this.adapter.mode === "supabase") {
        const { client, table } = this.supabase;
        const { data, error } = await client.from(table).select("*").order("timestamp", { ascending: false }).limit(MAX_ROWS);
        if (error) throw new Error(error.message);
        events = data.map(rowToEvent);
      } else if (this.uiConfig.store) {
        events = (await this.api.get(`/api/v1/events?limit=${MAX_ROWS}`)).events;
      }
    } catch (err) {
      this.banner(`history unavailable: ${err.message}`);
    }
    const body = this.$("events").tBodies[0];
    body.replaceChildren(...events.map(P.eventRow));
    if (!events.length) P.fill(this.$("events"), [], "no events yet: they appear here as they arrive");
    this.adapter.markSeen(events);
    this.tracker.ingest(events);
  }

  showConnection() {
    const st = this.adapter?.status || {};
    const states = Object.entries(st).map(([src, s]) => `${src}: ${s.state}`);
    const conn = this.$("conn");
    const live = Object.values(st).length && Object.values(st).every((s) => s.state === "live");
    conn.textContent = states.join(" · ") || "offline";
    conn.classList.toggle("live", Boolean(live));
  }

  async pollUiConfig() {
    let cfg;
    try { cfg = await this.api.get("/api/v1/ui-config"); } catch { return; }
    const changed = cfg.data_source !== this.uiConfig.data_source
      || JSON.stringify(cfg.supabase) !== JSON.stringify(this.uiConfig.supabase);
    this.uiConfig = cfg;
    if (changed) await this.connect(cfg);
  }

  // -- live events ----------------------------------------------------------------

  onEvents(events, source) {
    for (const e of events) {
      this.second.n++;
      if (isError(e)) this.second.errors++;
      if (e.name === FLAG_EVENT) {
        if (e.data?.flag === DATA_SOURCE_FLAG) this.pollUiConfig();
        this.win.setTimeout(() => this.loadAudit(), 300); // once the store has it
      }
    }
    this.tracker.ingest(events);
    this.pending.push(...events);
    if (!this.framePending) {
      this.framePending = true;
      this.win.requestAnimationFrame(() => this.renderPending());
    }
    const s = this.adapter.stats;
    const stats = this.$("source-stats");
    stats.textContent = `first: ws ${s.firstBy.websocket} · supabase ${s.firstBy.supabase} · duplicates dropped ${s.duplicates}`;
  }

  renderPending() {
    this.framePending = false;
    const batch = this.pending.splice(0).slice(-MAX_ROWS);
    if (!batch.length) return;
    const body = this.$("events").tBodies[0];
    if (body.querySelector("td.empty")) body.replaceChildren();
    const frag = this.doc.createDocumentFragment();
    for (let i = batch.length - 1; i >= 0; i--) frag.append(P.eventRow(batch[i]));
    body.prepend(frag);
    while (body.rows.length > MAX_ROWS) body.deleteRow(body.rows.length - 1);
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

  // -- panels ---------------------------------------------------------------------

  bindTabs() {
    const show = () => {
      const want = (this.win.location.hash || "#overview").slice(1).split("?")[0];
      this.tab = this.$(`tab-${want}`) ? want : "overview";
      for (const sec of this.doc.querySelectorAll("section.tab")) sec.hidden = sec.id !== `tab-${this.tab}`;
      for (const a of this.doc.querySelectorAll("#tabs a")) a.classList.toggle("on", a.dataset.tab === this.tab);
      this.explorer?.setVisible(this.tab === "metrics");
      this.refreshTab();
    };
    this.win.addEventListener("hashchange", show);
    show();
  }

  refreshTab() {
    const t = this.tab;
    if (t === "sinks") this.loadSinks();
    else if (t === "dlq") this.loadDlq();
    else if (t === "flags" && !this.flagsLoaded) this.loadFlags();
    else if (t === "sessions") this.renderSessions();
  }

  bindControls() {
    this.$("dlq-refresh").addEventListener("click", () => this.loadDlq());
    this.$("dlq-replay").addEventListener("click", () => this.replayDlq());
    this.$("dlq-purge").addEventListener("click", () => this.purgeDlq());
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
      const h = await this.win.fetch("/readyz").then((r) => r.json());
      const health = this.$("health");
      health.textContent = h.ready ? "ready" : "not ready";
      health.title = h.problems.join("\n");
      health.className = `figure ${h.ready ? "good" : "bad"}`;
    } catch (err) {
      this.$("health").textContent = "unreachable";
      this.$("health").className = "figure bad";
    }
  }

  async loadSinks() {
    try {
      const { sinks } = await this.api.get("/api/v1/sinks");
      P.fill(this.$("sinks"), sinks.map(P.sinkRow), "no sinks configured");
      P.setStatus(this.$("sinks-status"), "");
      const sel = this.$("dlq-sink");
      const want = ["", ...sinks.map((s) => s.name)];
      if (sel.options.length !== want.length) {
        const cur = sel.value;
        sel.replaceChildren(new Option("all sinks", ""), ...sinks.map((s) => new Option(s.name, s.name)));
        sel.value = cur;
      }
    } catch (err) {
      P.setStatus(this.$("sinks-status"), `cannot load sinks: ${err.message}`, "error");
    }
  }

  dlqQuery() {
    const sink = this.$("dlq-sink").value;
    return sink ? `?sink=${encodeURIComponent(sink)}` : "";
  }

  async loadDlq() {
    if (this.$("dlq-sink").options.length === 1) await this.loadSinks();
    try {
      const body = await this.api.get(`/api/v1/dlq${this.dlqQuery()}`);
      P.fill(this.$("dlq"), body.entries.map(P.dlqRow), "the dead-letter queue is empty");
      this.$("dlq").dataset.pending = String(body.pending_events);
      if (!this.dlqMessage) P.setStatus(this.$("dlq-status"), `${P.num(body.pending_events)} events pending`);
    } catch (err) {
      P.setStatus(this.$("dlq-status"), `cannot load the DLQ: ${err.message}`, "error");
    }
  }

  async replayDlq() {
    try {
      const r = await this.api.mutate("POST", `/api/v1/dlq/replay${this.dlqQuery()}`);
      this.flash("dlq-status", `replay requested for ${r.replaying.join(", ")}`);
    } catch (err) {
      this.flash("dlq-status", `replay failed: ${err.message}`, "error");
    }
    this.loadDlq();
  }

  async purgeDlq() {
    const sink = this.$("dlq-sink").value || "all sinks";
    if (!(await this.confirm(`Purge every pending DLQ entry of ${sink}? Purged events are counted as lost.`))) return;
    try {
      const r = await this.api.mutate("DELETE", `/api/v1/dlq${this.dlqQuery()}`);
      this.flash("dlq-status", `purged ${P.num(r.purged_events)} events`);
    } catch (err) {
      this.flash("dlq-status", `purge failed: ${err.message}`, "error");
    }
    this.loadDlq();
  }

  flash(id, text, kind = "") {
    P.setStatus(this.$(id), text, kind);
    this.dlqMessage = true;
    this.win.setTimeout(() => { this.dlqMessage = false; }, 4000);
  }

  async loadFlags() {
    try {
      const body = await this.api.get("/api/v1/flags");
      const flags = Array.isArray(body) ? body : body.flags;
      P.fill(this.$("flags"), flags.map((f) => P.flagRow(f, (fl, v) => this.setFlag(fl, v), (fl) => this.clearFlag(fl))), "no flags");
      P.setStatus(this.$("flags-status"), "");
      this.flagsLoaded = true;
    } catch (err) {
      P.setStatus(this.$("flags-status"), `cannot load flags: ${err.message}`, "error");
    }
    this.loadAudit();
  }

  async loadAudit() {
    if (!this.uiConfig?.store) return;
    try {
      const { events } = await this.api.get(`/api/v1/events?name=${FLAG_EVENT}&limit=50`);
      P.fill(this.$("flag-audit"), events.map((e) => P.row([P.time(e.ts), e.data?.flag, e.data?.old, e.data?.new, e.data?.actor])), "no changes yet");
    } catch { /* the flag table still works */ }
  }

  showFlagError(text) {
    const el = this.$("flag-error");
    el.textContent = text || "";
    el.hidden = !text;
  }

  async setFlag(flag, value) {
    this.showFlagError("");
    try {
      await this.api.mutate("PUT", `/api/v1/flags/${encodeURIComponent(flag.name)}`, value);
    } catch (err) {
      this.showFlagError(err instanceof ApiError ? err.message : `cannot change ${flag.name}: ${err.message}`);
      return;
    }
    this.flagsLoaded = false;
    await this.loadFlags();
    if (flag.name === DATA_SOURCE_FLAG) this.pollUiConfig();
  }

  async clearFlag(flag) {
    this.showFlagError("");
    try {
      await this.api.mutate("DELETE", `/api/v1/flags/${encodeURIComponent(flag.name)}`);
    } catch (err) {
      this.showFlagError(err.message);
      return;
    }
    this.flagsLoaded = false;
    await this.loadFlags();
  }

  renderSessions() {
    const sessions = this.tracker.activeSessions();
    P.fill(this.$("sessions"), sessions.map((s) => P.row([s.id, P.num(s.count), P.cell(P.num(s.errors), s.errors ? "bad" : ""), P.time(s.first), P.time(s.last)], { session: s.id })), "no active sessions");
    P.fill(this.$("agents"), this.tracker.agentList().map((a) => P.row([a.id, P.time(a.last), P.num(a.count), a.rate.toFixed(1)], { agent: a.id })), "no agents seen yet");
  }

  // -- dialogs ----------------------------------------------------------------------

  dialog(id, prepare) {
    const dlg = this.$(id);
    prepare?.();
    return new Promise((resolve) => {
      dlg.addEventListener("close", () => resolve(dlg.returnValue === "ok"), { once: true });
      dlg.returnValue = "";
      dlg.showModal();
    });
  }

  async askToken() {
    const input = this.$("token-input");
    const ok = await this.dialog("token-dialog", () => { input.value = ""; });
    return ok && input.value ? input.value : null;
  }

  confirm(text) {
    return this.dialog("confirm-dialog", () => { this.$("confirm-text").textContent = text; });
  }
}
