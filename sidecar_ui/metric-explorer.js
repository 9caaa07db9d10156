// The metric explorer: pick names (one chart each), tag filters, an aggregation and a
// range. Charts come from /api/v1/series and stay live on every range by re-reading
// their newest buckets from the server at a pace set by the step: the server does the
// aggregating, so count, sum and p99 stay right and no event is counted twice.
// The choice lives in the URL (#metrics?names=a&names=b&range=3600&agg=p95&tags=k%3Dv), so
// a view can be bookmarked or shared.
// The default aggregation ("auto", stored as avg) fits each metric: a counter is charted as
// its rate, a histogram as its p99, a Prometheus `_bucket` series as a percentile estimated
// from its `le` buckets (never averaged across them), anything else as its average.

export const RANGES = [300, 3600, 86400, 604800];
export const AGGS = ["avg", "sum", "min", "max", "count", "rate", "p50", "p90", "p95", "p99"];
const PERCENTILES = { p50: 0.5, p90: 0.9, p95: 0.95, p99: 0.99 };
// How the choices read in the select; the default one is the per-kind choice.
const AGG_LABELS = { avg: "auto (by kind)" };
const AUTO_HINT = "auto: rate for counters, p99 for histograms, a percentile from le buckets, avg otherwise";
export const MAX_CHARTS = 8;
const DEFAULTS = { names: [], range: 3600, agg: "avg", tags: "" };

// The explorer's state from a location hash ("#metrics?..."); bad values fall back to defaults.
export function parseState(hash) {
  const q = new URLSearchParams((hash || "").split("?")[1] || "");
  const range = Number(q.get("range"));
  const agg = q.get("agg");
  // One `names` parameter per metric, so a name may hold a comma.
  const names = q.getAll("names").map((n) => n.trim()).filter(Boolean);
  return {
    names: [...new Set(names)].slice(0, MAX_CHARTS),
    range: RANGES.includes(range) ? range : DEFAULTS.range,
    agg: AGGS.includes(agg) ? agg : DEFAULTS.agg,
    tags: q.get("tags") || "",
  };
}

export function formatState({ names, range, agg, tags }) {
  const q = new URLSearchParams();
  for (const n of names) q.append("names", n);
  if (range !== DEFAULTS.range) q.set("range", String(range));
  if (agg !== DEFAULTS.agg) q.set("agg", agg);
  if (tags.trim()) q.set("tags", tags.trim());
  const s = q.toString();
  return s ? `#metrics?${s}` : "#metrics";
}

// "k=v, k2=v2" -> {tags: {k: "v", k2: "v2"}} or {error: "..."} naming the bad part.
export function parseTags(text) {
  const tags = {};
  for (const raw of (text || "").split(",")) {
    const part = raw.trim();
    if (!part) continue;
    const eq = part.indexOf("=");
    const k = eq > 0 ? part.slice(0, eq).trim() : "";
    const v = eq > 0 ? part.slice(eq + 1).trim() : "";
    if (!k || !v) return { error: `tag filter "${part}" is not key=value` };
    tags[k] = v;
  }
  return { tags };
}

// A Prometheus-style histogram bucket series: its values are per `le` bound.
export function isBucketSeries(entry) {
  return Boolean(entry) && entry.name.endsWith("_bucket") && (entry.tag_keys || []).includes("le");
}

// What a chart asks the agent for, from the chosen aggregation and the metric's catalogue
// entry: {agg, q?, label}. Bucket series always get a quantile (an average, sum or rate
// across `le` bounds means nothing); the default choice becomes rate for counters and
// p99 for histograms.
export function seriesAgg(agg, entry) {
  if (isBucketSeries(entry)) {
    if (agg === "count") return { agg, label: agg };
    const p = agg in PERCENTILES ? agg : "p99";
    return { agg: "quantile", q: PERCENTILES[p], label: p };
  }
  if (agg === "avg" && entry?.kind === "counter") return { agg: "rate", label: "rate" };
  if (agg === "avg" && entry?.kind === "histogram") return { agg: "p99", label: "p99" };
  return { agg, label: agg };
}

// Where the data in a chart begins, when the range before it is empty for longer than
// `minLead` seconds (a fresh agent's 1h range): the time of the first bucket with a value,
// else null. The chart marks it, so the empty part is not read as zeros or as an outage; a
// lead no longer than a bridged gap is just a sparse metric's first sample falling late.
export function dataBegins({ t, v }, minLead = 0) {
  const i = v.findIndex((x) => x != null);
  return i > 0 && t[i] - t[0] > minLead ? t[i] : null;
}

