// The page's controller: asking, watching (with resume), stopping, history and replay;
// threads: a follow-up asked under a finished answer, shown after the turns before it.
// The API key, when the server wants one, is key-gate.js's business.
import "./style.css";
import { applyEvent, applyRecord, isFinished, newAnswer } from "./answer.js";
import { getQuestion, listQuestions, useApiKey } from "./api.js";
import { connect, reconnect, request } from "./connection.js";
import { formatRateLimit } from "./format.js";
import { keyGate } from "./key-gate.js";
import { replay } from "./replay.js";
import { clearSnapshots, loadSnapshot, saveSnapshot } from "./snapshot.js";
import { earlierTurns, groupThreads, threadOf } from "./threads.js";
import * as view from "./view.js";

const ASK_TIMEOUT_MS = 15_000;
const NO_STREAM_TIMEOUT_MS = 15 * 60_000;
const HISTORY_LIMIT = 50;
const HISTORY_REFRESH_MS = 10_000;
const ACKED_EVENTS = new Set(["ask", "watch", "cancel"]);

/** @type {import("./answer.js").Answer | null} */
let current = null;
/** The id this socket asked the server to watch, if any. */
let watching = null;
// While an `ask {watch: true}` awaits its ack: the answer events that came for an id not
// shown yet (over long-polling, an ack and the first events can arrive in one response).
let earlyEvents = null;
const EARLY_EVENTS_MAX = 10_000;
let stopReplay = null;
let renderTimer = 0;
let askSeq = 0;
/** The current answer's stored entries are still being fetched: watching waits for them. */
let loading = false;
/** An answer the server would not show without a key: opened once a key is accepted. */
let openOnceAllowed = null;
/** @type {import("./answer.js").Answer[]} the current answer's thread before it, oldest first */
let turns = [];
/** Bumped whenever the turns shown change: an older load of them is then dropped. */
let turnsSeq = 0;
/** The answer whose earlier turns `turns` holds in full (null while they load). */
let turnsOf = null;
/** The follow-up box had the focus when it asked: it gets it back when the answer is done. */
let refocusFollow = false;

