// The page's controller: asking, watching (with resume), stopping, history and replay.
// The API key, when the server wants one, is key-gate.js's business.
import "./style.css";
import { applyEvent, applyRecord, isFinished, newAnswer } from "./answer.js";
import { getQuestion, listQuestions, useApiKey } from "./api.js";
import { connect, reconnect, request } from "./connection.js";
import { formatRateLimit } from "./format.js";
import { keyGate } from "./key-gate.js";
import { replay } from "./replay.js";
import { clearSnapshots, loadSnapshot, saveSnapshot } from "./snapshot.js";
import * as view from "./view.js";

const ASK_TIMEOUT_MS = 15_000;
const NO_STREAM_TIMEOUT_MS = 15 * 60_000;
const HISTORY_LIMIT = 30;
const HISTORY_REFRESH_MS = 10_000;
const ACKED_EVENTS = new Set(["ask", "watch", "cancel"]);

/** @type {import("./answer.js").Answer | null} */
let current = null;
/** The id this socket asked the server to watch, if any. */
let watching = null;
let stopReplay = null;
let renderTimer = 0;
let askSeq = 0;
/** The current answer's stored entries are still being fetched: watching waits for them. */
let loading = false;
/** An answer the server would not show without a key: opened once a key is accepted. */
let openOnceAllowed = null;

const gate = keyGate({
  use: (key) => {
    useApiKey(key);
    reconnect(socket);
  },
  forgotten: () => {
    // What the old key could see is not for whoever uses the page next.
    openOnceAllowed = null;
    leaveCurrent();
    view.hideAnswer();
    view.clearNotice();
    view.renderHistory([], null, () => {});
    clearSnapshots(sessionStorage);
    setAddress(null, false);
  },
});
useApiKey(gate.key());

const socket = connect({
  token: () => gate.key(),
  onState: (state, detail) => view.setConnection(state, detail),
  onConnect: () => {
    gate.accepted();
    // A new connection has no watches: resume the current answer after its last entry.
    watching = null;
    if (current && !isFinished(current) && !stopReplay && !loading) watch(current);
    if (openOnceAllowed) openQuestion(openOnceAllowed, { push: false });
    refreshHistory();
  },
  onRefused: (message) => gate.refused(message),
  onAnswer: onAnswerEvent,
  onServerError: (e) => {
    // Failed asks, watches and cancels are reported through their acks already.
    if (!ACKED_EVENTS.has(e?.event)) view.showNotice(`Server error: ${e?.message || "unknown error"}`);
  },
});

function onAnswerEvent(event) {
  if (!current || stopReplay || event?.id !== current.id) return;
  if (!applyEvent(current, event)) return; // already shown: resume never doubles text
  if (isFinished(current)) {
    watching = null;
    flush();
    refreshHistory();
  } else {
    scheduleRender();
  }
}

// Chunks can come faster than frames; render at most every 30 ms. A timer, not
// requestAnimationFrame, so a tab in the background keeps its state current.
function scheduleRender() {
  if (!renderTimer) renderTimer = setTimeout(flush, 30);
}

function flush() {
  clearTimeout(renderTimer);
  renderTimer = 0;
  if (!current) return;
  view.renderAnswer(current, { replaying: Boolean(stopReplay) });
  if (!stopReplay) saveSnapshot(sessionStorage, current);
}

function show(answer) {
  current = answer;
  flush();
  view.markCurrentInHistory(answer.id);
}

async function watch(answer) {
  if (!socket.connected) return; // onConnect will watch once connected
  watching = answer.id;
  const payload = { id: answer.id };
  if (answer.lastEntryId) payload.after = answer.lastEntryId;
  try {
    await request(socket, "watch", payload, ASK_TIMEOUT_MS);
  } catch (e) {
    if (current === answer) view.showNotice(`Cannot follow this answer: ${e.message}`);
  }
}

function unwatch() {
  if (watching && socket.connected) socket.emit("unwatch", { id: watching });
  watching = null;
}

function leaveCurrent() {
  loading = false;
  const replaying = Boolean(stopReplay);
  if (stopReplay) stopReplay();
  stopReplay = null;
  unwatch();
  clearTimeout(renderTimer);
  renderTimer = 0;
  // A half-played replay is not what this tab knows of the answer: keep the snapshot as it was.
  if (current && !replaying) saveSnapshot(sessionStorage, current);
  current = null;
}

function setAddress(id, push) {
  const url = id ? `/?q=${encodeURIComponent(id)}` : "/";
  if (url === `${location.pathname}${location.search}`) return;
  if (push) history.pushState({ id }, "", url);
  else history.replaceState({ id }, "", url);
}

/** Show an answer by id: this tab's snapshot at once, else the stored entries; then go live. */
async function openQuestion(id, { push = true } = {}) {
  leaveCurrent();
  openOnceAllowed = null;
  view.clearNotice();
  askSeq += 1;
  setAddress(id, push);
  const snap = loadSnapshot(sessionStorage, id);
  if (snap) {
    show(snap);
    if (!isFinished(snap)) watch(snap);
    return;
  }
  const answer = newAnswer(id);
  show(answer);
  loading = true;
  try {
    const stored = await getQuestion(id);
    if (current !== answer) return;
    loading = false;
    applyRecord(answer, stored.question);
    for (const entry of stored.entries) applyEvent(answer, entry);
    flush();
  } catch (e) {
    if (current !== answer) return;
    loading = false;
    if (e.status === 401) {
      current = null;
      view.hideAnswer();
      openOnceAllowed = id;
      gate.refused(e.reason);
      return;
    }
    view.showNotice(`Cannot show question ${id}: ${e.message}`);
    if (e.status >= 400 && e.status < 500) {
      current = null; // unknown or malformed id: nothing to follow
      view.hideAnswer();
      return;
    }
    // The server is unreachable for now: the socket's watch (on connect) reads from the start.
  }
  if (!isFinished(answer)) watch(answer);
}

