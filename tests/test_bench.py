"""The benchmark harness: its arithmetic, and a tiny sweep on real processes that must
produce every figure the issue asks for."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from bench import ROOT
from bench.mock import nonce_of, stamp_of
from bench.profile import summarise
from bench.spec import question_for
from bench.stats import percentile, summary_ms
from bench.sweep import FULL
from bench.targets import evaluate


def test_percentiles_are_nearest_rank() -> None:
    values = list(range(1, 101))
    assert [percentile(values, p) for p in (50, 99, 100)] == [50, 99, 100]
    assert percentile([7], 99) == 7 and percentile([], 50) == 0
    summary = summary_ms([1_000_000, 2_000_000, 3_000_000])
    assert summary["p50"] == 2.0 and summary["max"] == 3.0 and summary["count"] == 3


def test_mock_stamps_and_nonces_read_back() -> None:
    event = b'data: {"choices":[{"delta":{"content":" x"}}],"tokenrelay_sent_ns":1234567}'
    assert stamp_of(event) == 1234567 and stamp_of(b'data: {"choices":[]}') is None
    question = question_for("0123456789abcdef", tokens=5, rate=20)
    assert nonce_of(question) == "0123456789abcdef" and "[[mock tokens=5 rate=20" in question


def test_full_sweep_is_the_issue_grid_and_bounded() -> None:
    cells = FULL.cells()
    assert {(c.answers, c.viewers, c.rate) for c in cells} == {
        (a, v, r) for a in (1, 10, 100, 1000) for v in (1, 10) for r in (20.0, 0.0)
    }
    assert all(c.deliveries <= FULL.budget or c.tokens == 20 for c in cells)
    at_target = [c for c in cells if (c.answers, c.viewers, c.rate) == (100, 1, 20.0)]
    assert at_target[0].tokens == 200  # ten seconds at 20 tokens/s


def test_profile_summary_names_where_time_goes() -> None:
    collapsed = "\n".join(
        [
            "main (tokenrelay/cli.py:1);generate (tokenrelay/generation.py:9);"
            "create (openai/resources.py:3);parse (pydantic/main.py:4) 30",
            "main (tokenrelay/cli.py:1);_flush (tokenrelay/writer.py:80);"
            "execute (redis/asyncio/client.py:7) 10",
            "main (tokenrelay/cli.py:1);_run (tokenrelay/relay.py:5) 10",
            # uvloop: callbacks right under Runner.run, beneath uvicorn's own start-up frames
            "_serve (tokenrelay/cli.py:1);run (uvicorn/server.py:2);Runner.run (asyncio/x.py:3);"
            "send (uvicorn/protocols/ws.py:4) 25",
            "_serve (tokenrelay/cli.py:1);run (uvicorn/server.py:2);Runner.run (asyncio/x.py:3) 25",
        ]
    )
    summary = summarise(collapsed)
    assert summary["samples"] == 100
    by_package = dict(summary["by_package_pct"])
    assert by_package == {"pydantic": 30.0, "redis": 10.0, "tokenrelay": 10.0,
                          "uvicorn": 25.0, "event loop": 25.0}  # fmt: skip
    assert ["generate (generation.py)", 30.0] in summary["tokenrelay_inclusive_pct"]


def _run(mode: str, answers: int, p50: float, p99: float, **extra: Any) -> dict[str, Any]:
    return {
        "answers": answers,
        "viewers": extra.pop("viewers", 1),
        "rate": 20.0,
        "mode": mode,
        "complete": True,
        "latency_ms": {"p50": p50, "p99": p99},
        "chunks_per_s": 2000.0,
        "deliveries": 100,
        "expected_deliveries": 100,
        "redis_connections": {"gateway_min": 9, "gateway_max": 9, "viewers_max": 100},
        "cpu_us_per_chunk": {"gateway_per_delivery": 50.0, "worker_per_written": 80.0},
        **extra,
    }


def test_targets_are_judged_strictly() -> None:
    runs = [
        _run("direct", 100, 0.2, 1.0),
        _run("socketio", 100, 1.1, 5.9),  # +0.9 / +4.9: inside
        _run("sse", 100, 1.3, 3.0),  # +1.1 at p50: outside
        _run("socketio", 1000, 5.0, 50.1),
    ]
    memory = {"tokens": 500, "total_bytes": 18_000, "stream_bytes": 17_000,
              "record_bytes": 1_000, "gone_after_s": 5.2, "retention_s": 5,
              "ttl_s_when_finished": 5}  # fmt: skip
    verdicts = {t["name"]: t["status"] for t in evaluate(runs, memory)}
    assert verdicts["relay overhead over direct, 100 answers x 20/s, socketio"] == "PASS"
    assert verdicts["relay overhead over direct, 100 answers x 20/s, sse"] == "FAIL"
    assert verdicts["1,000 answers x 20/s through one gateway + one worker, socketio"] == "FAIL"
    assert verdicts["1,000 answers x 20/s through one gateway + one worker, sse"] == "NOT RUN"
    connections = "Redis connections per gateway process, 1 viewer vs 10,000"
    assert verdicts[connections] == "NOT RUN"  # never reached 10,000 viewers
    assert verdicts["Redis memory per finished 500-token answer, gone after retention"] == "PASS"


@pytest.mark.bench
@pytest.mark.timeout(300)
def test_tiny_sweep_reports_every_figure(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--answers", "2", "--viewers", "1,2",
         "--rates", "0", "--tokens", "10", "--memory-answers", "1", "--retention-s", "8",
         "--serve-cells", "2x2@0", "--out", str(tmp_path), "--name", "smoke"],
        capture_output=True, text=True, timeout=280, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = orjson.loads((tmp_path / "smoke.json").read_bytes())
    assert (tmp_path / "smoke.png").stat().st_size > 1000
    assert {(r["viewers"], r["mode"]) for r in report["runs"]} == {
        (v, m) for v in (1, 2) for m in ("direct", "socketio", "sse")
    }
    for run in report["runs"]:
        assert run["complete"], run
        assert run["deliveries"] == 2 * run["viewers"] * 10
        assert {"p50", "p99", "max"} <= set(run["latency_ms"]) and run["ttfc_ms"]["count"]
        assert run["chunks_per_s"] > 0
        if run["mode"] != "direct":
            assert run["chunks_written"] == 20
            assert 0 < run["entries_delivered"] <= run["deliveries"]  # coalesced or not
            assert run["cpu_us_per_chunk"]["gateway_per_delivery"] is not None
            assert run["cpu_us_per_chunk"]["worker_per_written"] is not None
            assert run["redis_connections"]["gateway_max"] >= 2
            assert run["hops_ms"]["model_to_redis"]["count"] == run["deliveries"]
    # The default layout: `serve` and its children, each child's CPU found and counted.
    assert {r["mode"] for r in report["serve_runs"]} == {"direct", "socketio", "sse"}
    for run in report["serve_runs"]:
        assert run["complete"] and run["layout"] == "serve", run
        assert run["deliveries"] == 2 * 2 * 10 and run["worker_processes"] >= 1
        if run["mode"] != "direct":
            assert {"serve", "gateway", "worker", "valkey"} <= set(run["cpu_s"])
            assert run["cpu_us_per_chunk"]["worker_per_written"] is not None
            assert run["cpu_us_per_chunk"]["tokenrelay_per_delivery"] is not None
    memory = report["memory"]
    # Paced at 100 tokens/s, each token is its own entry unless a write took over 10 ms.
    assert memory["tokens"] == 500 and 400 < memory["entries_per_answer"] <= 502
    assert memory["total_bytes"] > 0 and memory["gone_after_s"] is not None
    statuses = {t["name"]: t["status"] for t in report["targets"]}
    assert statuses["Redis memory per finished 500-token answer, gone after retention"] == "PASS"
    assert report["machine"]["cores"] and report["software"]["valkey"]
    assert "[PASS]" in result.stdout and "gw us" in result.stdout
