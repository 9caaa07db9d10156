// Entry point: start the dashboard (see dashboard-core.js).
import { Dashboard } from "./dashboard-core.js";

new Dashboard(document, window).start().catch((err) => {
  const b = document.getElementById("banner");
  b.textContent = `the dashboard failed to start: ${err.message}`;
  b.hidden = false;
});
