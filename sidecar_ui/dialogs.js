// The page's two modal dialogs (<dialog id="token-dialog"> and <dialog id="confirm-dialog">
// in index.html): each resolves once the dialog closes, true when "ok" closed it.

export class Dialogs {
  constructor($) { this.$ = $; }

  open(id, prepare) {
    const dlg = this.$(id);
    prepare?.();
    return new Promise((resolve) => {
      dlg.addEventListener("close", () => resolve(dlg.returnValue === "ok"), { once: true });
      dlg.returnValue = "";
      dlg.showModal();
    });
  }

  // The agent's token, or null when cancelled (the Api asks on a 401).
  async askToken() {
    const input = this.$("token-input");
    const ok = await this.open("token-dialog", () => { input.value = ""; });
    return ok && input.value ? input.value : null;
  }

  confirm(text) {
    return this.open("confirm-dialog", () => { this.$("confirm-text").textContent = text; });
  }
}
