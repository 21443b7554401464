"""The four vendor-shaped listeners: blocking calls over the asyncio core, callbacks on a thread.

`ScreenPopTelephoneListener().initialize("6000@servername")` blocks until the hub answers, as the
COM control's Initialize does. The asyncio core runs on one background loop per process.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from ..model import ListenerStatus, Media
from .core import AsyncListener

T = TypeVar("T")
_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def background_loop() -> asyncio.AbstractEventLoop:
    """The process's listener loop, started on first use on a daemon thread."""
    global _loop
    with _loop_lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="spop-listeners", daemon=True)
            thread.start()
            _loop = loop
        return _loop


_Item = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[None] | None"]


def _dispatch(
    events: queue.SimpleQueue[_Item | None], loop: asyncio.AbstractEventLoop, log: Any
) -> None:
    """Run callbacks in order; a slow one delays only this listener's later callbacks."""
    while True:
        item = events.get()
        if item is None:
            return
        fn, args, handled = item
        try:
            fn(*args)
        except Exception:
            log.exception("callback %r failed", fn)
        if handled is not None:
            loop.call_soon_threadsafe(_resolve, handled)


def _resolve(handled: asyncio.Future[None]) -> None:
    if not handled.done():
        handled.set_result(None)


class _BlockingListener:
    """Blocking lifecycle calls; callbacks run in order on this listener's own thread."""

    MEDIA: Media

    def __init__(
        self, reconnecting_interval: float = 30.0, *, token: str | None = None, **options: Any
    ) -> None:
        self._loop = background_loop()
        self._core = self._run_sync(self._make_core(reconnecting_interval, token, options))
        self._events: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        # The thread holds the queue, not the listener, so a dropped listener is collected
        # (and __del__ ends the thread).
        self._thread = threading.Thread(
            target=_dispatch,
            args=(self._events, self._loop, self._core.log),
            name=f"spop-{self.MEDIA}-callbacks",
            daemon=True,
        )
        self._thread.start()

    async def _make_core(
        self, interval: float, token: str | None, options: dict[str, Any]
    ) -> AsyncListener:
        return AsyncListener(self.MEDIA, reconnecting_interval=interval, token=token, **options)

    def _run_sync(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    # -- the vendor's methods -------------------------------------------------------------
    def initialize(self, address: str) -> None:
        self._run_sync(self._core.initialize(address))

    def start_listening(self, resource: str) -> None:
        self._run_sync(self._core.start_listening(resource))

    def stop_listening(self) -> None:
        self._run_sync(self._core.stop_listening())

    def shutdown(self) -> None:
        self._run_sync(self._core.shutdown())

    # -- callbacks ------------------------------------------------------------------------
    def on_screen_pop(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """fn(event) for every pop, on this listener's callback thread. Returns fn.

        The pop is acknowledged to the hub once fn has returned (or raised)."""
        events, loop = self._events, self._loop

        def hand_off(event: Any) -> asyncio.Future[None]:
            handled = loop.create_future()
            events.put((fn, (event,), handled))
            return handled

        self._core.on_screen_pop(hand_off)
        return fn

    def on_contact_changed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """fn(change) for every update of a contact this listener was popped for (a
        `ContactChange`), on the callback thread, in order with the pops. Returns fn.

        Add it before `initialize`: the listener asks the hub for updates as it connects.
        The change is acknowledged once fn has returned (or raised)."""
        events, loop = self._events, self._loop

        def hand_off(change: Any) -> asyncio.Future[None]:
            handled = loop.create_future()
            events.put((fn, (change,), handled))
            return handled

        self._core.on_contact_changed(hand_off)
        return fn

    def on_status_changed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """fn(old, new) on every status change, in order with the pops. Returns fn."""
        events = self._events
        self._core.on_status_changed(lambda old, new: events.put((fn, (old, new), None)))
        return fn

    # -- the vendor's properties ----------------------------------------------------------
    @property
    def status(self) -> ListenerStatus:
        return self._core.status

    @property
    def administration_server_address(self) -> str:
        return self._core.administration_server_address

    @property
    def reconnecting_interval(self) -> float:
        return self._core.reconnecting_interval

    @reconnecting_interval.setter
    def reconnecting_interval(self, seconds: float) -> None:
        if float(seconds) <= 0:
            raise ValueError("reconnecting_interval must be positive")
        self._core.reconnecting_interval = float(seconds)

    @property
    def pops_received(self) -> int:
        return self._core.pops_received

    def __del__(self) -> None:
        events = getattr(self, "_events", None)
        if events is not None:
            events.put(None)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._core.resource or '-'} {self.status}>"


class ScreenPopTelephoneListener(_BlockingListener):
    """Watches an extension for call pops."""

    MEDIA = Media.telephone

    @property
    def extension(self) -> str:
        return self._core.resource


class _UserListener(_BlockingListener):
    @property
    def user_id(self) -> str:
        return self._core.resource


class ScreenPopCallbackListener(_UserListener):
    """Watches a user ID for callback pops."""

    MEDIA = Media.callback


class ScreenPopEmailListener(_UserListener):
    """Watches a user ID for email pops."""

    MEDIA = Media.email


class ScreenPopWebCollaborationListener(_UserListener):
    """Watches a user ID for web-collaboration pops."""

    MEDIA = Media.webcollab
