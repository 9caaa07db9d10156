// The dashboard's composition root: builds the parts (data source, overview, tabs and
// their panels, dialogs, metric explorer), starts them in the order that gets the first
// chart on screen soonest, routes live events to them, and runs the timers.
// The parts: data-source.js, overview.js, tabs.js, sinks-dlq.js, flags-tab.js,
// dialogs.js, metric-explorer.js, processes.js; window.sidecarDashboard is this object (tests, bench).

import { Api } from "./api.js";
import { ChartManager, uplotFactory } from "./chart-manager.js";
import { DataSource } from "./data-source.js";
import { Dialogs } from "./dialogs.js";
import { DATA_SOURCE_FLAG, FLAG_EVENT, FlagsTab } from "./flags-tab.js";
import { MetricExplorer } from "./metric-explorer.js";
import { EVENT_ROWS, Overview } from "./overview.js";
import * as P from "./panels.js";
import { ProcessesTab } from "./processes.js";
import { SessionTracker } from "./session-tracker.js";
import { DlqTab, SinksTab } from "./sinks-dlq.js";
import { Tabs } from "./tabs.js";

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
    this.overview = new Overview({ $, doc, win, api });
    this.source = new DataSource({ $, win, api, banner, recentRows: EVENT_ROWS,
      onEvents: (events) => this.onEvents(events),
      onRecent: (events) => { this.overview.showRecent(events); this.tracker.ingest(events); } });
    this.sinks = new SinksTab({ $, api });
    this.dlq = new DlqTab({ $, win, api, sinks: this.sinks, confirm: (text) => this.dialogs.confirm(text) });
    this.processes = new ProcessesTab({ $, api });
    this.flags = new FlagsTab({ $, api, hasStore: () => Boolean(this.uiConfig?.store), onDataSourceSet: () => this.source.poll() });
    this.tabs = new Tabs({ $, doc, win,
      panels: { sinks: () => this.sinks.load(), dlq: () => this.dlq.load(), flags: () => this.flags.refresh(),
        sessions: () => P.fillSessions($("sessions"), $("agents"), this.tracker),
        processes: () => this.processes.load() },
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
    this.every(1000, () => this.overview.tick());
    this.every(2000, () => this.overview.refreshStatus());
    this.every(5000, () => this.source.poll());
    this.every(2000, () => this.tabs.refresh());
    this.overview.refreshStatus();
    this.win.sidecarDashboard = this; // for tests and benchmarks
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
    this.overview.add(events);
    this.tracker.ingest(events);
    for (const e of events) {
      if (e.name !== FLAG_EVENT) continue;
      if (e.data?.flag === DATA_SOURCE_FLAG) this.source.poll();
      this.win.setTimeout(() => this.flags.loadAudit(), 300); // once the store has it
    }
    this.source.showStats();
  }
}
