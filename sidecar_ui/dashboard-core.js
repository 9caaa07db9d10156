// The dashboard's composition root: builds the parts (data source, overview, tabs and
// their panels, dialogs, metric explorer), starts them in the order that gets the first
// chart on screen soonest, routes live events to them, and runs the timers.
// The parts: data-source.js, overview.js, tabs.js, sinks-dlq.js, flags-tab.js,
// dialogs.js, metric-explorer.js, processes.js, fleet.js; window.sidecarDashboard is this object (tests, bench).
// A page with <meta name="sidecar-config" content="FILE"> (`sidecar-agent dashboard export`)
// runs agentless: its config comes from FILE, its data from Supabase only.

import { Api } from "./api.js";
import { ChartManager, uplotFactory } from "./chart-manager.js";
import { DataSource } from "./data-source.js";
import { Dialogs } from "./dialogs.js";
import { Fleet, FleetTab, HEARTBEAT_EVENT } from "./fleet.js";
import { DATA_SOURCE_FLAG, FLAG_EVENT, FlagsTab } from "./flags-tab.js";
import { MetricExplorer } from "./metric-explorer.js";
import { EVENT_ROWS, Overview } from "./overview.js";
import * as P from "./panels.js";
import { ProcessesTab } from "./processes.js";
import { SessionTracker } from "./session-tracker.js";
import { DlqTab, SinksTab } from "./sinks-dlq.js";
import { Tabs } from "./tabs.js";

const RECENT_KEPT = 500; // the newest events of every agent, to redraw the table when the agent filter changes
// Tabs that read the agent's own API: an agentless page has none of them.
const AGENT_TABS = ["metrics", "sinks", "dlq", "flags", "processes"];

export class Dashboard {
  constructor(doc = document, win = window) {
    this.doc = doc;
    this.win = win;
    const $ = (this.$ = (id) => doc.getElementById(id));
    const banner = (text) => this.banner(text);
    this.dialogs = new Dialogs($);
    this.api = new Api({ storage: win.sessionStorage, askToken: () => this.dialogs.askToken() });
    const api = this.api;
    this.tracker = new SessionTracker();
    this.agentless = doc.querySelector('meta[name="sidecar-config"]')?.content || null;
    this.fleet = new Fleet();
    this.agentFilter = null; // the agent picked in the Fleet tab: the other tabs show only its events
    this.recent = []; // newest first, every agent
    this.overview = new Overview({ $, doc, win, api });
    this.source = new DataSource({ $, win, api, banner, recentRows: EVENT_ROWS,
      onEvents: (events) => this.onEvents(events),
      onRecent: (events) => this.onRecent(events) });
    this.sinks = new SinksTab({ $, api });
    this.dlq = new DlqTab({ $, win, api, sinks: this.sinks, confirm: (text) => this.dialogs.confirm(text) });
    this.processes = new ProcessesTab({ $, api });
    this.fleetTab = new FleetTab({ $, doc, fleet: this.fleet, selected: () => this.agentFilter, onPick: (id) => this.pick(id) });
    this.flags = new FlagsTab({ $, api, hasStore: () => Boolean(this.uiConfig?.store), onDataSourceSet: () => this.source.poll() });
    this.tabs = new Tabs({ $, doc, win,
      panels: { sinks: () => this.sinks.load(), dlq: () => this.dlq.load(), flags: () => this.flags.refresh(),
        sessions: () => P.fillSessions($("sessions"), $("agents"), this.trackerView()),
        processes: () => this.processes.load(), fleet: () => this.fleetTab.load() },
      onShow: (tab) => this.explorer?.setVisible(tab === "metrics") });
    this.explorer = null;
    this.charts = null;
    this.timers = [];
  }

  // The live source's adapter (its `stats` count duplicates and which source was first).
  get adapter() { return this.source.adapter; }
  get uiConfig() { return this.source.uiConfig; }
  get tab() { return this.tabs.current; }

  async start() {
    this.$("agent-filter").addEventListener("click", () => this.pick(null));
    if (this.agentless) return this.startAgentless(this.agentless);
    this.tabs.bind();
    this.dlq.bind();
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
    const $ = this.$;
    this.explorer = new MetricExplorer({ doc: this.doc, win: this.win, api: this.api, charts, fmt: P.value, els: {
      list: $("metric-list"), filter: $("metric-filter"), charts: $("metric-charts"), status: $("metric-status"),
      tags: $("metric-tags"), agg: $("metric-agg"), ranges: $("metric-ranges"),
    } });
    this.explorer.setVisible(this.tab === "metrics");
    await this.explorer.start(names); // returns once its series are requested, not loaded
    const { default: uPlot } = await import("./vendor/uplot/uPlot.esm.min.js");
    this.charts = new ChartManager({ createPlot: uplotFactory(uPlot), requestFrame: (cb) => this.win.requestAnimationFrame(cb) });
    chartsReady(this.charts);
    this.overview.setCharts(this.charts);
    const cfg = await uiConfig;
    $("agent-id").textContent = cfg.agent_id || "";
    if (cfg.store) this.overview.backfillRate();
    this.source.uiConfig = cfg; // before the tab refresh: the flags' audit trail needs it
    this.tabs.refresh();
    await this.source.connect(cfg);
    this.loadFleet();
    this.every(1000, () => this.overview.tick());
    this.every(2000, () => this.overview.refreshStatus());
    this.every(5000, () => this.source.poll());
    this.every(2000, () => this.tabs.refresh());
    this.overview.refreshStatus();
    this.win.sidecarDashboard = this; // for tests and benchmarks
  }

