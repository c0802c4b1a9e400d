"""``framework run``: service discovery (in process) and the process's life (subprocess)."""

from __future__ import annotations

import signal
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework.cli import run as run_command
from framework.cli.main import setup_parser
from framework.cli.run import import_service, import_services
from framework.exceptions import CommandError

from .cli_helpers import RunningCli, run_cli

SERVICE_SOURCE = """
from framework.extensions import Entrypoint

class Idle(Entrypoint):
    pass

idle = Idle.decorator

class Alpha:
    name = "alpha"

    @idle
    def ping(self):
        pass

class Beta:
    name = "beta"

    @idle
    def ping(self):
        pass

class NotAService:
    name = "plain"

    def ping(self):
        pass

not_a_class = Alpha()
"""


@pytest.fixture
def module_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh directory on sys.path and as cwd, with its modules forgotten afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]


def write_module(directory: Path, source: str, package: str | None = None) -> str:
    """Write ``source`` as a uniquely named module; its dotted name."""
    name = f"svc_{uuid.uuid4().hex[:8]}"
    target = directory
    if package is not None:
        target = directory / package
        target.mkdir(exist_ok=True)
        (target / "__init__.py").touch()
    (target / f"{name}.py").write_text(textwrap.dedent(source))
    return f"{package}.{name}" if package else name


# -- discovery ---------------------------------------------------------------------


def test_import_service_is_nameko_s_name_for_import_services(
    module_dir: Path,
) -> None:
    module = write_module(module_dir, SERVICE_SOURCE)

    assert [cls.__name__ for cls in import_service(module)] == ["Alpha", "Beta"]
    assert [cls.__name__ for cls in import_service(f"{module}:Beta")] == ["Beta"]


def test_main_hands_the_services_and_the_loaded_config_to_run(
    module_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = write_module(module_dir, SERVICE_SOURCE)
    config = module_dir / "config.yaml"
    config.write_text("AMQP_URI: amqp://from-file\nserializer: json\n")
    calls = []
    monkeypatch.setattr(
        run_command, "run", lambda *args, **kwargs: calls.append((args, kwargs)) or 0
    )
    # Configuring logging in this process would outlive the test (handlers on
    # stderr, logger levels) and change what later tests' caplog sees.
    monkeypatch.setattr(run_command, "setup_logging", lambda *args, **kwargs: None)
    args = setup_parser().parse_args(
        ["run", "--config", str(config), f"{module}:Alpha"]
    )

    assert run_command.main(args) == 0

    [((services, loaded), options)] = calls
    assert [cls.__name__ for cls in services] == ["Alpha"]
    assert loaded == {"AMQP_URI": "amqp://from-file", "serializer": "json"}
    assert options == {"backdoor_port": None}


def test_module_without_class_yields_every_class_with_an_entrypoint(
    module_dir: Path,
) -> None:
    module = write_module(module_dir, SERVICE_SOURCE)

    services = import_services(module)

    assert sorted(cls.__name__ for cls in services) == ["Alpha", "Beta"]


def test_classes_imported_into_the_module_count_as_its_services(
    module_dir: Path,
) -> None:
    origin = write_module(module_dir, SERVICE_SOURCE)
    module = write_module(module_dir, f"from {origin} import Alpha\n")

    assert [cls.__name__ for cls in import_services(module)] == ["Alpha"]


def test_module_colon_class_yields_just_that_class(module_dir: Path) -> None:
    module = write_module(module_dir, SERVICE_SOURCE)

    assert [cls.__name__ for cls in import_services(f"{module}:Beta")] == ["Beta"]


def test_a_class_needs_no_entrypoints_when_named_explicitly(module_dir: Path) -> None:
    module = write_module(module_dir, SERVICE_SOURCE)

    assert [cls.__name__ for cls in import_services(f"{module}:NotAService")] == [
        "NotAService"
    ]


def test_module_in_a_package_is_found_by_dotted_path(module_dir: Path) -> None:
    module = write_module(
        module_dir, SERVICE_SOURCE, package="pkg_" + uuid.uuid4().hex[:6]
    )

    assert len(import_services(module)) == 2


def test_file_path_suggests_the_dotted_module_path(module_dir: Path) -> None:
    module = write_module(
        module_dir, SERVICE_SOURCE, package="pkg_" + uuid.uuid4().hex[:6]
    )
    file_path = module.replace(".", "/") + ".py"

    with pytest.raises(CommandError) as exc_info:
        import_services(file_path)

    assert str(exc_info.value) == f"Failed to find service, did you mean '{module}'?"


def test_module_without_services_is_an_error(module_dir: Path) -> None:
    module = write_module(module_dir, "class Plain:\n    name = 'plain'\n")

    with pytest.raises(CommandError) as exc_info:
        import_services(module)

    assert str(exc_info.value) == (
        f"Failed to find anything that looks like a service in module '{module}'"
    )


def test_missing_class_is_an_error(module_dir: Path) -> None:
    module = write_module(module_dir, SERVICE_SOURCE)

    with pytest.raises(CommandError) as exc_info:
        import_services(f"{module}:Gamma")

    assert (
        str(exc_info.value)
        == f"Failed to find service class 'Gamma' in module '{module}'"
    )


def test_named_attribute_that_is_not_a_class_is_an_error(module_dir: Path) -> None:
    module = write_module(module_dir, SERVICE_SOURCE)

    with pytest.raises(CommandError) as exc_info:
        import_services(f"{module}:not_a_class")

    assert str(exc_info.value) == "Service must be a class."


def test_missing_module_is_a_command_error(module_dir: Path) -> None:
    with pytest.raises(CommandError) as exc_info:
        import_services("no_such_module_here")

    assert str(exc_info.value) == "No module named 'no_such_module_here'"


def test_broken_import_inside_the_service_module_propagates_with_its_traceback(
    module_dir: Path,
) -> None:
    module = write_module(module_dir, "import no_such_dependency_here\n")

    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_here"):
        import_services(module)


# -- the process -------------------------------------------------------------------


@pytest.fixture
def greeter() -> Iterator[RunningCli]:
    running = RunningCli(["run", "example_services:Greeter"])
    yield running
    running.close()


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"]
)
def test_run_starts_the_service_and_exits_cleanly_on_signal(
    greeter: RunningCli, signum: signal.Signals
) -> None:
    greeter.wait_for_output("services started: cli_greeter")

    greeter.send_signal(signum)

    assert greeter.wait_for_exit() == 0
    assert "starting services: cli_greeter" in greeter.output
    assert f"{signum.name} received, stopping services gracefully" in greeter.output
    assert "services stopped: cli_greeter" in greeter.output


