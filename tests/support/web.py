"""The browser tests' scripted answer and page checks.

The scripted model streams SCRIPT: Markdown whose words include numbered markers
(w01, w02, ...), so any chunk lost or shown twice changes the marker list a test reads
off the page.
"""

from __future__ import annotations

from tests.web_browser import Tab

SCRIPT = (
    "## Why Redis Streams w01\n\n"
    "An answer takes w02 seconds to w03 minutes, so every w04 chunk is appended w05 to a "
    "**stream** w06 in Redis. A w07 reload, a w08 second tab w09 or a w10 flaky network "
    "loses w11 nothing.\n\n"
    "- Resume w12 from the last w13 entry id\n"
    "- Fan out w14 to every w15 viewer\n"
    "- Replay w16 at the w17 original pace\n\n"
    "```python\n"
    "await redis.xadd(key, {'type': 'chunk', 'data': text})  # w18\n"
    "```\n\n"
    "Each entry id w19 carries the w20 time it w21 was written, w22 which is how w23 this "
    "page measures w24 tokens per w25 second and replays w26 a stored w27 answer at w28 its "
    "own pace. w29 A consumer w30 group hands w31 each question w32 to one worker, w33 and "
    "a crashed w34 worker's request w35 is claimed w36 by another. w37 The end w38 entry "
    "records w39 usage and w40 timing."
)
ALL_MARKERS = [f"w{i:02d}" for i in range(1, 41)]
SCRIPT_CHUNKS = len(SCRIPT.split())
SCRIPT_RATE = 25.0  # chunks per second: about five seconds per answer


def mock_env(model_url: str) -> dict[str, str]:
    """`serve` answering with the mock model at `model_url` (directives pick answers)."""
    return {
        "TOKENRELAY_PROVIDER": "openai",
        "OPENAI_BASE_URL": model_url + "/v1",
        "OPENAI_API_KEY": "sk-test-not-a-secret",
        "TOKENRELAY_PROVIDER_MAX_RETRIES": "0",
        "TOKENRELAY_MAX_QUESTION_CHARS": "3000",
    }


def scripted_env(rate: float = SCRIPT_RATE) -> dict[str, str]:
    return {
        "TOKENRELAY_PROVIDER": "scripted",
        "TOKENRELAY_SCRIPTED_TEXT": SCRIPT,
        "TOKENRELAY_SCRIPTED_RATE": str(rate),
        "TOKENRELAY_RECLAIM_IDLE_MS": "1000",
    }


def assert_healthy(*tabs: Tab) -> None:
    for tab in tabs:
        assert tab.page_errors == [], f"uncaught errors in the page: {tab.page_errors}"
        assert tab.dialogs == [], f"dialogs opened: {tab.dialogs}"
