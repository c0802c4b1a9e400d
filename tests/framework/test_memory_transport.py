"""Services, proxies and dispatchers on kombu's in-memory broker: unit tests and a
one-process dev mode without RabbitMQ."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import kombu
import pytest

from framework.events import BROADCAST, EventDispatcher, event_handler
from framework.exceptions import RemoteError, RpcTimeout, UnknownService
from framework.messaging import Publisher, consume
from framework.rpc import RpcProxy, rpc
from framework.standalone.events import event_dispatcher
from framework.standalone.rpc import ClusterRpcProxy
from tests.helpers import wait_for

seen: list = []
jobs = kombu.Queue(
    "jobs", exchange=kombu.Exchange("jobs", type="direct"), routing_key="job"
)


class Orders:
    name = "orders"
    dispatch = EventDispatcher()
    publish = Publisher(exchange=jobs.exchange, declare=[jobs])

    @rpc
    def create(self, order_id):
        self.dispatch("order_created", {"id": order_id})
        self.publish({"job": order_id}, routing_key="job")
        return order_id

    @rpc
    def fail(self):
        raise ValueError("no")


class Billing:
    name = "billing"
    orders = RpcProxy("orders", timeout=5)

    @rpc
    def create_via_orders(self, order_id):
        return self.orders.create(order_id)

    @event_handler("orders", "order_created")
    def on_created(self, payload):
        seen.append(("event", payload["id"]))

    @event_handler(
        "orders", "order_created", handler_type=BROADCAST, reliable_delivery=False
    )
    def on_created_everywhere(self, payload):
        seen.append(("broadcast", payload["id"]))

    @consume(jobs)
    def on_job(self, body):
        seen.append(("job", body["job"]))


@pytest.fixture(autouse=True)
def clear():
    seen.clear()


@pytest.fixture
def services(memory_config, runner_factory):
    runner = runner_factory(memory_config, Orders, Billing)
    runner.start()
    return runner


def test_rpc_events_and_consumers_work_without_a_broker(memory_config, services):
    with ClusterRpcProxy(memory_config, timeout=5) as cluster:
        assert cluster.orders.create(1) == 1
        assert cluster.billing.create_via_orders(2) == 2
    wait_for(lambda: len(seen) == 6)
    assert sorted(seen) == sorted(
        [
            ("event", 1),
            ("event", 2),
            ("broadcast", 1),
            ("broadcast", 2),
            ("job", 1),
            ("job", 2),
        ]
    )


def test_deliveries_are_acked_so_the_prefetch_window_never_fills(
    memory_config, services
):
    # Far more calls than the consumer's prefetch (its worker pool): an
    # unacknowledged delivery holds a slot, and once all are held nothing more
    # is delivered.
    calls = 5 * memory_config.get("max_workers", 10)
    with ClusterRpcProxy(memory_config, timeout=5) as cluster:
        assert [cluster.orders.create(n) for n in range(calls)] == list(range(calls))


def test_errors_and_unknown_services_behave_as_on_rabbitmq(memory_config, services):
    with ClusterRpcProxy(memory_config, timeout=5) as cluster:
        with pytest.raises(RemoteError, match="ValueError"):
            cluster.orders.fail()
        with pytest.raises(UnknownService):
            cluster.nobody.anything()


def test_timeouts_hold_in_memory_too(memory_config, runner_factory):
    class Stuck:
        name = "stuck"

        @rpc
        def wait(self):
            from framework import concurrency

            concurrency.sleep(1)

    runner_factory(memory_config, Stuck).start()
    with (
        ClusterRpcProxy(memory_config, timeout=0.2) as cluster,
        pytest.raises(RpcTimeout),
    ):
        cluster.stuck.wait()


def test_standalone_dispatcher_reaches_handlers(memory_config, services):
    dispatch = event_dispatcher(memory_config)
    dispatch("orders", "order_created", {"id": 9})
    wait_for(lambda: ("event", 9) in seen and ("broadcast", 9) in seen)
    dispatch.close()


def test_one_process_dev_mode_runs_services_together_without_a_broker():
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "framework.cli.main",
            "run",
            "tests.framework.dev_mode_services",
            "--broker",
            "memory://",
        ],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        wait_for(
            lambda: sum(line.startswith("pong ") for line in lines) >= 3, timeout=30
        )
        assert "pong 1" in "".join(lines)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
