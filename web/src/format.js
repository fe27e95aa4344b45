// How figures and times read on the page.

export function formatMs(ms) {
  if (ms === null || ms === undefined || !Number.isFinite(ms)) return "–";
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

export function formatRate(perS) {
  if (perS === null || perS === undefined || !Number.isFinite(perS)) return "–";
  return perS >= 100 ? `${Math.round(perS)}` : perS.toFixed(1);
}

export function formatModel(model, provider) {
  if (!model && !provider) return "–";
  if (model && provider && model !== provider) return `${model} (${provider})`;
  return String(model || provider);
}

export function formatWhen(ms, now = Date.now()) {
  if (!ms) return "";
  const s = Math.max(0, Math.round((now - ms) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return new Date(ms).toLocaleDateString();
}

export const STATUS_TEXT = Object.freeze({
  queued: "Queued…",
  streaming: "Streaming…",
  done: "Done",
  failed: "Failed",
  cancelled: "Stopped",
});

/**
 * The gateway's rate-limit refusal ("rate limit: at most 5 questions a minute per client;
 * try again in 12 s") as a sentence for a person, or null when `message` is something else.
 */
export function formatRateLimit(message) {
  const m = /^rate limit: at most (\d+) questions? a minute\b.*?\btry again in (\d+) s\b/i
    .exec(String(message ?? ""));
  if (!m) return null;
  const perMin = Number(m[1]);
  const waitS = Number(m[2]);
  const limit = `${perMin} question${perMin === 1 ? "" : "s"} a minute`;
  const wait = waitS >= 90 ? `about ${Math.round(waitS / 60)} minutes` : `${waitS} s`;
  return `Too many questions: this server takes at most ${limit} from you. Try again in ${wait}.`;
}