async function ask(topic, question, stream) {
  leaveCurrent();
  view.clearNotice();
  const seq = ++askSeq;
  if (!stream) return askWithoutStream(seq, topic, question);
  view.renderPending(topic, question, "sending");
  view.els.ask.disabled = true;
  try {
    const reply = await request(socket, "ask", { topic, question, stream: true }, ASK_TIMEOUT_MS);
    if (seq !== askSeq) return;
    const answer = newAnswer(String(reply.id), { topic, question });
    setAddress(answer.id, true);
    show(answer);
    watch(answer);
    refreshHistory();
  } catch (e) {
    if (seq !== askSeq) return;
    view.hideAnswer();
    view.showNotice(refusal("The question was not accepted", e));
  } finally {
    view.els.ask.disabled = false;
  }
}

async function askWithoutStream(seq, topic, question) {
  setAddress(null, true);
  view.renderPending(topic, question, "waiting");
  refreshHistory(500);
  let reply;
  try {
    reply = await request(socket, "ask", { topic, question, stream: false }, NO_STREAM_TIMEOUT_MS);
  } catch (e) {
    if (seq !== askSeq) return;
    refreshHistory();
    if (typeof e.reply?.id === "string") {
      // The model failed: show the stored answer, whose error entry says why.
      await openQuestion(e.reply.id, { push: false });
      if (current?.id === e.reply.id && !current.error) view.showNotice(refusal("No answer", e));
      return;
    }
    view.hideAnswer();
    view.showNotice(refusal("No answer", e));
    return;
  }
  if (seq !== askSeq) return;
  const answer = newAnswer(String(reply.id), { topic, question });
  answer.text = typeof reply.output === "string" ? reply.output : "";
  applyRecord(answer, reply.record);
  answer.lastEntryId = reply.record?.last_entry_id || "";
  if (!isFinished(answer)) answer.status = "done";
  setAddress(answer.id, false);
  show(answer);
  refreshHistory();
}

async function stopCurrent() {
  if (!current || isFinished(current)) return;
  const answer = current;
  view.els.stop.disabled = true;
  try {
    await request(socket, "cancel", { id: answer.id }, ASK_TIMEOUT_MS);
  } catch (e) {
    view.showNotice(`Could not stop the answer: ${e.message}`);
    view.els.stop.disabled = false;
  }
}

async function replayCurrent() {
  if (!current || !isFinished(current)) return;
  const id = current.id;
  let stored;
  try {
    stored = await getQuestion(id);
  } catch (e) {
    if (e.status === 401) gate.refused(e.reason);
    else view.showNotice(`Cannot replay: ${e.message}`);
    return;
  }
  if (!current || current.id !== id) return;
  // Only what was asked: the figures grow with the replay instead of showing the totals.
  const { topic, question } = stored.question || {};
  const answer = newAnswer(id, { topic, question });
  const final = current;
  current = answer;
  stopReplay = replay(
    stored.entries,
    (entry) => {
      applyEvent(answer, entry);
      scheduleRender();
    },
    () => {
      stopReplay = null;
      if (!isFinished(answer)) Object.assign(answer, final); // entries trimmed: show the whole
      flush();
    },
  );
  flush();
  view.els.question.focus({ preventScroll: true });
}

/** What to tell of a refused ask: over the rate limit reads as a sentence of its own. */
function refusal(prefix, error) {
  return formatRateLimit(error.message) ?? `${prefix}: ${error.message}`;
}

async function refreshHistory(delayMs = 0) {
  if (delayMs) await new Promise((resolve) => setTimeout(resolve, delayMs));
  if (gate.needed) return; // nothing to list until a key is accepted
  const key = gate.key();
  try {
    const questions = await listQuestions(HISTORY_LIMIT);
    if (gate.key() !== key) return; // another key's list, asked for before a switch
    view.renderHistory(questions, current?.id, (id, event) => {
      if (event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) {
        return; // let the browser open it in a new tab or window
      }
      event.preventDefault();
      openQuestion(id);
    });
  } catch (e) {
    // The list is a convenience; the connection indicator already tells of an outage.
    if (e.status === 401) gate.refused(e.reason);
  }
}

function idFromAddress() {
  return new URLSearchParams(location.search).get("q");
}

view.els.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const topic = view.els.topic.value.trim() || "Redis";
  const question = view.els.question.value.trim();
  if (gate.needed) {
    view.showNotice("Enter the API key above first, then ask.");
    view.els.keyInput.focus();
    return;
  }
  if (!question) {
    view.showNotice("Type a question first.");
    view.els.question.focus();
    return;
  }
  ask(topic, question, !view.els.noStream.checked);
});

view.els.question.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    view.els.form.requestSubmit();
  }
});

view.els.stop.addEventListener("click", stopCurrent);
view.els.replay.addEventListener("click", replayCurrent);

document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && current && !isFinished(current) && !stopReplay) stopCurrent();
});

window.addEventListener("popstate", () => {
  const id = idFromAddress();
  if (id) openQuestion(id, { push: false });
  else {
    leaveCurrent();
    view.hideAnswer();
  }
});

// A reload may come between two renders: keep the newest state for the next page.
window.addEventListener("pagehide", () => {
  if (current && !stopReplay) saveSnapshot(sessionStorage, current);
});

setInterval(() => {
  if (document.visibilityState === "visible") refreshHistory();
}, HISTORY_REFRESH_MS);

const initial = idFromAddress();
if (initial) openQuestion(initial, { push: false });
