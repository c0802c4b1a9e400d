"""What both sides of the interop tests agree on: names, and registered errors.

Imported by our tests *and* by the nameko processes (from the nameko venv, with
``tests/`` on ``PYTHONPATH``), so it may import neither side unconditionally. The
exceptions are registered with every error registry this interpreter has: ours
here, nameko's over there. Both key the registry by module path, and the module
path is the same on both sides (``interop.contract.<Name>``), so an exception raised
on one side is rebuilt as an instance of the same class on the other.
"""

from __future__ import annotations

import importlib

# -- services ---------------------------------------------------------------------
# nameko services (run by `nameko run`, see nameko_side/services.py)
NAMEKO_ECHO = "nameko_echo"
NAMEKO_CALLER = "nameko_caller"  # calls OURS through nameko's in-service RpcProxy
NAMEKO_DISPATCHER = "nameko_dispatcher"
NAMEKO_LISTENER = "nameko_listener"

# our services (run in the test process)
OURS = "ours"
OURS_DISPATCHER = "ours_dispatcher"

# Run on both sides under the same name, so that both consume the same queues.
POOL_MEMBER = "pool_member"
POOL_SOURCE = "pool_source"  # dispatched by a standalone dispatcher only
WIRE_MIRROR = "wire_mirror"

# -- events ----------------------------------------------------------------------
EVENT = "interop_happened"
# pool_member has one handler per handler type, each on its own event type
POOL_EVENTS = {
    "service_pool": "pooled_happened",
    "singleton": "singleton_happened",
    "broadcast": "broadcast_happened",
}
# The handler method for each handler type, in every listener on both sides (the
# names are part of SERVICE_POOL and BROADCAST queue names)
HANDLER_METHODS = {
    "service_pool": "handle_pooled",
    "singleton": "handle_singleton",
    "broadcast": "handle_broadcast",
}
# The BROADCAST identifier of handlers that must keep reliable delivery (a durable,
# non-exclusive queue another connection may redeclare).
FIXED_BROADCAST_IDENTIFIER = "interop-host"


# -- errors ---------------------------------------------------------------------


class Rejected(Exception):
    """A business error both sides register, so it crosses as itself."""


class NotRegistered(Exception):
    """Known to both sides but registered with neither: it crosses as RemoteError."""


def _register_everywhere(exc_type: type[BaseException]) -> None:
    for module_name in ("framework.exceptions", "nameko.exceptions"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue  # this side of the wire does not have that framework
        module.deserialize_to_instance(exc_type)


_register_everywhere(Rejected)
