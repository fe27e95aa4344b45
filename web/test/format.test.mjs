import assert from "node:assert/strict";
import { test } from "node:test";
import { formatRateLimit } from "../src/format.js";

test("the gateway's rate limit reads as a sentence", () => {
  assert.equal(
    formatRateLimit("rate limit: at most 1 questions a minute per client; try again in 60 s"),
    "Too many questions: this server takes at most 1 question a minute from you. Try again in 60 s.",
  );
  assert.equal(
    formatRateLimit("rate limit: at most 30 questions a minute per client; try again in 2 s (HTTP 429)"),
    "Too many questions: this server takes at most 30 questions a minute from you. Try again in 2 s.",
  );
  assert.match(
    formatRateLimit("rate limit: at most 1 questions a minute per client; try again in 600 s"),
    /Try again in about 10 minutes\.$/,
  );
});

test("other errors are left alone", () => {
  assert.equal(formatRateLimit("the question is 3100 characters; the limit is 3000"), null);
  assert.equal(formatRateLimit(undefined), null);
});
