"""Config loading: nameko's YAML environment substitution, ``--define``, ``--broker``."""

from __future__ import annotations

import importlib.machinery
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from framework.cli import config as cli_config
from framework.cli.config import (
    load_config,
    load_yaml,
    parse_define,
    setup_config,
    setup_logging,
    substitute_env_vars,
)
from framework.exceptions import CommandError, ConfigurationError

ENV = {"HOST": "rabbit", "PORT": "5672", "EMPTY": "", "NESTED_REF": "${HOST}"}


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("${HOST}", "rabbit"),
        ("amqp://${HOST}:${PORT}/", "amqp://rabbit:5672/"),
        ("${MISSING}", ""),
        ("${MISSING:fallback}", "fallback"),
        ("${HOST:fallback}", "rabbit"),
        ("${EMPTY:fallback}", ""),
        ("${MISSING:}", ""),
        ("${MISSING:a:b}", "a:b"),
        ("${MISSING:https://e.com/{path}}", "https://e.com/{path}"),
        ("${MISSING:{a}{b{c}}}", "{a}{b{c}}"),
        ("${MISSING:${HOST}}", "rabbit"),
        ("${MISSING:${ALSO_MISSING:deep}}", "deep"),
        ("${MISSING:x-${ALSO_MISSING:${PORT}}-y}", "x-5672-y"),
        ("${HOST:${ALSO_MISSING:deep}}", "rabbit"),
        ("${NESTED_REF}", "${HOST}"),
        ("no references", "no references"),
        ("${}", "${}"),
        ("${WITH SPACE}", "${WITH SPACE}"),
        ("${UNCLOSED", "${UNCLOSED"),
        ("${UNCLOSED:${HOST}", "${UNCLOSED:rabbit"),
        ("$HOST {HOST}", "$HOST {HOST}"),
        ("cost: $5 ${PORT}", "cost: $5 5672"),
    ],
)
def test_substitution_of_references(template: str, expected: str) -> None:
    assert substitute_env_vars(template, ENV) == expected


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in (
        "CFG_HOST",
        "CFG_LIST",
        "CFG_FLOAT",
        "CFG_BOOL",
        "CFG_MISSING",
        "CFG_INNER",
    ):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_plain_scalar_with_reference_is_substituted_and_parsed_as_yaml(
    env: pytest.MonkeyPatch,
) -> None:
    env.setenv("CFG_LIST", "[a, b, c]")
    env.setenv("CFG_FLOAT", "1234.5")
    env.setenv("CFG_BOOL", "yes")

    config = load_yaml("LIST: ${CFG_LIST}\nFLOAT: ${CFG_FLOAT}\nBOOL: ${CFG_BOOL}\n")

    assert config == {"LIST": ["a", "b", "c"], "FLOAT": 1234.5, "BOOL": True}


def test_unset_variable_without_default_becomes_null(env: pytest.MonkeyPatch) -> None:
    assert load_yaml("KEY: ${CFG_MISSING}") == {"KEY": None}


def test_default_is_parsed_as_yaml_too(env: pytest.MonkeyPatch) -> None:
    assert load_yaml("KEY: ${CFG_MISSING:[1, 2]}") == {"KEY": [1, 2]}


def test_reference_inside_a_longer_scalar_yields_a_string(
    env: pytest.MonkeyPatch,
) -> None:
    env.setenv("CFG_HOST", "rabbit")

    assert load_yaml("AMQP_URI: amqp://guest:guest@${CFG_HOST}:5672//") == {
        "AMQP_URI": "amqp://guest:guest@rabbit:5672//"
    }


def test_quoted_scalar_is_not_substituted_without_a_tag(
    env: pytest.MonkeyPatch,
) -> None:
    env.setenv("CFG_HOST", "rabbit")

    assert load_yaml('KEY: "${CFG_HOST}"') == {"KEY": "${CFG_HOST}"}


def test_explicit_env_var_tag_substitutes_a_quoted_scalar(
    env: pytest.MonkeyPatch,
) -> None:
    env.setenv("CFG_FLOAT", "1234.5")

    assert load_yaml('KEY: !env_var "${CFG_FLOAT}"') == {"KEY": 1234.5}


