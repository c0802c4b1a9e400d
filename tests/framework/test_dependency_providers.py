"""Config and the context-data providers."""

from __future__ import annotations

from framework.contextdata import AuthToken, Language, UserAgent, UserId
from framework.dependency_providers import Config
from framework.rpc import RpcProxy, rpc
from framework.standalone.rpc import ClusterRpcProxy
from framework.testing.services import dummy, entrypoint_hook


class Service:
    name = "service"
    config = Config()
    language = Language()
    user_id = UserId()
    user_agent = UserAgent()
    auth_token = AuthToken()

    @dummy
    def read_config(self):
        self.config["mutated"] = True
        return self.config["SETTING"]

    @dummy
    def context(self):
        return [self.language, self.user_id, self.user_agent, self.auth_token]


def test_config_injects_a_copy_of_the_container_config(container_factory):
    config = {"SETTING": "on"}
    container = container_factory(Service, config)
    container.start()
    with entrypoint_hook(container, "read_config") as read_config:
        assert read_config() == "on"
    assert "mutated" not in config


def test_context_data_providers_expose_their_keys(container_factory):
    container = container_factory(Service, {})
    container.start()
    data = {"language": "fr", "user_id": "u1", "user_agent": "ua", "auth_token": "t"}
    with entrypoint_hook(container, "context", context_data=data) as context:
        assert context() == ["fr", "u1", "ua", "t"]


class Frontend:
    name = "frontend"
    backend = RpcProxy("backend")

    @rpc
    def call(self):
        return self.backend.whoami()


class Backend:
    name = "backend"
    language = Language()
    user_id = UserId()

    @rpc
    def whoami(self):
        return {"language": self.language, "user_id": self.user_id}


def test_context_data_travels_through_rpc_chains(memory_config, runner_factory):
    runner_factory(memory_config, Frontend, Backend).start()
    context = {"language": "de", "user_id": "42"}
    with ClusterRpcProxy(memory_config, context_data=context, timeout=5) as cluster:
        assert cluster.frontend.call() == {"language": "de", "user_id": "42"}
