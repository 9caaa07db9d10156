// Tab routing: the URL hash (#overview, #metrics?…, #sinks, #dlq, #flags, #sessions,
// #processes, #fleet) picks the shown section and the highlighted link; the shown tab's panel is
// refreshed when it is shown and on every `refresh()` (the dashboard calls it every 2 s).
// `remove(names)` takes tabs out (an agentless page has no agent to show sinks, DLQ, ...).

export class Tabs {
  // `panels`: tab name -> refresh function; `onShow(tab)` runs after each switch.
  constructor({ $, doc, win, panels = {}, onShow = () => {} }) {
    Object.assign(this, { $, doc, win, panels, onShow });
    this.current = "overview";
  }

  bind() {
    const show = () => {
      const want = (this.win.location.hash || "#overview").slice(1).split("?")[0];
      this.current = this.$(`tab-${want}`) ? want : "overview";
      for (const sec of this.doc.querySelectorAll("section.tab")) sec.hidden = sec.id !== `tab-${this.current}`;
      for (const a of this.doc.querySelectorAll("#tabs a")) a.classList.toggle("on", a.dataset.tab === this.current);
      this.onShow(this.current);
      this.refresh();
    };
    this.win.addEventListener("hashchange", show);
    show();
  }

  refresh() { this.panels[this.current]?.(); }

  // Before bind(): these tabs' links and sections go, so no hash can show them.
  remove(names) {
    for (const name of names) {
      this.doc.querySelector(`#tabs a[data-tab="${name}"]`)?.remove();
      this.$(`tab-${name}`)?.remove();
    }
  }
}