  // Agentless (an exported page): the config from `path`, live data and history from
  // Supabase only; the tabs that need an agent are removed, the cards come from the fleet.
  async startAgentless(path) {
    this.tabs.remove(AGENT_TABS);
    this.tabs.bind();
    const res = await this.win.fetch(path, { cache: "no-store" });
    if (!res.ok) throw new Error(`cannot read ${path}: ${res.status}`);
    const cfg = { ...(await res.json()), data_source: "supabase", agentless: true, store: false };
    const { default: uPlot } = await import("./vendor/uplot/uPlot.esm.min.js");
    this.charts = new ChartManager({ createPlot: uplotFactory(uPlot), requestFrame: (cb) => this.win.requestAnimationFrame(cb) });
    this.overview.setCharts(this.charts);
    this.$("agent-id").textContent = `Supabase: ${cfg.supabase?.table || "monitoring_events"}`;
    this.source.uiConfig = cfg;
    await this.source.connect(cfg);
    this.loadFleet();
    this.every(1000, () => this.overview.tick());
    this.every(2000, () => { this.fleetCards(); this.tabs.refresh(); });
    this.win.sidecarDashboard = this;
  }

  // The last hour of heartbeats from history; live ones follow through onEvents.
  loadFleet() {
    this.source.named(HEARTBEAT_EVENT, Date.now() / 1000 - 3600)
      .then((events) => { if (this.fleet.ingest(events)) this.tabs.refresh(); })
      .catch((err) => P.setStatus(this.$("fleet-status"), `cannot load heartbeats: ${err.message}`, "error"));
  }

  // The overview's cards without an agent: the whole fleet's losses and DLQ, from heartbeats.
  fleetCards() {
    const t = this.fleet.totals();
    this.$("lost").textContent = P.num(t.lost);
    this.$("lost").classList.toggle("bad", t.lost > 0);
    this.$("dlq-pending").textContent = P.num(t.dlq);
    const health = this.$("health");
    health.textContent = t.agents ? `${t.agents} agents, ${t.stale} stale` : "no heartbeats";
    health.className = `figure ${t.stale ? "warn" : t.agents ? "good" : ""}`;
    // The losses table: each agent's ledger at its last heartbeat (the second column names the agent).
    const losses = this.$("losses");
    losses.tHead.rows[0].cells[1].textContent = "agent";
    const rows = this.fleet.list().flatMap((a) => Object.entries(a.losses).filter(([, n]) => n)
      .map(([reason, n]) => P.row([reason, a.id, P.num(n)])));
    P.fill(losses, rows, "nothing lost");
  }

  shows(e) { return !this.agentFilter || e.agent_id === this.agentFilter; }

  // Picks the agent the other tabs show (null: every agent), and redraws what it changes.
  pick(id) {
    this.agentFilter = id;
    const button = this.$("agent-filter");
    button.hidden = !id;
    button.textContent = id ? `agent: ${id} ✕` : "";
    this.overview.showRecent(this.recent.filter((e) => this.shows(e)).slice(0, EVENT_ROWS));
    this.tabs.refresh();
  }

  // The Sessions tab's view of the tracker, narrowed to the picked agent.
  trackerView() {
    const t = this.tracker;
    const id = this.agentFilter;
    if (!id) return t;
    return { activeSessions: () => t.activeSessions().filter((s) => s.agent === id),
      agentList: () => t.agentList().filter((a) => a.id === id) };
  }

  keep(newestFirst) {
    this.recent = newestFirst.concat(this.recent).slice(0, RECENT_KEPT);
  }

  onRecent(events) {
    this.keep(events);
    this.fleet.ingest(events);
    this.overview.showRecent(events.filter((e) => this.shows(e)));
    this.tracker.ingest(events);
  }

  every(ms, fn) { this.timers.push(this.win.setInterval(fn, ms)); }

  banner(text) {
    const b = this.$("banner");
    b.textContent = text || "";
    b.hidden = !text;
  }

  // Each live event once (the adapter de-duplicates): to the overview, the sessions, and
  // a flag change to the flag audit trail and, for the data source flag, a live switch.
  onEvents(events) {
    this.keep(events.slice().reverse());
    if (this.fleet.ingest(events) && this.tab === "fleet") this.fleetTab.load();
    this.overview.add(this.agentFilter ? events.filter((e) => this.shows(e)) : events);
    this.tracker.ingest(events);
    for (const e of events) {
      if (e.name !== FLAG_EVENT) continue;
      if (e.data?.flag === DATA_SOURCE_FLAG) this.source.poll();
      this.win.setTimeout(() => this.flags.loadAudit(), 300); // once the store has it
    }
    this.source.showStats();
  }
}
