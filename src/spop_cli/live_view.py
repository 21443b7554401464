"""The live view of `spop listen` on a terminal: rich's Live, redrawn on change, printed above."""

from __future__ import annotations

import asyncio
import threading
from typing import Any


class LiveView:
    """The rich live view of a session: redrawn only when what it shows changes (an idle desk
    costs next to no CPU), and the one place actions print through while it is on screen.

    Action output (the `print` action's panel) goes through the Live's console, above the live
    region; a lock keeps a print from a worker thread and a redraw from interleaving.
    """

    POLL = 0.25  # seconds between looks at the session; a redraw only when something changed

    def __init__(self, session: Any) -> None:
        from rich.live import Live

        self.session = session
        self.lock = threading.RLock()
        self.live = Live(auto_refresh=False, redirect_stdout=True, redirect_stderr=True)
        self._task = None
        self._shown = None

    def start(self) -> None:
        from .actions import print as print_action

        self.live.start()
        self.redraw()
        print_action.print_above(self.print)
        self._task = asyncio.get_running_loop().create_task(self._watch())

    def print(self, renderable: Any) -> None:
        """Print above the live region (any thread)."""
        with self.lock:
            self.live.console.print(renderable)

    def redraw(self, force: bool = True, final: bool = False) -> None:
        from .view import fingerprint, render

        snapshot = self.session.snapshot()
        size = self.live.console.size
        key = (fingerprint(snapshot), size)
        if force or key != self._shown:
            with self.lock:
                self._shown = key
                self.live.update(
                    render(snapshot, size.height, final=final, width=size.width), refresh=True
                )

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.POLL)
            self.redraw(force=False)

    async def stop(self) -> None:
        from .actions import print as print_action

        print_action.print_above(None)
        if self._task is not None:
            self._task.cancel()
        self.redraw(final=True)  # the last frame stays on screen
        with self.lock:
            self.live.stop()
