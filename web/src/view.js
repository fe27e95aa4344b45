// Everything that writes to the DOM. Model text only ever enters through sanitize().
import { figures, isFinished } from "./answer.js";
import { formatModel, formatMs, formatRate, formatWhen, STATUS_TEXT } from "./format.js";
import { renderMarkdown } from "./markdown.js";
import { sanitize } from "./sanitize.js";

const $ = (id) => /** @type {HTMLElement} */ (document.getElementById(id));

export const els = {
  form: /** @type {HTMLFormElement} */ ($("ask-form")),
  topic: /** @type {HTMLInputElement} */ ($("topic")),
  question: /** @type {HTMLTextAreaElement} */ ($("question")),
  noStream: /** @type {HTMLInputElement} */ ($("no-stream")),
  ask: /** @type {HTMLButtonElement} */ ($("ask")),
  notice: $("notice"),
  conn: $("conn"),
  connText: $("conn-text"),
  answer: $("answer"),
  answerQuestion: $("answer-question"),
  answerTopic: $("answer-topic"),
  answerStatus: $("answer-status"),
  waiting: $("answer-waiting"),
  body: $("answer-body"),
  error: $("answer-error"),
  figTtft: $("fig-ttft"),
  figRate: $("fig-rate"),
  figChunks: $("fig-chunks"),
  figModel: $("fig-model"),
  stop: /** @type {HTMLButtonElement} */ ($("stop")),
  replay: /** @type {HTMLButtonElement} */ ($("replay")),
  historyList: $("history-list"),
  historyEmpty: $("history-empty"),
  keyForm: /** @type {HTMLFormElement} */ ($("key-form")),
  keyInput: /** @type {HTMLInputElement} */ ($("api-key")),
  keyReveal: /** @type {HTMLButtonElement} */ ($("key-reveal")),
  keySubmit: /** @type {HTMLButtonElement} */ ($("key-submit")),
  keyError: $("key-error"),
  forgetKey: /** @type {HTMLButtonElement} */ ($("forget-key")),
};

let renderedText = null;

/**
 * @param {import("./answer.js").Answer} a
 * @param {{replaying?: boolean}} mode
 */
export function renderAnswer(a, mode = {}) {
  const finished = isFinished(a);
  els.answer.hidden = false;
  els.answer.dataset.id = a.id;
  els.answer.dataset.status = mode.replaying ? "replaying" : a.status;
  els.answer.setAttribute("aria-busy", String(!finished));
  els.answerQuestion.textContent = a.meta.question || "Question";
  els.answerTopic.textContent = a.meta.topic ? `Topic: ${a.meta.topic}` : "";
  els.answerStatus.textContent = mode.replaying ? "Replaying…" : statusText(a, finished);
  els.answerStatus.dataset.status = a.status;
  els.waiting.hidden = true;
  if (a.text !== renderedText) {
    els.body.innerHTML = sanitize(renderMarkdown(a.text));
    renderedText = a.text;
  }
  els.error.hidden = !a.error;
  els.error.textContent = a.error ? `The answer failed: ${a.error.text}` : "";
  renderFigures(a);
  els.stop.hidden = finished || Boolean(mode.replaying);
  els.stop.disabled = false;
  els.replay.hidden = !finished || Boolean(mode.replaying) || !a.lastEntryId || !a.text;
}

function statusText(a, finished) {
  if (!finished && typeof a.ahead === "number") {
    return a.ahead > 0 ? `Waiting for the model: ${a.ahead} ahead…` : "Waiting for the model…";
  }
  return STATUS_TEXT[a.status] || a.status;
}

function renderFigures(a) {
  const f = figures(a);
  els.figTtft.textContent = formatMs(f.ttftMs);
  els.figRate.textContent = formatRate(f.tokensPerS);
  els.figChunks.textContent = f.chunks ? String(f.chunks) : "–";
  els.figModel.textContent = formatModel(f.model, f.provider);
}

/**
 * A question on its way, with no answer id yet: "sending" until the server takes it, or
 * "waiting" for the whole answer without stream.
 * @param {"sending"|"waiting"} state
 */