def test_raw_env_var_tag_keeps_the_value_a_string(env: pytest.MonkeyPatch) -> None:
    env.setenv("CFG_FLOAT", "1234.5")
    env.setenv("CFG_BOOL", "yes")

    config = load_yaml(
        'A: !raw_env_var "${CFG_FLOAT}"\nB: !raw_env_var "${CFG_BOOL}"\nC: !raw_env_var "${CFG_MISSING}"'
    )

    assert config == {"A": "1234.5", "B": "yes", "C": ""}


def test_default_may_contain_braces(env: pytest.MonkeyPatch) -> None:
    assert load_yaml("URL: ${CFG_MISSING:https://e.com/{path}}") == {
        "URL": "https://e.com/{path}"
    }


def test_nested_default_is_resolved(env: pytest.MonkeyPatch) -> None:
    env.setenv("CFG_INNER", "inner")

    assert load_yaml(
        "A: ${CFG_MISSING:${CFG_INNER:x}}\nB: ${CFG_MISSING:${CFG_HOST:x}}"
    ) == {
        "A": "inner",
        "B": "x",
    }


def test_environment_value_is_data_not_another_template(
    env: pytest.MonkeyPatch,
) -> None:
    env.setenv("CFG_HOST", "rabbit")
    env.setenv("CFG_INNER", "${CFG_HOST}")

    assert load_yaml("KEY: ${CFG_INNER}") == {"KEY": "${CFG_HOST}"}


def test_substitution_applies_in_nested_mappings_and_lists(
    env: pytest.MonkeyPatch,
) -> None:
    env.setenv("CFG_HOST", "rabbit")

    config = load_yaml(
        textwrap.dedent(
            """
            outer:
              inner: ${CFG_HOST}
              items:
                - ${CFG_HOST}
                - ${CFG_MISSING:2}
            """
        )
    )

    assert config == {"outer": {"inner": "rabbit", "items": ["rabbit", 2]}}


def test_value_that_is_not_valid_yaml_is_a_configuration_error(
    env: pytest.MonkeyPatch,
) -> None:
    env.setenv("CFG_LIST", "[unclosed")

    with pytest.raises(ConfigurationError, match="!raw_env_var"):
        load_yaml("KEY: ${CFG_LIST}")


def test_loading_does_not_change_yaml_safe_load(env: pytest.MonkeyPatch) -> None:
    import yaml

    env.setenv("CFG_HOST", "rabbit")
    load_yaml("KEY: ${CFG_HOST}")

    assert yaml.safe_load("KEY: ${CFG_HOST}") == {"KEY": "${CFG_HOST}"}


def test_arbitrary_python_objects_are_refused() -> None:
    import yaml

    with pytest.raises(yaml.YAMLError):
        load_yaml("!!python/object/apply:os.system ['true']")


# -- files -------------------------------------------------------------------------


