// Time-series charts: points are appended as they arrive and drawn at most once per
// animation frame per chart, whatever the event rate. The plotting library is injected
// (`createPlot(target, series, data) -> {setData(data), destroy()}`), so this module
// runs under `node --test`; the page passes a uPlot factory.

export class ChartManager {
  constructor({ createPlot, requestFrame, windowSec = 300, maxPoints = 3000, now = () => Date.now() / 1000 } = {}) {
    this.createPlot = createPlot;
    this.requestFrame = requestFrame || ((cb) => setTimeout(cb, 16));
    this.windowSec = windowSec;
    this.maxPoints = maxPoints;
    this.now = now;
    this.charts = new Map(); // key -> {plot, t: [], v: [], dirty}
    this.frameRequested = false;
    this.frames = 0;
    this.draws = 0;
  }

  // Create (or replace) the chart `key` in `target` with optional history. `windowSec`
  // overrides the manager's window for this chart; `span` (seconds) fixes its x axis to
  // the last `span` seconds (the explorer's range) instead of the data's extent.
  // `begins` (epoch s, optional): where the chart's data begins, marked on it (see mark()).
  add(key, target, { label = key, t = [], v = [], windowSec = null, span = null, begins = null, beginsText = "" } = {}) {
    this.remove(key);
    const chart = { t: t.slice(), v: v.slice(), dirty: false, plot: null, windowSec };
    chart.meta = span ? { label, span } : { label };
    if (begins != null) Object.assign(chart.meta, { begins, beginsText });
    chart.plot = this.createPlot(target, chart.meta, [chart.t, chart.v]);
    this.charts.set(key, chart);
    this.draws++;
    return chart;
  }

  has(key) { return this.charts.has(key); }

  remove(key) {
    const c = this.charts.get(key);
    if (c) { c.plot.destroy(); this.charts.delete(key); }
  }

  // Append one point; the chart redraws on the next frame. Out-of-order points are
  // inserted in place so the x axis stays sorted (uPlot requires it).
  push(key, ts, value) {
    const c = this.charts.get(key);
    if (!c) return false;
    const n = c.t.length;
    if (n === 0 || ts >= c.t[n - 1]) {
      c.t.push(ts); c.v.push(value);
    } else {
      let i = n - 1;
      while (i > 0 && c.t[i - 1] > ts) i--;
      c.t.splice(i, 0, ts); c.v.splice(i, 0, value);
    }
    c.dirty = true;
    this._schedule();
    return true;
  }

  // Replace a chart's data (a refreshed series); it redraws on the next frame.
  replace(key, t, v) {
    const c = this.charts.get(key);
    if (!c) return false;
    c.t = t.slice(); c.v = v.slice();
    c.dirty = true;
    this._schedule();
    return true;
  }

  // Mark where a chart's data begins (null: it fills the range); the plot reads its meta
  // on every draw, so it redraws on the next frame.
  mark(key, begins, beginsText = "") {
    const c = this.charts.get(key);
    if (!c) return false;
    if (c.meta.begins === begins && c.meta.beginsText === beginsText) return true;
    Object.assign(c.meta, { begins, beginsText });
    c.dirty = true;
    this._schedule();
    return true;
  }

  data(key) {
    const c = this.charts.get(key);
    return c ? { t: c.t, v: c.v } : null;
  }

  _schedule() {
    if (this.frameRequested) return;
    this.frameRequested = true;
    this.requestFrame(() => this.flush());
  }

  // Trim to the window and the point cap, then hand each changed chart its data once.
  flush() {
    this.frameRequested = false;
    this.frames++;
    const now = this.now();
    for (const c of this.charts.values()) {
      if (!c.dirty) continue;
      const cutoff = now - (c.windowSec ?? this.windowSec);
      let drop = 0;
      while (drop < c.t.length && c.t[drop] < cutoff) drop++;
      drop = Math.max(drop, c.t.length - this.maxPoints);
      if (drop > 0) { c.t.splice(0, drop); c.v.splice(0, drop); }
      c.plot.setData([c.t, c.v]);
      c.dirty = false;
      this.draws++;
    }
  }

  destroy() { for (const k of [...this.charts.keys()]) this.remove(k); }
}

