"""spop: open screen pops for contact centers. Public names only; imports are lazy so the CLI starts fast."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "ListenerStatus": "model",
    "Error": "model",
    "ScreenPopError": "model",
    "Media": "model",
    "ContactDataCollection": "model",
    "ContactDataItem": "model",
    "ScreenPopEvent": "model",
    "ScreenPopTelephoneEvent": "model",
    "ScreenPopCallbackEvent": "model",
    "ScreenPopEmailEvent": "model",
    "ScreenPopWebCollaborationEvent": "model",
    "StatusChangedEvent": "model",
    "ContactChange": "model",
    "ScreenPopTelephoneListener": "listener.blocking",
    "ScreenPopCallbackListener": "listener.blocking",
    "ScreenPopEmailListener": "listener.blocking",
    "ScreenPopWebCollaborationListener": "listener.blocking",
    "AsyncListener": "listener.core",
    "LinkPool": "listener.shared",
    "hookimpl": "hookspecs",
}

__all__ = [
    "__version__",
    "ListenerStatus",
    "Error",
    "ScreenPopError",
    "Media",
    "ContactDataCollection",
    "ContactDataItem",
    "ScreenPopEvent",
    "ScreenPopTelephoneEvent",
    "ScreenPopCallbackEvent",
    "ScreenPopEmailEvent",
    "ScreenPopWebCollaborationEvent",
    "StatusChangedEvent",
    "ContactChange",
    "ScreenPopTelephoneListener",
    "ScreenPopCallbackListener",
    "ScreenPopEmailListener",
    "ScreenPopWebCollaborationListener",
    "AsyncListener",
    "LinkPool",
    "hookimpl",
]

if TYPE_CHECKING:  # pragma: no cover
    from .hookspecs import hookimpl
    from .listener.blocking import (
        ScreenPopCallbackListener,
        ScreenPopEmailListener,
        ScreenPopTelephoneListener,
        ScreenPopWebCollaborationListener,
    )
    from .listener.core import AsyncListener
    from .listener.shared import LinkPool
    from .model import (
        ContactChange,
        ContactDataCollection,
        ContactDataItem,
        Error,
        ListenerStatus,
        Media,
        ScreenPopCallbackEvent,
        ScreenPopEmailEvent,
        ScreenPopError,
        ScreenPopEvent,
        ScreenPopTelephoneEvent,
        ScreenPopWebCollaborationEvent,
        StatusChangedEvent,
    )


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'spop_cli' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
