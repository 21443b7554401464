"""The whole plugin contract at a glance: every hook spop calls, with what a plugin does with it."""

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("spop")
hookimpl = HookimplMarker("spop")


@hookspec
def register_actions(register):
    """Register action types: call register(name, factory); factory(config_table) returns an action."""


@hookspec
def spop_screen_pop(pop, listener):
    """See every pop a listener receives (after its actions are queued); return value ignored."""


@hookspec
def spop_status_changed(listener, old, new):
    """See every listener status change: old and new are ListenerStatus values."""


@hookspec
def spop_contact_changed(change, listener):
    """See every update of a contact a listener was popped for: `change` is a ContactChange
    (answered, consulted, transferred, conferenced, requeued, withdrawn, ended)."""


@hookspec
def register_sources(register):
    """Register source types: call register(name, factory, description); factory(config_table)
    returns a `spop_cli.sources.Source` that turns an outside system's events into contact events."""
