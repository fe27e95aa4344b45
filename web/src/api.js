// The HTTP JSON API. Errors come back as {error: "message"}; they become Error(message),
// with `status` (the HTTP status) and `reason` (the server's own words).

let apiKey = "";

/** The key sent as `Authorization: Bearer` on every call from now on ("" for none). */
export function useApiKey(key) {
  apiKey = key;
}

async function getJSON(url, init) {
  const headers = { Accept: "application/json" };
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  let response;
  try {
    response = await fetch(url, { headers, ...init });
  } catch (e) {
    throw new Error(`The server cannot be reached (${e.message}).`);
  }
  let body = null;
  try {
    body = await response.json();
  } catch {
    // a proxy's HTML error page, for instance
  }
  if (!response.ok) {
    const why = body && typeof body.error === "string" ? body.error : response.statusText;
    const error = new Error(`${why || "request failed"} (HTTP ${response.status})`);
    error.status = response.status;
    error.reason = why || "";
    throw error;
  }
  return body;
}

export async function listQuestions(limit = 30) {
  const body = await getJSON(`/api/questions?limit=${encodeURIComponent(limit)}`);
  return Array.isArray(body?.questions) ? body.questions : [];
}

/** @returns {Promise<{question: object, answer: string, entries: object[]}>} */
export async function getQuestion(id) {
  const path = `/api/questions/${encodeURIComponent(id)}`;
  let body = await getJSON(path);
  const question = body?.question;
  let answer = body?.answer ?? "";
  const entries = Array.from(body?.entries ?? []);
  // The gateway sends at most 1 MiB of text per call; `next_after` says where the rest starts.
  while (typeof body?.next_after === "string" && body.next_after) {
    body = await getJSON(`${path}?after=${encodeURIComponent(body.next_after)}`);
    answer += body?.answer ?? "";
    for (const entry of body?.entries ?? []) entries.push(entry);
  }
  return { question, answer, entries };
}