const gate = keyGate({
  use: (key) => {
    useApiKey(key);
    reconnect(socket);
  },
  forgotten: () => {
    // What the old key could see is not for whoever uses the page next.
    openOnceAllowed = null;
    leaveCurrent();
    setTurns([]);
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
  if (earlyEvents && event?.id !== current?.id && earlyEvents.length < EARLY_EVENTS_MAX) {
    earlyEvents.push(event); // an ask's watch can deliver before its ack is handled
    return;
  }
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
  if (refocusFollow && current.status === "done" && !stopReplay) {
    refocusFollow = false;
    const active = document.activeElement;
    if (!active || active === document.body) view.els.followQuestion.focus();
  }
}

function show(answer) {
  current = answer;
  flush();
  view.markCurrentInHistory(currentThread());
}

/** The thread shown now: its first question's id (a lone question is its own thread). */
function currentThread() {
  if (!current) return null;
  return current.meta.thread || turns[0]?.id || current.id;
}

/** Show `list` as the current answer's earlier turns; `of`: the answer they are all of. */
function setTurns(list, of = null) {
  turnsSeq += 1;
  turns = list;
  turnsOf = of;
  view.renderThread(turns);
}

/** A stored answer, read over HTTP: the record, then every entry. */
async function fetchAnswer(id) {
  const stored = await getQuestion(id);
  const answer = newAnswer(id);
  applyRecord(answer, stored.question);
  for (const entry of stored.entries) applyEvent(answer, entry);
  return answer;
}

/**
 * Show the turns `answer` follows: this tab's snapshots at once, the rest from the server.
 * `clear: false` keeps the turns shown until the whole list is there.
 */
async function showEarlierTurns(answer, { clear = true } = {}) {
  if (!answer.meta.follows) {
    setTurns([], answer.id);
    return;
  }
  if (clear) setTurns([]);
  else turnsSeq += 1; // a load already under way is dropped
  const seq = turnsSeq;
  const list = await earlierTurns(
    answer,
    async (id) => {
      const snap = loadSnapshot(sessionStorage, id);
      if (snap && isFinished(snap)) return snap;
      const turn = await fetchAnswer(id);
      if (isFinished(turn)) saveSnapshot(sessionStorage, turn);
      return turn;
    },
    {
      onMissing: (id, e) => {
        if (seq === turnsSeq && e.status !== 401) {
          view.showNotice(`Cannot show the earlier question ${id}: ${e.message}`);
        }
      },
    },
  );
  if (seq !== turnsSeq || current?.id !== answer.id) return; // another answer is shown now
  setTurns(list, answer.id);
  view.markCurrentInHistory(currentThread());
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
    setTurns([]);
    show(snap);
    if (!isFinished(snap)) watch(snap);
    showEarlierTurns(snap);
    return;
  }
  setTurns([]);
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
    showEarlierTurns(answer);
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

/**
 * Ask a question; with `parent` (a finished answer, the current one), a follow-up in its
 * thread: the parent joins the turns above and the new answer is watched under them.
 */
async function ask(topic, question, stream, parent = null) {
  const earlier = turns;
  const earlierOf = turnsOf;
  leaveCurrent();
  view.clearNotice();
  const seq = ++askSeq;
  setTurns(parent ? [...earlier, parent] : []);
  if (!stream) return askWithoutStream(seq, topic, question);
  view.renderPending(topic, question, "sending");
  view.els.ask.disabled = true;
  // Asked and watched in one round trip: the answer's events follow the ack.
  const payload = { topic, question, stream: true, watch: true };
  if (parent) payload.follows = parent.id;
  const early = [];
  earlyEvents = early;
  try {
    const reply = await request(socket, "ask", payload, ASK_TIMEOUT_MS);
    if (earlyEvents === early) earlyEvents = null;
    if (seq !== askSeq) {
      socket.emit("unwatch", { id: reply.id }); // another answer is shown now
      return;
    }
    const meta = parent
      ? { topic, question, follows: parent.id, thread: parent.meta.thread || parent.id }
      : { topic, question };
    const answer = newAnswer(String(reply.id), meta);
    setAddress(answer.id, true);
    show(answer);
    watching = answer.id;
    for (const event of early) onAnswerEvent(event);
    // The parent's own turns were still loading when it was followed up: load them now.
    if (!parent || earlierOf === parent.id) turnsOf = answer.id;
    else showEarlierTurns(answer, { clear: false });
    refreshHistory();
    if (parent) view.els.followQuestion.value = "";
  } catch (e) {
    if (earlyEvents === early) earlyEvents = null;
    if (seq !== askSeq) return;
    if (parent) {
      // Not asked: the thread stays as it was, the follow-up still typed in its box.
      setTurns(earlier, earlierOf);
      show(parent);
      if (earlierOf !== parent.id) showEarlierTurns(parent, { clear: false });
      if (refocusFollow) view.els.followQuestion.focus();
      refocusFollow = false;
    } else {
      view.hideAnswer();
    }
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
  const { topic, question, follows, thread } = stored.question || {};
  const answer = newAnswer(id, { topic, question, follows, thread });
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
    view.renderHistory(groupThreads(questions), currentThread(), (id, event) => {
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

view.els.followForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const parent = current;
  if (!parent || parent.status !== "done" || stopReplay) return; // the box is hidden then
  const question = view.els.followQuestion.value.trim();
  if (gate.needed) {
    view.showNotice("Enter the API key above first, then ask.");
    view.els.keyInput.focus();
    return;
  }
  if (!question) {
    view.showNotice("Type a follow-up question first.");
    view.els.followQuestion.focus();
    return;
  }
  refocusFollow = view.els.followForm.contains(document.activeElement);
  const topic = parent.meta.topic || view.els.topic.value.trim() || "Redis";
  ask(topic, question, true, parent);
});

view.els.followQuestion.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    view.els.followForm.requestSubmit();
  }
});

view.els.threadTurns.addEventListener("click", (event) => {
  const link = event.target instanceof Element ? event.target.closest("a[data-id]") : null;
  if (!link || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) {
    return; // let the browser open it in a new tab or window
  }
  event.preventDefault();
  openQuestion(link.getAttribute("data-id"));
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
    setTurns([]);
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
