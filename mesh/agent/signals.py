"""Run the agent until SIGINT or SIGTERM, and make sure it then stops within seconds.

The signal stops the agent on purpose (`Agent.stop`: its task cancelled). Python runs the
handler between bytecodes even while the event loop is busy, and a watchdog thread ends the
process if the agent has not stopped within `grace` seconds (a worker thread still
translating, a stuck cleanup): a stop must never hang. Before it exits that way it stops
Envoy as a clean stop would, unless Envoy is to be kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from types import FrameType

from mesh.agent.agent import Agent

log = logging.getLogger(__name__)


def run_until_signalled(agent: Agent, grace: float = 5.0) -> None:
    watchdog: list[threading.Timer] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def force_exit() -> None:
            log.error("agent did not stop in time, exiting", extra={"grace_s": grace})
            pid = agent.supervisor.pid if agent.supervisor is not None else None
            if pid is not None and not agent.cfg.keep_envoy:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)
            os._exit(1)

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("stopping", extra={"signal": signal.Signals(signum).name})
            loop.call_soon_threadsafe(agent.stop)
            if not watchdog:
                timer = threading.Timer(grace, force_exit)
                timer.daemon = True
                timer.start()
                watchdog.append(timer)

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        with contextlib.suppress(asyncio.CancelledError):
            await agent.run()

    asyncio.run(main())
    for timer in watchdog:
        timer.cancel()
    log.info("agent stopped")
