"""Config keys, their defaults, and the protocol constants shared with nameko."""

from __future__ import annotations

# -- config keys (names as nameko spells them, mixed case included) ---------------
AMQP_URI_CONFIG_KEY = "AMQP_URI"
AMQP_SSL_CONFIG_KEY = "AMQP_SSL"
LOGIN_METHOD_CONFIG_KEY = "LOGIN_METHOD"
HEARTBEAT_CONFIG_KEY = "HEARTBEAT"
PREFETCH_COUNT_CONFIG_KEY = "PREFETCH_COUNT"
RPC_EXCHANGE_CONFIG_KEY = "rpc_exchange"
SERIALIZER_CONFIG_KEY = "serializer"
ACCEPT_CONFIG_KEY = "ACCEPT"
SERIALIZERS_CONFIG_KEY = "SERIALIZERS"
MAX_WORKERS_CONFIG_KEY = "max_workers"
PARENT_CALLS_CONFIG_KEY = "parent_calls_tracked"
SERVICE_CONTAINER_CLS = "SERVICE_CONTAINER_CLS"
AUTO_DELETE_EVENT_EXCHANGES_CONFIG_KEY = "AUTO_DELETE_EVENT_EXCHANGES"
DECLARE_EVENT_EXCHANGES_CONFIG_KEY = "DECLARE_EVENT_EXCHANGES"
WEB_SERVER_CONFIG_KEY = "WEB_SERVER_ADDRESS"

# -- keys of our own (where we go beyond nameko) -----------------------------------
RPC_TIMEOUT_CONFIG_KEY = "RPC_TIMEOUT"
DRAIN_TIMEOUT_CONFIG_KEY = "DRAIN_TIMEOUT"
DEAD_LETTER_EXCHANGE_CONFIG_KEY = "DEAD_LETTER_EXCHANGE"
MAX_REDELIVERIES_CONFIG_KEY = "MAX_REDELIVERIES"
CONNECT_RETRY_MAX_CONFIG_KEY = "CONNECT_RETRY_MAX_INTERVAL"
PUBLISH_CONFIRM_TIMEOUT_CONFIG_KEY = "PUBLISH_CONFIRM_TIMEOUT"

# -- defaults ----------------------------------------------------------------------
DEFAULT_AMQP_URI = "pyamqp://guest:guest@localhost"
DEFAULT_MAX_WORKERS = 10
DEFAULT_PARENT_CALLS_TRACKED = 10
DEFAULT_SERIALIZER = "json"
DEFAULT_HEARTBEAT = 60
DEFAULT_RPC_EXCHANGE = "nameko-rpc"
DEFAULT_RPC_TIMEOUT = None  # seconds; None waits forever, as nameko does
DEFAULT_DRAIN_TIMEOUT = 30.0  # seconds a graceful stop waits for in-flight workers
DEFAULT_DEAD_LETTER_EXCHANGE = "framework-dlx"
DEFAULT_MAX_REDELIVERIES = 5
DEFAULT_CONNECT_RETRY_MAX_INTERVAL = 5.0
DEFAULT_PUBLISH_CONFIRM_TIMEOUT = 30.0
# How a publish is retried on connection errors (kombu's retry_policy keys): 1 + 3 + 5s
# of backoff rides out a broker restart; a publish that still fails raises.
DEFAULT_RETRY_POLICY = {
    "max_retries": 3,
    "interval_start": 1.0,
    "interval_step": 2.0,
    "interval_max": 5.0,
}
DEFAULT_WEB_SERVER_ADDRESS = "0.0.0.0:8000"
# kombu transport options of connections made by ``amqp.publish.get_connection``.
DEFAULT_TRANSPORT_OPTIONS = DEFAULT_RETRY_POLICY

# -- context data keys -------------------------------------------------------------
CALL_ID_STACK_CONTEXT_KEY = "call_id_stack"
# The id of the event a handler is handling (framework.outbox puts it in the
# ``nameko.event_id`` header). It names that one message, so it is not passed on
# to the messages the worker sends, as the rest of the context data is.
EVENT_ID_CONTEXT_KEY = "event_id"
AUTH_TOKEN_CONTEXT_KEY = "auth_token"
LANGUAGE_CONTEXT_KEY = "language"
USER_ID_CONTEXT_KEY = "user_id"
USER_AGENT_CONTEXT_KEY = "user_agent"

HEADER_PREFIX = "nameko"

NON_PERSISTENT = 1
PERSISTENT = 2

# -- queue naming (must match nameko exactly) --------------------------------------
RPC_QUEUE_TEMPLATE = "rpc-{}"
RPC_REPLY_QUEUE_TEMPLATE = "rpc.reply-{}-{}"
RPC_REPLY_QUEUE_TTL = 300000  # ms, the x-expires nameko gives reply queues
# Delivery mode of RPC messages (see framework.rpc): transient by default, as
# persistence buys no guarantee there.
RPC_PERSISTENT_REQUESTS_CONFIG_KEY = "RPC_PERSISTENT_REQUESTS"
RPC_PERSISTENT_REPLIES_CONFIG_KEY = "RPC_PERSISTENT_REPLIES"
DEFAULT_RPC_PERSISTENT_REQUESTS = False
DEFAULT_RPC_PERSISTENT_REPLIES = False

# -- web: HTTP and websocket entrypoints (keys of our own beyond WEB_SERVER_ADDRESS) --
WEB_MAX_CONTENT_LENGTH_CONFIG_KEY = "WEB_MAX_CONTENT_LENGTH"
HTTP_CONTEXT_HEADERS_CONFIG_KEY = "HTTP_CONTEXT_HEADERS"
WEBSOCKET_QUEUE_SIZE_CONFIG_KEY = "WEBSOCKET_QUEUE_SIZE"
WEBSOCKET_SEND_TIMEOUT_CONFIG_KEY = "WEBSOCKET_SEND_TIMEOUT"

REQUEST_ID_CONTEXT_KEY = "request_id"

DEFAULT_WEB_MAX_CONTENT_LENGTH = 10 * 1024 * 1024  # bytes; larger bodies get a 413
# HTTP header -> context key. No `Authorization`: context data travels in the AMQP
# headers of every downstream call and into logs; a credential must not.
DEFAULT_HTTP_CONTEXT_HEADERS = {
    "X-Request-Id": REQUEST_ID_CONTEXT_KEY,
    "Accept-Language": LANGUAGE_CONTEXT_KEY,
    "User-Agent": USER_AGENT_CONTEXT_KEY,
}
DEFAULT_WEBSOCKET_QUEUE_SIZE = 256  # frames queued for one socket before it is dropped
DEFAULT_WEBSOCKET_SEND_TIMEOUT = 10.0  # seconds one frame may take to send

# -- operations: logging, health and metrics (framework.logs, .health, .metrics) ----
LOG_FORMAT_CONFIG_KEY = "LOG_FORMAT"  # "text" (default) or "json"; also read from env
LOG_LEVEL_CONFIG_KEY = "LOG_LEVEL"  # a level name or number; also read from env
HEALTH_SERVER_CONFIG_KEY = "HEALTH_SERVER_ADDRESS"  # "[address:]port"; unset: no server
HEALTH_CHECK_TIMEOUT_CONFIG_KEY = "HEALTH_CHECK_TIMEOUT"

DEFAULT_LOG_FORMAT = "text"
DEFAULT_LOG_LEVEL = "INFO"
DEFAULT_HEALTH_CHECK_TIMEOUT = 5.0  # seconds one readiness check may take
