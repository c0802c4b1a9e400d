"""AMQP plumbing: connections, consuming and confirmed publishing.

``UndeliverableMessage`` is re-exported here because nameko users import it from
``nameko.amqp``.
"""

from __future__ import annotations

from framework.exceptions import UndeliverableMessage

__all__ = ["UndeliverableMessage"]