// "14:05" (or "Nov 29 14:05" on ranges longer than a day), in local time.
export function clockLabel(ts, range) {
  const d = new Date(ts * 1000);
  const hm = `${String(d.getHours()).padStart(2, "0")}:${String(d.getMinutes()).padStart(2, "0")}`;
  if (range <= 86400) return hm;
  return `${d.toLocaleString("en", { month: "short" })} ${d.getDate()} ${hm}`;
}

// How often a chart re-reads its newest buckets: a quarter of a step, between 1 s and 30 s.
export function refreshMs(step) {
  return Math.min(30000, Math.max(1000, Math.round((step * 1000) / 4)));
}

// The newest buckets re-read from the server replace the chart's from their first one
// on; buckets that slid out of the range (older than `windowStart`) are dropped.
export function mergeTail(series, tail, windowStart) {
  const cut = tail.t.length ? tail.t[0] : Infinity;
  const t = [];
  const v = [];
  for (let i = 0; i < series.t.length; i++) {
    if (series.t[i] >= cut) break;
    if (series.t[i] >= windowStart) { t.push(series.t[i]); v.push(series.v[i]); }
  }
  for (let i = 0; i < tail.t.length; i++) { t.push(tail.t[i]); v.push(tail.v[i]); }
  return { t, v };
}

// What the chart draws: empty buckets inside a short gap (at most `maxGap` seconds between
// the values around it) are left out so the line joins across them; a longer gap keeps
// its empty buckets and the line breaks there. A metric sampled every 10 s on the 5m
// range (1 s steps) is a line, and an outage still shows as one.
export function bridgeShortGaps({ t, v }, maxGap) {
  const ot = [];
  const ov = [];
  let prev = -1; // index of the previous bucket with a value
  for (let i = 0; i < t.length; i++) {
    if (v[i] == null) continue;
    if (prev >= 0 && i - prev > 1 && t[i] - t[prev] > maxGap) { ot.push(t[prev + 1]); ov.push(null); }
    ot.push(t[i]); ov.push(v[i]);
    prev = i;
  }
  return { t: ot, v: ov };
}

export function gapToBridge(step) {
  return Math.max(3 * step, 30);
}

// The last bucket with a value, for the chart's caption.
export function lastValue(v) {
  for (let i = v.length - 1; i >= 0; i--) if (v[i] != null) return v[i];
  return null;
}

export class MetricExplorer {
  // `els`: {list, filter, charts, status, tags, agg, ranges}; `charts`: a ChartManager or
  // a promise of one (the chart library may still be loading when the first series is asked for).
  constructor({ doc, win, api, charts, els, fmt = (x) => String(x) }) {
    Object.assign(this, { doc, win, api, els, fmt });
    this.charts = null;
    this.chartsReady = Promise.resolve(charts).then((cm) => { this.charts = cm; return cm; });
    this.catalogue = [];
    this.state = parseState(win.location.hash);
    this.series = new Map(); // name -> {step, level, tags, timer, data: {t, v}, readAt}
    this.generation = 0;
    this.visible = false;
  }

  // Load the catalogue (a promise for /api/v1/names may be passed in, already under way).
  async start(names = null) {
    this.bindControls();
    try {
      const { names: all } = await (names || this.api.get("/api/v1/names"));
      this.catalogue = all.filter((n) => n.kind !== "event");
    } catch (err) {
      this.setStatus(`metrics unavailable: ${err.message}`, "error");
      return;
    } finally {
      this.started = true; // from here on, showing the tab adopts or writes the hash
    }
    if (!this.catalogue.length) {
      this.setStatus("no metrics recorded yet: they appear here once a source or record() sends one");
    }
    const known = new Set(this.catalogue.map((n) => n.name));
    const missing = this.state.names.filter((n) => !known.has(n));
    this.notice = missing.length ? `not recorded by this agent: ${missing.join(", ")}` : "";
    this.state.names = this.state.names.filter((n) => known.has(n));
    if (!this.state.names.length && this.catalogue.length) this.state.names = [this.catalogue[0].name];
    this.renderControls();
    if (this.visible) this.writeHash();
    this.reloadAll();
  }

  // The metrics tab was shown or hidden. A hash with a choice in it (a bookmark, the back
  // button) is adopted; a bare "#metrics" gets the current choice written back.
  setVisible(visible) {
    this.visible = visible;
    if (!visible || !this.started) return;
    const hash = this.win.location.hash;
    if (hash.includes("?") && formatState(parseState(hash)) !== formatState(this.state)) {
      this.state = parseState(hash);
      this.renderControls();
      this.reloadAll();
      return;
    }
    this.writeHash();
    for (const name of this.state.names) this.schedule(name);
  }

