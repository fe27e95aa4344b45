"""The SSE reader under its older name; it lives in tests/support/sse.py."""

from tests.support.sse import Event, events

__all__ = ["Event", "events"]