// The x range uPlot should show: the data's, but never less than the last minute (with no
// points or only one, uPlot would otherwise stretch the time axis over years).
export function minuteAtLeast(u, min, max, now = Date.now() / 1000) {
  if (min == null || max == null || !Number.isFinite(min) || !Number.isFinite(max)) return [now - 60, now];
  return max - min < 60 ? [max - 60, max + 1] : [min, max];
}

// Y axis labels that fit: 402433000 -> "402M", 0.0412 -> "0.0412".
// Made on first use: a NumberFormat costs ~15 ms the first time (locale data), which
// should not sit between the page's scripts arriving and the first request.
let compactFmt = null;
export function compact(x) {
  compactFmt ??= new Intl.NumberFormat(undefined, { notation: "compact", maximumSignificantDigits: 3 });
  return x == null ? "" : compactFmt.format(x);
}

// The x range of a chart pinned to the last `span` seconds.
export function lastSpan(span, now = Date.now() / 1000) {
  return [now - span, now];
}

// Point markers only where values are sparse (fewer than one per 8 px): a bucket with no
// neighbours draws no line, so without its marker it would not show at all.
export function sparse(u, seriesIdx, i0, i1) {
  const ys = u.data[seriesIdx];
  const most = u.width / 8;
  let n = 0;
  for (let i = i0; i <= i1; i++) if (ys[i] != null && ++n > most) return false;
  return true;
}

// Draw the "data begins" mark on a uPlot: the time before it shaded (nothing was recorded
// there, which a flat line would pass off as zeros) and a dashed line with its label.
export function drawBegins(u, { begins, beginsText }, colour = "#888") {
  if (begins == null) return;
  const { left, top, width, height } = u.bbox;
  const x = Math.round(u.valToPos(begins, "x", true));
  if (!(x > left && x <= left + width)) return;
  const ctx = u.ctx;
  ctx.save();
  ctx.fillStyle = `${colour}22`;
  ctx.fillRect(left, top, x - left, height);
  ctx.strokeStyle = colour;
  ctx.setLineDash([4, 4]);
  ctx.beginPath();
  ctx.moveTo(x, top);
  ctx.lineTo(x, top + height);
  ctx.stroke();
  ctx.fillStyle = colour;
  ctx.font = `${Math.round(11 * (globalThis.devicePixelRatio || 1))}px sans-serif`;
  const text = beginsText || "data begins";
  const w = ctx.measureText(text).width;
  ctx.fillText(text, x - w - 6 > left ? x - w - 6 : x + 6, top + 14 * (globalThis.devicePixelRatio || 1));
  ctx.restore();
}

// A uPlot factory for the page: sized to its container (and resized with it, so a chart
// made in a hidden tab gets its width when shown), colours from CSS variables.
export function uplotFactory(uPlot, { height = 180, ResizeObserverImpl = globalThis.ResizeObserver } = {}) {
  return (target, meta, data) => {
    const { label, span } = meta;
    const css = getComputedStyle(target);
    const stroke = css.getPropertyValue("--accent").trim() || "#3b82f6";
    const axis = { stroke: css.getPropertyValue("--muted").trim() || "#888", grid: { stroke: css.getPropertyValue("--grid").trim() || "#8883" } };
    const plot = new uPlot({
      width: Math.max(200, target.clientWidth || 600), height,
      series: [{}, { label, stroke, width: 1.5, spanGaps: false, points: { show: sparse } }],
      // With only a point or two, uPlot would stretch the time axis over years: show at least a minute.
      scales: { x: { time: true, range: span ? () => lastSpan(span) : minuteAtLeast } },
      axes: [axis, { ...axis, size: 56, values: (u, splits) => splits.map(compact) }], legend: { show: false }, cursor: { drag: { x: false, y: false } },
      hooks: { draw: [(u) => drawBegins(u, meta, axis.stroke)] },
    }, data, target);
    let resize = null;
    if (ResizeObserverImpl) {
      resize = new ResizeObserverImpl(() => {
        const width = Math.max(200, target.clientWidth);
        if (target.clientWidth && width !== plot.width) plot.setSize({ width, height });
      });
      resize.observe(target);
    }
    return { setData: (d) => plot.setData(d), destroy: () => { resize?.disconnect(); plot.destroy(); }, plot };
  };
}
