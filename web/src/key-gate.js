// The API key's life on the page: asked for when the server refuses the page, tried, kept in
// localStorage once the server accepts it, shared with the other tabs, forgotten on request.
// A server without API keys never refuses, so it never sees the form.
import { cleanKey, forgetKey, KEY_NAME, loadKey, saveKey } from "./api-key.js";
import * as view from "./view.js";

/**
 * @param {{use: (key: string) => void, forgotten: () => void}} hooks
 *   `use`: send this key ("" for none) from now on and connect again with it;
 *   `forgotten`: clear what the page shows of the previous key's answers.
 */
export function keyGate(hooks) {
  let key = loadKey(localStorage);
  let needed = false;
  // A typed key on trial: kept only once the server accepts it, so a typo is never remembered.
  let trying = false;

  view.showForgetKey(Boolean(key));

  /** The server refused the page (socket connect_error or HTTP 401), in its own words. */
  function refused(message) {
    if (needed && !trying) return; // the socket and HTTP both said so: one message is enough
    needed = true;
    view.setConnection("refused", message);
    let problem = "";
    if (trying) problem = `That key was refused (${message}). Check it and try again.`;
    else if (key) problem = `The saved key was refused (${message}). Enter a valid key, or forget it.`;
    trying = false;
    view.showKeyForm(problem);
  }

  /** The socket connected: whatever key it sent is good (or none was needed). */
  function accepted() {
    if (key) saveKey(localStorage, key);
    trying = false;
    needed = false;
    view.showForgetKey(Boolean(key));
    if (view.keyFormShown()) view.hideKeyForm();
  }

  function switchTo(next) {
    if (key && key !== next) hooks.forgotten();
    key = next;
    needed = false; // the verdict on the old key says nothing of the new one
    view.showForgetKey(false);
    hooks.use(next);
  }

  view.els.keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const typed = cleanKey(view.els.keyInput.value);
    if (typed.problem) {
      view.showKeyForm(typed.problem);
      return;
    }
    trying = true;
    view.setKeyChecking(true);
    key = typed.key; // the key refused before, or none: nothing of it is on the page to clear
    hooks.use(key);
  });

  view.els.keyReveal.addEventListener("click", () => {
    view.setKeyReveal(view.els.keyInput.type === "password");
    view.els.keyInput.focus();
  });

  view.els.forgetKey.addEventListener("click", () => {
    forgetKey(localStorage);
    trying = false;
    switchTo("");
  });

  // Another tab entered, changed or forgot the key: follow it, so every tab agrees.
  window.addEventListener("storage", (event) => {
    if (event.storageArea !== localStorage || (event.key !== KEY_NAME && event.key !== null)) {
      return;
    }
    const kept = loadKey(localStorage);
    if (kept === key || trying) return;
    switchTo(kept);
  });

  return {
    /** The key to send now ("" for none). */
    key: () => key,
    /** True while the server wants a key this page does not have. */
    get needed() {
      return needed;
    },
    refused,
    accepted,
  };
}
