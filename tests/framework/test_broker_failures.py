"""A broker that goes away: start-up without it, reconnection, reliable events,
RPCs in flight, and heartbeats under CPU-bound workers.

The broker "goes away" by pulling the plug on a TCP proxy we run in front of the
real RabbitMQ (``tests/tcp_proxy.py``): to the service it is indistinguishable
from a broker that stopped, and other tests on the same broker are unaffected.
"""

from __future__ import annotations

import logging
import subprocess
import time
from urllib.parse import urlsplit, urlunsplit

import kombu
import pytest

from framework import concurrency
from framework.events import EventDispatcher, event_handler
from framework.exceptions import RpcTimeout
from framework.messaging import QueueConsumer, consume
from framework.rpc import RpcProxy, rpc
from framework.standalone.events import event_dispatcher
from framework.standalone.rpc import ClusterRpcProxy
from framework.testing.utils import get_extension
from tests.helpers import TcpProxy, wait_for


class BrokerProxy(TcpProxy):
    """A proxy in front of RabbitMQ, and the config that goes through it."""

    def __init__(self, rabbit_config: dict) -> None:
        super().__init__(upstream_port=5672)
        parts = urlsplit(rabbit_config["AMQP_URI"])
        netloc = f"{parts.username}:{parts.password}@127.0.0.1:{self.port}"
        self.config = {
            **rabbit_config,
            "AMQP_URI": urlunsplit(parts._replace(netloc=netloc)),
        }


@pytest.fixture
def broker_proxy(rabbit_config):
    proxy = BrokerProxy(rabbit_config)
    yield proxy
    proxy.close()


handled: list = []


class Echo:
    name = "echo"

    @rpc
    def echo(self, value):
        return value

    @rpc
    def sleep(self, seconds):
        concurrency.sleep(seconds)
        return seconds


jobs = kombu.Queue(
    "failure-jobs",
    exchange=kombu.Exchange("failure-jobs", type="direct"),
    routing_key="job",
)


class Everything:
    """One service with every kind of consumer: RPC, events, consume, replies."""

    name = "everything"
    echo = RpcProxy("echo", timeout=10)
    dispatch = EventDispatcher()

    @rpc
    def relay(self, value):
        return self.echo.echo(value)

    @event_handler("source", "ping")
    def on_ping(self, payload):
        handled.append(("event", payload))

    @consume(jobs)
    def on_job(self, body):
        handled.append(("job", body))


@pytest.fixture(autouse=True)
def clear():
    handled.clear()


def consumer_of(container) -> QueueConsumer:
    return get_extension(container, QueueConsumer)


def test_a_service_started_while_the_broker_is_down_waits_then_serves(
    rabbit_config, broker_proxy, container_factory, caplog
):
    broker_proxy.cut()
    container = container_factory(Echo, broker_proxy.config)
    with caplog.at_level(logging.WARNING):
        starter = concurrency.spawn(container.start)
        wait_for(lambda: "waiting for broker" in caplog.text, timeout=10)
    assert not starter.dead
    broker_proxy.restore()
    with concurrency.Timeout(20):
        starter.wait()
    with ClusterRpcProxy(rabbit_config, timeout=10) as cluster:
        assert cluster.echo.echo("up") == "up"


def test_every_consumer_comes_back_after_the_connection_drops(
    rabbit_config, broker_proxy, runner_factory
):
    runner_factory(rabbit_config, Echo).start()
    runner = runner_factory(broker_proxy.config, Everything)
    runner.start()
    container = runner.containers[0]
    loop = consumer_of(container).loop
    generation = loop.generation

    broker_proxy.cut()
    wait_for(lambda: not loop.connected, timeout=10)
    broker_proxy.restore()
    wait_for(lambda: loop.connected and loop.generation > generation, timeout=20)

    with ClusterRpcProxy(rabbit_config, timeout=10) as cluster:
        assert (
            cluster.everything.relay("rpc and reply listener")
            == "rpc and reply listener"
        )
    dispatch = event_dispatcher(rabbit_config)
    dispatch("source", "ping", "event handler")
    dispatch.close()
    with kombu.Connection(rabbit_config["AMQP_URI"]) as connection:
        connection.Producer().publish(
            "consumer",
            exchange=jobs.exchange,
            routing_key="job",
            declare=[jobs],
            serializer="json",
        )
    wait_for(
        lambda: sorted(handled) == [("event", "event handler"), ("job", "consumer")],
        timeout=10,
    )


def test_reliable_events_before_during_and_after_an_outage_are_all_handled(
    rabbit_config, broker_proxy, runner_factory
):
    class Counter:
        name = "counter"

        @event_handler("source", "ping")
        def on_ping(self, payload):
            handled.append(payload)

    runner_factory(rabbit_config, Counter).start()
    dispatch = event_dispatcher(
        broker_proxy.config,
        retry_policy={
            "max_retries": 10,
            "interval_start": 0.5,
            "interval_step": 0.5,
            "interval_max": 1,
        },
    )
    sent = []
    for i in range(5):
        dispatch("source", "ping", i)
        sent.append(i)

    broker_proxy.cut()
    during = concurrency.spawn(
        lambda: [dispatch("source", "ping", i) or i for i in range(5, 10)]
    )
    concurrency.sleep(1.5)
    broker_proxy.restore()
    sent.extend(during.wait())  # raises if any publish could not be confirmed
    for i in range(10, 15):
        dispatch("source", "ping", i)
        sent.append(i)
    dispatch.close()
    wait_for(lambda: set(handled) >= set(sent), timeout=20)
    assert sorted(set(handled)) == list(range(15))


