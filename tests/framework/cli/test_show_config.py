"""``framework show-config``, through the installed console script."""

from __future__ import annotations

import textwrap
from pathlib import Path

import yaml

from .cli_helpers import cli_env, run_cli

CONFIG = textwrap.dedent(
    """
    AMQP_URI: amqp://guest:guest@${SHOW_HOST:localhost}:5672/
    WEB_SERVER_ADDRESS: 0.0.0.0:8000
    max_workers: ${SHOW_WORKERS:10}
    HOSTS: ${SHOW_HOSTS}
    LOGGING:
      version: 1
    """
)


def write_config(directory: Path, name: str = "config.yaml") -> Path:
    path = directory / name
    path.write_text(CONFIG)
    return path


def test_prints_the_substituted_config_as_block_yaml(tmp_path: Path) -> None:
    write_config(tmp_path)

    result = run_cli(
        ["show-config"],
        cwd=tmp_path,
        env=cli_env(SHOW_HOST="rabbit", SHOW_HOSTS="[a, b]"),
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout == textwrap.dedent(
        """\
        AMQP_URI: amqp://guest:guest@rabbit:5672/
        WEB_SERVER_ADDRESS: 0.0.0.0:8000
        max_workers: 10
        HOSTS:
        - a
        - b
        LOGGING:
          version: 1
        """
    )


def test_reads_the_file_given_with_config(tmp_path: Path) -> None:
    path = write_config(tmp_path, "other.yaml")

    result = run_cli(["show-config", "--config", str(path)], cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert (
        yaml.safe_load(result.stdout)["AMQP_URI"]
        == "amqp://guest:guest@localhost:5672/"
    )


def test_defines_override_the_file(tmp_path: Path) -> None:
    write_config(tmp_path)

    result = run_cli(
        ["show-config", "--define", "max_workers=3", "-d", "NEW=[1, 2]", "-d", "FLAG"],
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert (shown["max_workers"], shown["NEW"], shown["FLAG"]) == (3, [1, 2], True)


def test_missing_default_config_file_is_an_error(tmp_path: Path) -> None:
    result = run_cli(["show-config"], cwd=tmp_path)

    assert result.returncode == 1
    assert result.stderr == "Error: config file 'config.yaml' does not exist\n"
    assert result.stdout == ""
