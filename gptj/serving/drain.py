"""Stopping a server that still has requests in flight says so.

uvicorn's first Ctrl-C (or SIGTERM) stops accepting connections and waits for the open ones to
finish, silently at the usual log levels, and its second Ctrl-C stops at once. `DrainOnExit`
(a mixin for uvicorn.Server) prints one line at the first signal naming the requests in flight
and the longest wait, the request timeout (no request outlives it), and bounds uvicorn's wait
by it; at the second it says what is cut off and cuts it off as a client that hangs up would
(no request task is cancelled mid-response, so nothing is logged as a traceback), then stops the
app as a graceful stop does (the engine thread, tensor-parallel followers).
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time

CUT_OFF_WAIT_S = 5.0  # the most a second Ctrl-C waits for the requests it cut off to end


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

    async def shutdown(self, sockets=None) -> None:
        await super().shutdown(sockets)
        if self.force_exit and self.drain_state is not None:
            await self._cut_off()

    async def _cut_off(self) -> None:
        """After a second Ctrl-C: close the connections still open, so their requests end as on
        a client's disconnect, then run the app's shutdown, which uvicorn skips when forced."""
        for connection in list(self.server_state.connections):
            connection.transport.close()
        deadline = time.monotonic() + CUT_OFF_WAIT_S
        while self.server_state.tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await self.lifespan.shutdown()