  setStatus(text, kind = "") {
    const el = this.els.status;
    el.textContent = text;
    el.className = `status ${kind}`;
    el.hidden = !text;
  }

  bindControls() {
    const { filter, tags, agg, ranges } = this.els;
    filter.addEventListener("input", () => this.applyFilter());
    agg.addEventListener("change", () => this.update({ agg: agg.value }));
    tags.addEventListener("change", () => this.update({ tags: tags.value }));
    for (const b of ranges.querySelectorAll("button")) {
      b.addEventListener("click", () => this.update({ range: Number(b.dataset.range) }));
    }
  }

  update(change) {
    Object.assign(this.state, change);
    this.renderControls();
    this.writeHash();
    this.reloadAll();
  }

  writeHash() {
    const want = formatState(this.state);
    if (this.win.location.hash !== want) this.win.history.replaceState(null, "", want);
  }

  renderControls() {
    const { list, tags, agg, ranges } = this.els;
    if (agg.options.length !== AGGS.length) {
      agg.replaceChildren(...AGGS.map((a) => {
        const o = this.doc.createElement("option");
        o.value = a;
        o.textContent = AGG_LABELS[a] || a;
        if (a === "avg") o.title = AUTO_HINT;
        return o;
      }));
    }
    agg.value = this.state.agg;
    tags.value = this.state.tags;
    for (const b of ranges.querySelectorAll("button")) b.classList.toggle("on", Number(b.dataset.range) === this.state.range);
    const chosen = new Set(this.state.names);
    list.replaceChildren(...this.catalogue.map((n) => {
      const li = this.doc.createElement("li");
      const label = this.doc.createElement("label");
      const box = this.doc.createElement("input");
      box.type = "checkbox";
      box.value = n.name;
      box.checked = chosen.has(n.name);
      box.addEventListener("change", () => this.toggle(n.name, box));
      const kind = this.doc.createElement("span");
      kind.className = "kind muted small";
      kind.textContent = n.kind;
      const text = this.doc.createElement("span");
      text.textContent = n.name;
      label.append(box, text, kind);
      label.title = n.tag_keys?.length ? `tags: ${n.tag_keys.join(", ")}` : "no tags";
      li.append(label);
      li.dataset.name = n.name;
      return li;
    }));
    this.applyFilter();
    const keys = new Set(this.catalogue.filter((n) => chosen.has(n.name)).flatMap((n) => n.tag_keys || []));
    tags.placeholder = keys.size ? [...keys].slice(0, 3).map((k) => `${k}=…`).join(", ") : "no tags on these metrics";
  }

  applyFilter() {
    const needle = this.els.filter.value.trim().toLowerCase();
    for (const li of this.els.list.children) li.hidden = Boolean(needle) && !li.dataset.name.toLowerCase().includes(needle);
  }

  toggle(name, box) {
    const names = this.state.names.filter((n) => n !== name);
    if (box.checked) {
      if (names.length >= MAX_CHARTS) {
        box.checked = false;
        this.setStatus(`at most ${MAX_CHARTS} charts at once: clear one first`, "error");
        return;
      }
      names.push(name);
    }
    this.state.names = names;
    this.writeHash();
    this.reloadAll();
  }

  // Rebuild every chart for the current choice, in the order picked.
  reloadAll() {
    const gen = ++this.generation;
    for (const [name, s] of this.series) { this.win.clearTimeout(s.timer); this.charts?.remove(`metric:${name}`); }
    this.series.clear();
    const parsed = parseTags(this.state.tags);
    if (parsed.error) {
      this.els.charts.replaceChildren();
      this.setStatus(parsed.error, "error");
      return;
    }
    if (this.catalogue.length) this.setStatus(this.notice || (this.state.names.length ? "" : "pick a metric on the left"), this.notice ? "error" : "");
    this.notice = "";
    this.els.charts.replaceChildren(...this.state.names.map((name) => this.figure(name)));
    for (const name of this.state.names) this.load(name, gen, parsed.tags);
  }

  figure(name) {
    const fig = this.doc.createElement("figure");
    fig.className = "metric";
    fig.dataset.name = name;
    const cap = this.doc.createElement("figcaption");
    const title = this.doc.createElement("span");
    title.className = "title";
    title.textContent = `${this.aggOf(name).label}(${name})`;
    const info = this.doc.createElement("span");
    info.className = "info muted small";
    info.textContent = "loading…";
    cap.append(title, " ", info);
    const chart = this.doc.createElement("div");
    chart.className = "chart";
    fig.append(cap, chart);
    return fig;
  }