def test_a_publish_that_cannot_be_confirmed_raises(broker_proxy):
    dispatch = event_dispatcher(
        broker_proxy.config, retry_policy={"max_retries": 1, "interval_start": 0.1}
    )
    dispatch("source", "ping", "ok")
    broker_proxy.cut()
    started = time.monotonic()
    with pytest.raises(OSError):
        dispatch("source", "ping", "lost?")
    assert time.monotonic() - started < 30
    dispatch.close()


def test_standalone_rpc_in_flight_when_the_connection_drops_fails_within_its_timeout(
    rabbit_config, broker_proxy, runner_factory
):
    runner_factory(rabbit_config, Echo).start()
    with ClusterRpcProxy(broker_proxy.config, timeout=3) as cluster:
        reply = cluster.echo.sleep.call_async(1)
        broker_proxy.cut()
        started = time.monotonic()
        with pytest.raises((RpcTimeout, OSError)):
            reply.result()
        assert time.monotonic() - started < 3 + 2


def test_standalone_rpc_completes_when_the_connection_comes_back_in_time(
    rabbit_config, broker_proxy, runner_factory
):
    runner_factory(rabbit_config, Echo).start()
    with ClusterRpcProxy(broker_proxy.config, timeout=15) as cluster:
        reply = cluster.echo.sleep.call_async(1)
        broker_proxy.cut()
        concurrency.spawn_after(1.5, broker_proxy.restore)
        assert reply.result() == 1


def test_in_service_rpc_in_flight_when_the_connection_drops_completes_or_times_out(
    rabbit_config, broker_proxy, runner_factory
):
    class Caller:
        name = "caller"
        echo = RpcProxy("echo", timeout=4)

        @rpc
        def call_slow(self):
            return self.echo.sleep(1)

    runner_factory(rabbit_config, Echo).start()
    runner_factory(broker_proxy.config, Caller).start()
    with ClusterRpcProxy(rabbit_config, timeout=20) as cluster:
        reply = cluster.caller.call_slow.call_async()
        concurrency.sleep(0.3)
        broker_proxy.cut()
        concurrency.spawn_after(1.0, broker_proxy.restore)
        started = time.monotonic()
        try:
            assert reply.result() == 1
        except RpcTimeout:
            pass
        assert time.monotonic() - started < 4 + 5


def test_heartbeats_keep_the_connection_alive_through_cpu_bound_workers(
    rabbit_config, runner_factory, caplog
):
    class Cruncher:
        name = "cruncher"

        @rpc
        def crunch(self, seconds):
            end = time.monotonic() + seconds
            while time.monotonic() < end:  # never yields to the hub
                pass
            return seconds

    config = {**rabbit_config, "HEARTBEAT": 2, "max_workers": 1}
    runner = runner_factory(config, Cruncher)
    runner.start()
    loop = consumer_of(runner.containers[0]).loop
    generation = loop.generation
    with (
        caplog.at_level(logging.WARNING),
        ClusterRpcProxy(rabbit_config, timeout=30) as cluster,
    ):
        assert cluster.cruncher.crunch(10) == 10  # five heartbeat intervals
        assert cluster.cruncher.crunch(0) == 0
    assert loop.generation == generation, "the consumer connection was lost and re-made"
    assert "lost connection" not in caplog.text


def restart_rabbitmq() -> None:
    """Stop and start the real broker application (its data stays on disk)."""
    subprocess.run(["rabbitmqctl", "-q", "stop_app"], check=True, timeout=120)
    subprocess.run(["rabbitmqctl", "-q", "start_app"], check=True, timeout=120)
    subprocess.run(["rabbitmqctl", "-q", "await_startup"], check=True, timeout=120)


def test_a_real_broker_restart_keeps_reliable_events_and_services_reconnect(
    rabbit_config, runner_factory
):
    """The real thing once: RabbitMQ itself restarts. Persistent events in durable
    queues survive it, and a running service reconnects without a restart."""

    class Ledger:
        name = "ledger"

        @event_handler("source", "entry")
        def on_entry(self, payload):
            handled.append(payload)

    # Declare the durable queue, then stop the handler: events wait in the queue.
    first = runner_factory(rabbit_config, Ledger)
    first.start()
    first.stop()
    dispatch = event_dispatcher(rabbit_config)
    for i in range(5):
        dispatch("source", "entry", i)
    dispatch.close()

    echo = runner_factory(rabbit_config, Echo)
    echo.start()
    loop = consumer_of(echo.containers[0]).loop
    generation = loop.generation

    restart_rabbitmq()

    wait_for(lambda: loop.connected and loop.generation > generation, timeout=60)
    runner_factory(rabbit_config, Ledger).start()
    wait_for(lambda: sorted(handled) == [0, 1, 2, 3, 4], timeout=30)
    with ClusterRpcProxy(rabbit_config, timeout=10) as cluster:
        assert cluster.echo.echo("after restart") == "after restart"