export function renderPending(topic, question, state) {
  els.answer.hidden = false;
  delete els.answer.dataset.id;
  els.answer.dataset.status = state;
  els.answer.setAttribute("aria-busy", "true");
  els.answerQuestion.textContent = question;
  els.answerTopic.textContent = `Topic: ${topic}`;
  els.answerStatus.textContent = state === "waiting" ? "Waiting…" : "Sending…";
  els.answerStatus.dataset.status = state;
  els.waiting.hidden = state !== "waiting";
  els.body.innerHTML = "";
  renderedText = "";
  els.error.hidden = true;
  for (const dd of [els.figTtft, els.figRate, els.figChunks, els.figModel]) dd.textContent = "–";
  els.stop.hidden = true;
  els.replay.hidden = true;
}

export function hideAnswer() {
  els.answer.hidden = true;
  delete els.answer.dataset.id;
  els.body.innerHTML = "";
  renderedText = "";
}

const CONN_TEXT = {
  connecting: "Connecting…",
  connected: "Connected",
  reconnecting: "Reconnecting…",
  refused: "API key needed",
};

export function setConnection(state, detail) {
  els.conn.dataset.state = state;
  els.connText.textContent = CONN_TEXT[state] || state;
  els.conn.title = detail || "";
}

export function showNotice(message) {
  els.notice.textContent = message;
  els.notice.hidden = false;
}

export function clearNotice() {
  els.notice.hidden = true;
  els.notice.textContent = "";
}

/**
 * Ask for an API key; `problem` says what went wrong with the last one ("" for nothing).
 * The field takes the focus when the form appears, and again after a refusal, so the key
 * can be fixed at once.
 */
export function showKeyForm(problem) {
  const appearing = els.keyForm.hidden;
  els.keyForm.hidden = false;
  els.keyError.textContent = problem;
  els.keyError.hidden = !problem;
  els.keyInput.setAttribute("aria-invalid", String(Boolean(problem)));
  setKeyChecking(false);
  if (appearing || problem) {
    els.keyInput.focus();
    if (problem) els.keyInput.select();
  }
}

export function hideKeyForm() {
  const hadFocus = els.keyForm.contains(document.activeElement);
  els.keyForm.hidden = true;
  els.keyInput.value = "";
  els.keyError.hidden = true;
  setKeyReveal(false);
  if (hadFocus) els.question.focus();
}

export function keyFormShown() {
  return !els.keyForm.hidden;
}

export function setKeyChecking(checking) {
  els.keySubmit.textContent = checking ? "Checking…" : "Use key";
  els.keyForm.setAttribute("aria-busy", String(checking));
  if (checking) els.keyError.hidden = true;
}

export function setKeyReveal(shown) {
  els.keyInput.type = shown ? "text" : "password";
  els.keyReveal.setAttribute("aria-pressed", String(shown));
}

export function showForgetKey(shown) {
  els.forgetKey.hidden = !shown;
}

/**
 * @param {object[]} questions records, newest first
 * @param {(id: string, event: MouseEvent) => void} onChoose
 */
export function renderHistory(questions, currentId, onChoose) {
  const now = Date.now();
  const items = questions.map((q) => {
    const li = document.createElement("li");
    const link = document.createElement("a");
    link.href = `/?q=${encodeURIComponent(q.id)}`;
    link.dataset.id = q.id;
    if (q.id === currentId) link.setAttribute("aria-current", "page");
    const title = document.createElement("span");
    title.className = "history-question";
    title.textContent = q.question || "(no question)";
    const meta = document.createElement("span");
    meta.className = "history-meta";
    meta.textContent = [q.topic, STATUS_TEXT[q.status] || q.status, formatWhen(q.created_ms, now)]
      .filter(Boolean).join(" · ");
    link.dataset.status = q.status;
    link.append(title, meta);
    link.addEventListener("click", (event) => onChoose(q.id, event));
    li.append(link);
    return li;
  });
  els.historyList.replaceChildren(...items);
  els.historyEmpty.hidden = items.length > 0;
}

export function markCurrentInHistory(currentId) {
  for (const link of els.historyList.querySelectorAll("a[data-id]")) {
    if (link.getAttribute("data-id") === currentId) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}