  figureOf(name) {
    return this.els.charts.querySelector(`figure[data-name="${CSS.escape(name)}"]`);
  }

  aggOf(name) {
    return seriesAgg(this.state.agg, this.catalogue.find((n) => n.name === name));
  }

  query(name, from, to, tags, step = null) {
    const chosen = this.aggOf(name);
    const q = new URLSearchParams({ name, from: String(from), to: String(to), agg: chosen.agg });
    if (chosen.q != null) q.set("q", String(chosen.q));
    if (step) q.set("step", String(step));
    for (const [k, v] of Object.entries(tags)) q.set(`tag.${k}`, v);
    return `/api/v1/series?${q}`;
  }

  async load(name, gen, tags) {
    const fig = this.figureOf(name);
    const now = Date.now() / 1000;
    let s;
    try {
      s = await this.api.get(this.query(name, now - this.state.range, now, tags));
    } catch (err) {
      if (gen !== this.generation) return;
      fig.querySelector(".info").textContent = `cannot load: ${err.message}`;
      fig.querySelector(".info").classList.add("bad");
      return;
    }
    const charts = await this.chartsReady;
    if (gen !== this.generation) return;
    const key = `metric:${name}`;
    const drawn = bridgeShortGaps(s, gapToBridge(s.step));
    const label = `${this.aggOf(name).label}(${name})`;
    const begins = dataBegins(s, gapToBridge(s.step));
    charts.add(key, fig.querySelector(".chart"), {
      label, ...drawn, windowSec: this.state.range + s.step, span: this.state.range, begins, beginsText: this.beginsText(begins),
    });
    this.series.set(name, { step: s.step, level: s.level, tags, timer: null, data: { t: s.t, v: s.v }, readAt: now });
    this.caption(fig, s.t, s.v, s);
    fig.dataset.loaded = name;
    this.firstChart();
    this.schedule(name);
  }

  caption(fig, t, v, s) {
    const points = v.filter((x) => x != null).length;
    const last = lastValue(v);
    const begins = dataBegins({ t, v }, gapToBridge(s.step));
    fig.dataset.last = last == null ? "" : String(last);
    fig.dataset.begins = begins == null ? "" : String(begins);
    const since = begins == null ? "" : ` · ${this.beginsText(begins)}`;
    fig.querySelector(".info").textContent = points
      ? `last ${this.fmt(last)}${since} · ${s.level} level, step ${s.step} s, ${points} of ${t.length} buckets with data`
      : "no data in this range";
  }

  beginsText(begins) {
    return begins == null ? "" : `data begins ${clockLabel(begins, this.state.range)}`;
  }

  // Re-read this chart's newest buckets after a while (only while the tab is shown).
  schedule(name) {
    const s = this.series.get(name);
    if (!s || s.timer || !this.visible) return;
    const gen = this.generation;
    s.timer = this.win.setTimeout(() => { s.timer = null; this.refresh(name, gen); }, refreshMs(s.step));
  }

  async refresh(name, gen) {
    const s = this.series.get(name);
    if (!s || s.reading || !this.charts?.has(`metric:${name}`) || gen !== this.generation) return;
    s.reading = true; // one re-read at a time per chart: an older answer never lands last
    const now = Date.now() / 1000;
    // From the last read (the tab may have been hidden a while), two steps back (at least
    // 10 s), which covers events that reached the store a little late.
    const from = Math.max(now - this.state.range, s.readAt - Math.max(2 * s.step, 10));
    try {
      const tail = await this.api.get(this.query(name, from, now, s.tags, s.step));
      if (gen !== this.generation) return;
      const merged = mergeTail(s.data, tail, now - this.state.range - s.step);
      s.data = merged;
      s.readAt = now;
      const drawn = bridgeShortGaps(merged, gapToBridge(s.step));
      this.charts.replace(`metric:${name}`, drawn.t, drawn.v);
      const begins = dataBegins(merged, gapToBridge(s.step));
      this.charts.mark(`metric:${name}`, begins, this.beginsText(begins));
      const fig = this.figureOf(name);
      if (fig) this.caption(fig, merged.t, merged.v, s);
    } catch { /* the next refresh tries again; the chart keeps what it has */ }
    s.reading = false;
    this.schedule(name);
  }

  // The first chart's paint, for the navigation benchmark (the next frame is the paint).
  firstChart() {
    const perf = this.win.performance;
    if (perf && !perf.getEntriesByName("first-chart").length) {
      this.win.requestAnimationFrame(() => { if (!perf.getEntriesByName("first-chart").length) perf.mark("first-chart"); });
    }
  }
}
