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
  threadTurns: $("thread-turns"),
  followForm: /** @type {HTMLFormElement} */ ($("follow-form")),
  followQuestion: /** @type {HTMLTextAreaElement} */ ($("follow-question")),
  followAsk: /** @type {HTMLButtonElement} */ ($("follow-ask")),
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
  // Only an answer that is done can be followed up (the server says the same).
  els.followForm.hidden = a.status !== "done" || Boolean(mode.replaying);
  els.followAsk.disabled = false;
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
  els.followForm.hidden = true;
}

export function hideAnswer() {
  els.answer.hidden = true;
  els.followForm.hidden = true;
  delete els.answer.dataset.id;
  els.body.innerHTML = "";
  renderedText = "";
}

/**
 * A thread's earlier turns, oldest first, above the current answer: each question, then
 * its answer as sanitised Markdown, and a link that opens that answer on its own (to
 * replay it, or to follow it up in a branch).
 * @param {import("./answer.js").Answer[]} turns
 */
export function renderThread(turns) {
  const items = turns.map((turn) => {
    const li = document.createElement("li");
    li.className = "turn";
    li.dataset.id = turn.id;
    const question = document.createElement("h2");
    question.className = "turn-question";
    question.textContent = turn.meta.question || "Question";
    const body = document.createElement("div");
    body.className = "markdown turn-answer";
    body.innerHTML = sanitize(renderMarkdown(turn.text));
    const meta = document.createElement("p");
    meta.className = "turn-meta";
    const status = STATUS_TEXT[turn.status] || turn.status;
    const open = document.createElement("a");
    open.href = `/?q=${encodeURIComponent(turn.id)}`;
    open.dataset.id = turn.id;
    open.textContent = "Open this answer";
    meta.append(status === STATUS_TEXT.done ? "" : `${status} · `, open);
    li.append(question, body, meta);
    return li;
  });
  els.threadTurns.replaceChildren(...items);
  els.threadTurns.hidden = items.length === 0;
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
 * The history: one entry per thread (a lone question is a thread of one), newest first.
 * An entry opens the thread's newest question, shown with the turns before it.
 * @param {{key: string, latest: object, first: object, count: number}[]} threads
 * @param {string | null | undefined} currentThread the thread shown now
 * @param {(id: string, event: MouseEvent) => void} onChoose
 */
export function renderHistory(threads, currentThread, onChoose) {
  const now = Date.now();
  const items = threads.map(({ key, latest, first, count }) => {
    const li = document.createElement("li");
    const link = document.createElement("a");
    link.href = `/?q=${encodeURIComponent(latest.id)}`;
    link.dataset.id = latest.id;
    link.dataset.thread = key;
    if (key === currentThread) link.setAttribute("aria-current", "page");
    const title = document.createElement("span");
    title.className = "history-question";
    title.textContent = first.question || "(no question)";
    const meta = document.createElement("span");
    meta.className = "history-meta";
    const size = count > 1 ? `${count} questions` : "";
    meta.textContent = [
      latest.topic, size, STATUS_TEXT[latest.status] || latest.status,
      formatWhen(latest.created_ms, now),
    ].filter(Boolean).join(" · ");
    link.dataset.status = latest.status;
    link.append(title, meta);
    if (count > 1 && latest.question && latest.question !== first.question) {
      const last = document.createElement("span");
      last.className = "history-latest";
      last.textContent = `Latest: ${latest.question}`;
      link.insertBefore(last, meta);
    }
    link.addEventListener("click", (event) => onChoose(latest.id, event));
    li.append(link);
    return li;
  });
  els.historyList.replaceChildren(...items);
  els.historyEmpty.hidden = items.length > 0;
}

/** @param {string | null} currentThread the thread shown now */
export function markCurrentInHistory(currentThread) {
  for (const link of els.historyList.querySelectorAll("a[data-thread]")) {
    if (link.getAttribute("data-thread") === currentThread) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}