def test_empty_file_is_an_empty_config(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("")

    assert load_config(path) == {}


def test_missing_file_is_a_command_error(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_file_that_is_not_a_mapping_is_a_configuration_error(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("- a\n- b\n")

    with pytest.raises(ConfigurationError, match="mapping"):
        load_config(path)


def test_malformed_file_is_a_configuration_error_naming_the_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("KEY: [unclosed\n")

    with pytest.raises(ConfigurationError, match="config.yaml"):
        load_config(path)


# -- --define and --broker ---------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("KEY=value", ("KEY", "value")),
        ("KEY=3", ("KEY", 3)),
        ("KEY=[a, b]", ("KEY", ["a", "b"])),
        ("KEY={a: 1}", ("KEY", {"a": 1})),
        ("KEY=a=b", ("KEY", "a=b")),
        ("KEY=", ("KEY", None)),
        ("KEY", ("KEY", True)),
        ("AMQP_URI=amqp://u:p@h:5672/v", ("AMQP_URI", "amqp://u:p@h:5672/v")),
    ],
)
def test_define_value_is_parsed_as_yaml(option: str, expected: tuple[str, Any]) -> None:
    assert parse_define(option) == expected


def test_define_value_is_substituted(env: pytest.MonkeyPatch) -> None:
    env.setenv("CFG_HOST", "rabbit")

    assert parse_define("HOST=${CFG_HOST}") == ("HOST", "rabbit")


@pytest.mark.parametrize("option", ["=value", ""])
def test_define_without_a_key_is_a_command_error(option: str) -> None:
    with pytest.raises(CommandError):
        parse_define(option)


def test_defines_apply_after_the_file_in_order(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("A: from-file\nB: from-file\n")

    config = setup_config(path, ["A=first", "A=second", "C"])

    assert config == {"A": "second", "B": "from-file", "C": True}


def test_broker_fills_in_amqp_uri_when_nothing_else_sets_it() -> None:
    assert setup_config(None, [], "amqp://b") == {"AMQP_URI": "amqp://b"}


def test_broker_does_not_override_amqp_uri_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("AMQP_URI: amqp://from-file\n")

    assert setup_config(path, [], "amqp://b")["AMQP_URI"] == "amqp://from-file"


def test_broker_does_not_override_amqp_uri_from_a_define() -> None:
    assert (
        setup_config(None, ["AMQP_URI=amqp://defined"], "amqp://b")["AMQP_URI"]
        == "amqp://defined"
    )


# -- logging -----------------------------------------------------------------------


def test_logs_module_configures_logging_when_it_exists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    received: list[dict[str, Any]] = []
    logs = ModuleType(cli_config.LOGS_MODULE)
    logs.__spec__ = importlib.machinery.ModuleSpec(cli_config.LOGS_MODULE, None)
    logs.configure_logging = received.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, cli_config.LOGS_MODULE, logs)

    setup_logging({"AMQP_URI": "amqp://x"})

    assert received == [{"AMQP_URI": "amqp://x"}]


def test_logging_key_wins_over_the_logs_module(monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[dict[str, Any]] = []
    logs = ModuleType(cli_config.LOGS_MODULE)
    logs.__spec__ = importlib.machinery.ModuleSpec(cli_config.LOGS_MODULE, None)
    logs.configure_logging = received.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, cli_config.LOGS_MODULE, logs)

    # An incremental dictConfig changes nothing, so the test leaves logging alone.
    setup_logging({"LOGGING": {"version": 1, "incremental": True}})

    assert received == []


def test_invalid_logging_key_is_a_configuration_error() -> None:
    # Missing "version" fails before dictConfig touches any existing handler.
    with pytest.raises(ConfigurationError, match="LOGGING"):
        setup_logging({"LOGGING": {"handlers": {}}})


def test_logging_key_that_is_not_a_mapping_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="LOGGING"):
        setup_logging({"LOGGING": "verbose"})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("${A:my-{template}-x}", [("A", "my-{template}-x")]),
        ("${A:my-${B}-x}", [("A", "my-${B}-x")]),
        ("${A:my-${B:${C:1}}-x}_${D}", [("A", "my-${B:${C:1}}-x"), ("D", "")]),
        ("${A:unclosed ${B}", [("B", "")]),
        ("$ {A} ${} ${A B}", []),
    ],
)
def test_env_var_matcher_finds_the_outermost_references_with_nested_defaults(
    text, expected
):
    from framework.cli.main import ENV_VAR_MATCHER

    assert ENV_VAR_MATCHER.findall(text) == expected


def test_setup_yaml_parser_makes_safe_load_substitute_as_nameko_does(monkeypatch):
    import yaml

    from framework.cli.main import ENV_VAR_MATCHER, setup_yaml_parser

    assert ENV_VAR_MATCHER.findall("${A:x}_${B}") == [("A", "x"), ("B", "")]
    for attribute in ("yaml_constructors", "yaml_implicit_resolvers"):
        # restored after the test: other tests expect a plain SafeLoader
        saved = dict(getattr(yaml.SafeLoader, attribute))
        monkeypatch.setattr(yaml.SafeLoader, attribute, saved)
    monkeypatch.setenv("VAR1", "${VAR1}")
    monkeypatch.setenv("PORT", "8000")
    setup_yaml_parser()
    setup_yaml_parser()  # idempotent
    loaded = yaml.safe_load("A: ${VAR1}\nB: ${PORT}\nC: ${MISSING:[1, 2]}\n")
    # a value is data: it is never substituted again
    assert loaded == {"A": "${VAR1}", "B": 8000, "C": [1, 2]}
