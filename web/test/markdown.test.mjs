import assert from "node:assert/strict";
import { test } from "node:test";
import { renderMarkdown } from "../src/markdown.js";

test("paragraphs, lists and code blocks render", () => {
  const html = renderMarkdown("Hi **there**\n\n- one\n- two\n\n```py\nprint(1)\n```\n");
  assert.match(html, /<p>Hi <strong>there<\/strong><\/p>/);
  assert.match(html, /<ul>\s*<li>one<\/li>\s*<li>two<\/li>\s*<\/ul>/);
  assert.match(html, /<pre><code class="language-py">print\(1\)\n<\/code><\/pre>/);
});

test("raw HTML from the model is text, not markup", () => {
  const html = renderMarkdown('<img src=x onerror="alert(1)"> <script>alert(2)</script>');
  assert.ok(!html.includes("<img"));
  assert.ok(!html.includes("<script"));
  assert.match(html, /&lt;script&gt;/);
});

test("javascript: and data: links do not become links", () => {
  for (const md of ["[x](javascript:alert(1))", "[x](JaVaScRiPt:alert(1))", "<javascript:alert(1)>",
    "[x](data:text/html;base64,PHNjcmlwdD4=)", "[x](vbscript:msgbox)", "![i](javascript:alert(1))"]) {
    const html = renderMarkdown(md);
    assert.ok(!/href=/.test(html), `${md} -> ${html}`);
  }
});

test("web links stay links; images become links", () => {
  assert.match(renderMarkdown("[r](https://redis.io)"), /<a href="https:\/\/redis.io">r<\/a>/);
  const img = renderMarkdown("![logo](https://example.com/x.png)");
  assert.ok(!img.includes("<img"));
  assert.match(img, /<a href="https:\/\/example.com\/x.png">\[image: logo\]<\/a>/);
});
