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
