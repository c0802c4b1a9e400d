"""Calling a run's target: an RPC call (with the run's timeout) or an event
dispatch, turned into an outcome with a reason, never an exception."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from framework.exceptions import RemoteError, RpcTimeout, UnknownService
from services.scheduler.schemas import OUTCOME_FAILED, OUTCOME_SUCCEEDED, TARGET_RPC

log = logging.getLogger(__name__)

SUMMARY_MAX_LENGTH = 500
ERROR_MAX_LENGTH = 1000


@dataclass(frozen=True)
class Outcome:
    outcome: str  # OUTCOME_SUCCEEDED or OUTCOME_FAILED
    result_summary: str | None = None
    error: str | None = None


def call_target(
    cluster: Any,
    dispatch: Callable[..., None],
    target: dict[str, Any],
    timeout: float,
    on_sent: Callable[[], None],
) -> Outcome:
    """Call or dispatch ``target``; every failure becomes a failed ``Outcome``.

    ``on_sent`` runs once the request (or event) is on its way, before the reply
    is awaited: what it does (announcing the run) adds nothing to the latency.
    """
    if target["kind"] == TARGET_RPC:
        name = f"{target['service']}.{target['method']}"
        try:
            proxy = cluster[target["service"]].with_timeout(timeout)
            reply = getattr(proxy, target["method"]).call_async(
                **target.get("kwargs", {})
            )
            on_sent()
            result = reply.result()
        except RpcTimeout:
            return Outcome(
                OUTCOME_FAILED, error=f"{name} did not answer within {timeout}s"
            )
        except UnknownService:
            return Outcome(
                OUTCOME_FAILED,
                error=f"service {target['service']} is not running (nothing consumes its queue)",
            )
        except RemoteError as exc:
            return Outcome(
                OUTCOME_FAILED,
                error=_clip(
                    f"{name} raised {exc.exc_type}: {exc.value}", ERROR_MAX_LENGTH
                ),
            )
        except Exception as exc:
            # Registered exception types come back as themselves (MethodNotFound...).
            log.warning(
                "target call failed",
                extra={"target": name, "error": type(exc).__name__},
            )
            return Outcome(
                OUTCOME_FAILED,
                error=_clip(
                    f"{name} failed: {type(exc).__name__}: {exc}", ERROR_MAX_LENGTH
                ),
            )
        return Outcome(OUTCOME_SUCCEEDED, result_summary=_summary(result))
    try:
        dispatch(target["event_type"], target.get("payload", {}))
        on_sent()
    except Exception as exc:
        log.warning(
            "event dispatch failed",
            extra={"event_type": target["event_type"], "error": type(exc).__name__},
        )
        return Outcome(
            OUTCOME_FAILED,
            error=f"dispatching {target['event_type']} failed: {type(exc).__name__}",
        )
    return Outcome(
        OUTCOME_SUCCEEDED, result_summary=f"dispatched {target['event_type']}"
    )


def _summary(result: Any) -> str:
    try:
        text = json.dumps(result, default=str, sort_keys=True)
    except (TypeError, ValueError):
        text = repr(result)
    return _clip(text, SUMMARY_MAX_LENGTH)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
