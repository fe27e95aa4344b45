// One answer as the page knows it, built only from `answer` events (or a stored record).
// Pure data: no DOM, so it is unit-tested in node and snapshotted to sessionStorage as JSON.
import { entryMs, isAfter } from "./entry-id.js";

export const FINISHED = Object.freeze(["done", "failed", "cancelled"]);

/**
 * @typedef {object} Answer
 * @property {string} id
 * @property {string} lastEntryId   the resume cursor: the last entry applied
 * @property {string} text
 * @property {"queued"|"streaming"|"done"|"failed"|"cancelled"} status
 * @property {{topic?: string, question?: string, model?: string, provider?: string,
 *   created_ms?: number, follows?: string, thread?: string}} meta   follows: the question
 *   this one follows in a thread; thread: that thread's first question
 * @property {Record<string, any> | null} end       the `end` entry's fields
 * @property {Record<string, any> | null} record    a stored question record, when known
 * @property {{text: string, kind: string} | null} error
 * @property {number} chunks
 * @property {number} firstChunkMs
 * @property {number} lastChunkMs
 * @property {number} finishedMs
 * @property {number | null} ahead     answers the model serves before this one, while waiting
 */

/** @returns {Answer} */
export function newAnswer(id, meta = {}) {
  return {
    id, lastEntryId: "", text: "", status: "queued", meta: { ...meta }, end: null,
    record: null, error: null, chunks: 0, firstChunkMs: 0, lastChunkMs: 0, finishedMs: 0,
    ahead: null,
  };
}

const RANK = { queued: 0, streaming: 1, done: 2, failed: 2, cancelled: 2 };

export function isFinished(a) {
  return FINISHED.includes(a.status);
}

// follows and thread: a question asked in a thread (from the record, or set when asking).
const START_FIELDS = ["topic", "question", "model", "provider", "created_ms", "follows", "thread"];
const END_FIELDS = [
  "finish_reason", "prompt_tokens", "completion_tokens", "chunks", "ttft_ms", "duration_ms",
];

function pick(source, names) {
  const out = {};
  for (const n of names) if (source[n] !== undefined && source[n] !== null) out[n] = source[n];
  return out;
}

/**
 * Apply one `answer` event. Returns false when it is not for this answer or was already
 * applied (its entry id is not after the cursor): that is what makes resume exact.
 * @param {Answer} a
 */
export function applyEvent(a, ev) {
  if (!ev || ev.id !== a.id || !isAfter(ev.entry_id, a.lastEntryId)) return false;
  a.lastEntryId = ev.entry_id;
  const ms = entryMs(ev.entry_id);
  const text = typeof ev.text === "string" ? ev.text : "";
  switch (ev.type) {
    case "start":
      a.meta = { ...a.meta, ...pick(ev, START_FIELDS) };
      if (!isFinished(a)) a.status = "streaming";
      break;
    case "chunk":
      a.text += text;
      a.chunks += 1;
      a.ahead = null;
      if (!a.firstChunkMs) a.firstChunkMs = ms;
      a.lastChunkMs = ms;
      if (!isFinished(a)) a.status = "streaming";
      break;
    case "waiting":
      // The model answers others first (the local model, one at a time); a chunk ends this.
      a.ahead = Number.isFinite(Number(ev.ahead)) ? Math.max(0, Number(ev.ahead)) : null;
      break;
    case "restart":
      // A reclaimed request was generated again: the text so far is void.
      a.text = "";
      a.chunks = 0;
      a.firstChunkMs = 0;
      a.lastChunkMs = 0;
      break;
    case "end":
      a.status = "done";
      a.end = pick(ev, END_FIELDS);
      a.finishedMs = ms;
      break;
    case "error":
      a.status = "failed";
      a.error = { text: text || "The model failed to answer.", kind: String(ev.kind || "") };
      a.finishedMs = ms;
      break;
    case "cancelled":
      a.status = "cancelled";
      a.finishedMs = ms;
      break;
    default:
      break; // an entry type this page does not know: the cursor still moves past it
  }
  return true;
}

/**
 * Take what a stored question record says (HTTP API, or the no-stream ack).
 * @param {Answer} a
 */
export function applyRecord(a, record) {
  if (!record || record.id !== a.id) return;
  a.record = { ...record };
  // Entries are fresher than a record read earlier: the record only fills gaps.
  a.meta = { ...pick(record, START_FIELDS), ...a.meta };
  if ((RANK[record.status] ?? -1) > RANK[a.status]) a.status = record.status;
  if (record.status === "failed" && !a.error) {
    a.error = { text: record.error || "The model failed to answer.", kind: "" };
  }
}

function positive(n) {
  return typeof n === "number" && Number.isFinite(n) && n > 0 ? n : 0;
}

/**
 * The figures shown under an answer. Final numbers come from the `end` entry (or the record);
 * while streaming they are estimated from the entry ids, which carry Redis's clock.
 * @param {Answer} a
 */
export function figures(a) {
  const end = a.end || {};
  const rec = a.record || {};
  const chunks = positive(end.chunks) || positive(rec.chunks) || a.chunks;
  const tokens = positive(end.completion_tokens) || positive(rec.completion_tokens) || chunks;

  let ttftMs = null;
  if (typeof end.ttft_ms === "number" && end.ttft_ms >= 0) ttftMs = end.ttft_ms;
  else if (typeof rec.ttft_ms === "number" && rec.ttft_ms >= 0) ttftMs = rec.ttft_ms;
  else if (a.firstChunkMs && a.meta.created_ms) ttftMs = Math.max(0, a.firstChunkMs - a.meta.created_ms);

  let tokensPerS = null;
  const spanMs = (a.finishedMs || a.lastChunkMs) - a.firstChunkMs;
  if (a.firstChunkMs && spanMs > 0) {
    // Live: n chunks span n-1 intervals. Finished: the end entry closes the last interval.
    const counted = a.finishedMs ? tokens : Math.max(0, a.chunks - 1);
    if (counted > 0) tokensPerS = (counted * 1000) / spanMs;
  } else if (positive(end.duration_ms) && ttftMs !== null && end.duration_ms > ttftMs) {
    tokensPerS = (tokens * 1000) / (end.duration_ms - ttftMs);
  } else if (positive(rec.ended_ms) && positive(rec.created_ms) && ttftMs !== null) {
    // The record's ttft_ms counts from created_ms, as the end entry's duration_ms does.
    const genMs = rec.ended_ms - rec.created_ms - ttftMs;
    if (genMs > 0) tokensPerS = (tokens * 1000) / genMs;
  }

  const model = a.meta.model || rec.model || null;
  const provider = a.meta.provider || rec.provider || null;
  return { ttftMs, tokensPerS, chunks, tokens, model, provider };
}