def test_second_sigint_kills_a_service_whose_graceful_stop_hangs() -> None:
    stubborn = RunningCli(["run", "example_services:Stubborn"])
    try:
        stubborn.wait_for_output("services started: cli_stubborn")
        stubborn.send_signal(signal.SIGINT)
        stubborn.wait_for_output("stopping services: cli_stubborn")

        stubborn.send_signal(signal.SIGINT)

        assert stubborn.wait_for_exit() == 0
        assert "killing services: cli_stubborn" in stubborn.output
    finally:
        stubborn.close()


def test_service_that_fails_to_start_exits_non_zero() -> None:
    broken = RunningCli(["run", "example_services:Broken"])
    try:
        assert broken.wait_for_exit() == 1
        assert "failing to start on purpose" in broken.output
    finally:
        broken.close()


def test_the_heap_alive_after_start_is_frozen_out_of_the_collector() -> None:
    watcher = RunningCli(["run", "example_services:HeapWatcher"])
    try:
        watcher.wait_for_output("frozen objects: ")
        watcher.send_signal(signal.SIGTERM)
        assert watcher.wait_for_exit() == 0
    finally:
        watcher.close()


def test_logging_key_in_config_configures_logging(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent(
            """
            LOGGING:
              version: 1
              formatters:
                marked: {format: "MARKED %(message)s"}
              handlers:
                console: {class: logging.StreamHandler, formatter: marked}
              root: {level: INFO, handlers: [console]}
            """
        )
    )
    running = RunningCli(["run", "--config", str(config), "example_services:Greeter"])
    try:
        running.wait_for_output("MARKED services started: cli_greeter")
        running.send_signal(signal.SIGTERM)
        assert running.wait_for_exit() == 0
    finally:
        running.close()


def test_unknown_module_prints_error_and_exits_1() -> None:
    result = run_cli(["run", "no_such_service_module"])

    assert result.returncode == 1
    assert result.stderr.strip().endswith(
        "Error: No module named 'no_such_service_module'"
    )


def test_file_path_prints_did_you_mean_and_exits_1() -> None:
    result = run_cli(["run", "example_services.py"])

    assert result.returncode == 1
    assert (
        "Error: Failed to find service, did you mean 'example_services'?"
        in result.stderr
    )


def test_invalid_config_prints_error_and_exits_1(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("- not\n- a mapping\n")

    result = run_cli(["run", "--config", str(config), "example_services:Greeter"])

    assert result.returncode == 1
    assert "must contain a mapping at the top level" in result.stderr
