"""Stopping a server that still has requests in flight says so.

uvicorn's first Ctrl-C (or SIGTERM) stops accepting connections and waits for the open ones to
finish, silently at the usual log levels, and its second Ctrl-C stops at once. `DrainOnExit`
(a mixin for uvicorn.Server) prints one line at the first signal naming the requests in flight
and the longest wait, the request timeout (no request outlives it), and bounds uvicorn's wait
by it; at the second it says what is cut off.
"""

from __future__ import annotations

import signal
import sys


def in_flight(state) -> int:
    """Requests the engine has not finished (0 before the model has loaded)."""
    return state.loop.in_flight if state.loop is not None else 0


def drain_notice(state) -> str:
    count = in_flight(state)
    if not count:
        return "stopping: no request in flight"
    limit = state.config.server.request_timeout
    return (f"stopping: waiting for {count} request{'s' if count != 1 else ''} in flight to finish, at most "
            f"{limit:g} s (the request timeout); Ctrl-C again stops now")


class DrainOnExit:
    """Mixin for uvicorn.Server; set `drain_state` to the server's ServerState."""

    drain_state = None

    def handle_exit(self, sig, frame) -> None:
        state = self.drain_state
        if state is not None:
            if not self.should_exit:
                self.config.timeout_graceful_shutdown = state.config.server.request_timeout
                print(drain_notice(state), file=sys.stderr, flush=True)
            elif sig == signal.SIGINT and not self.force_exit and in_flight(state):
                print(f"stopping now: {in_flight(state)} request(s) cut off", file=sys.stderr, flush=True)
        super().handle_exit(sig, frame)
