"""Loading the CLI's configuration: YAML with environment substitution, ``--define``,
``--broker``, and the logging setup that follows from it.

Substitution works as it does in nameko, so a nameko ``config.yaml`` loads unchanged:

* a plain scalar containing ``${...}`` is implicitly tagged ``!env_var``; a quoted
  string needs the explicit tag (``!env_var "..."``);
* ``${NAME}`` becomes the value of ``NAME`` or the empty string, ``${NAME:default}``
  the default when ``NAME`` is unset; defaults may contain braces
  (``${URL:https://e.com/{path}}``) and further references (``${A:${B:x}}``);
* the substituted string is parsed again as YAML, so ``[a, b]`` becomes a list,
  ``1234.5`` a float and an unset ``${NAME}`` null. ``!raw_env_var`` keeps the
  result a string (use it for passwords, which YAML may otherwise read as a number
  or a boolean).

nameko needs the third-party ``regex`` package for nested references; a small
recursive parser (``substitute_env_vars``) does the job here.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import logging.config
import os
import re
from collections.abc import Iterable, Mapping
from typing import IO, Any

import yaml

from framework.constants import AMQP_URI_CONFIG_KEY, DEFAULT_AMQP_URI
from framework.exceptions import CommandError, ConfigurationError

log = logging.getLogger(__name__)

ENV_VAR_TAG = "!env_var"
RAW_ENV_VAR_TAG = "!raw_env_var"
LOGGING_CONFIG_KEY = "LOGGING"
DEFAULT_CONFIG_FILE = "config.yaml"

# Optional, written separately; when it exists it decides how logs look
# (e.g. JSON lines when LOG_FORMAT=json).
LOGS_MODULE = "framework.logs"

# Same pattern nameko registers, so exactly the same scalars are substituted.
IMPLICIT_ENV_VAR_PATTERN = re.compile(r".*\$\{.*\}.*")

_REFERENCE_START = "${"


def substitute_env_vars(text: str, environ: Mapping[str, str] | None = None) -> str:
    """``text`` with every ``${NAME}`` / ``${NAME:default}`` replaced.

    Anything that is not a well-formed reference (``${}``, ``${A B}``, an unclosed
    ``${A``) is left as it is, as nameko's regular expression leaves it.
    """
    env = os.environ if environ is None else environ
    expanded = _expand(text, 0, env, in_default=False)
    assert expanded is not None  # only a default can be left unterminated
    return expanded[0]


def _expand(
    text: str, pos: int, env: Mapping[str, str], in_default: bool
) -> tuple[str, int] | None:
    """Expand references from ``pos``.

    At top level this runs to the end of ``text``. Inside a default it stops at the
    ``}`` that closes the enclosing reference and returns that brace's index, or
    ``None`` if there is none. Plain braces inside a default must balance, which is
    what lets a default be a URL template such as ``https://e.com/{path}``.
    """
    out: list[str] = []
    depth = 0
    i = pos
    while i < len(text):
        if text.startswith(_REFERENCE_START, i):
            reference = _parse_reference(text, i, env)
            if reference is not None:
                value, i = reference
                out.append(value)
                continue
            # Not a reference: keep the "$"; the "{" is then an ordinary brace.
            out.append("$")
            i += 1
            continue
        char = text[i]
        if in_default:
            if char == "{":
                depth += 1
            elif char == "}":
                if depth == 0:
                    return "".join(out), i
                depth -= 1
        out.append(char)
        i += 1
    if in_default:
        return None
    return "".join(out), i


def _parse_reference(
    text: str, start: int, env: Mapping[str, str]
) -> tuple[str, int] | None:
    """The value of the reference at ``text[start:]`` and the index after it."""
    reference = _reference_span(text, start)
    if reference is None:
        return None
    name, default, end = reference
    value = env.get(name)
    if value is None:
        # The default's braces balance (or it would not have ended), so expanding
        # it on its own gives what expanding it in place would.
        value = substitute_env_vars(default, env)
    return value, end


class ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` plus the ``!env_var`` / ``!raw_env_var`` tags.

    A subclass rather than registering on ``SafeLoader`` itself (as nameko does), so
    that importing the CLI does not change what ``yaml.safe_load`` means elsewhere.
    """


def _construct_env_var(
    loader: yaml.SafeLoader, node: yaml.Node, raw: bool = False
) -> Any:
    template = loader.construct_scalar(node)  # type: ignore[arg-type]
    value = substitute_env_vars(template)
    if raw:
        return value
    try:
        # The substituted text is parsed without substitution: an environment
        # variable's value is data, not another template.
        return yaml.load(value, Loader=_DataLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigurationError(
            f"{template!r} expands to {value!r}, which is not valid YAML ({exc}); "
            f"tag it {RAW_ENV_VAR_TAG} to keep it as a string"
        ) from None


def _construct_raw_env_var(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    return _construct_env_var(loader, node, raw=True)


ConfigLoader.add_constructor(ENV_VAR_TAG, _construct_env_var)
ConfigLoader.add_constructor(RAW_ENV_VAR_TAG, _construct_raw_env_var)
# first=None: the resolver is tried whatever the scalar's first character is.
ConfigLoader.add_implicit_resolver(ENV_VAR_TAG, IMPLICIT_ENV_VAR_PATTERN, None)


class EnvVarMatcher:
    """``findall(text)``: ``(name, default)`` of each outermost ``${NAME}`` /
    ``${NAME:default}`` in ``text``, the default as written (references nested in
    it kept, "" when absent), by the same parser as ``substitute_env_vars``.

    nameko exports a regular expression as ``cli.main.ENV_VAR_MATCHER``, which
    sees nested references only with the ``regex`` package installed; this one
    always does.
    """

    def findall(self, text: str) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        i = 0
        while i < len(text):
            reference = _reference_span(text, i)
            if reference is None:
                i += 1
                continue
            name, default, i = reference
            found.append((name, default))
        return found


def _reference_span(text: str, start: int) -> tuple[str, str, int] | None:
    """The name and written default of the reference at ``text[start:]``, and the
    index after it; ``None`` if none starts there."""
    if not text.startswith(_REFERENCE_START, start):
        return None
    i = start + len(_REFERENCE_START)
    name_start = i
    while i < len(text) and text[i] not in "}:" and not text[i].isspace():
        i += 1
    name = text[name_start:i]
    if not name or i >= len(text) or text[i].isspace():
        return None
    if text[i] == "}":
        return name, "", i + 1
    default = _expand(text, i + 1, {}, in_default=True)
    if default is None:
        return None
    closing = default[1]
    return name, text[i + 1 : closing], closing + 1


ENV_VAR_MATCHER = EnvVarMatcher()


class _DataLoader(yaml.SafeLoader):
    """What a substituted value is parsed with: ``SafeLoader``'s resolvers as they
    were at import, so a value is never substituted again even after
    ``setup_yaml_parser`` registered the tags on ``SafeLoader`` itself."""

    yaml_implicit_resolvers = {
        key: list(value)
        for key, value in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


def setup_yaml_parser() -> None:
    """Make ``yaml.safe_load`` substitute environment variables, as nameko's does.

    Opt-in, for code written against nameko that calls it: our own loading uses
    ``ConfigLoader`` and leaves ``SafeLoader`` alone. Idempotent.
    """
    if ENV_VAR_TAG in yaml.SafeLoader.yaml_constructors:
        return
    yaml.SafeLoader.add_constructor(ENV_VAR_TAG, _construct_env_var)
    yaml.SafeLoader.add_constructor(RAW_ENV_VAR_TAG, _construct_raw_env_var)
    yaml.SafeLoader.add_implicit_resolver(ENV_VAR_TAG, IMPLICIT_ENV_VAR_PATTERN, None)


def load_yaml(stream: str | IO[str]) -> Any:
    """Parse YAML text (or an open file) with environment substitution."""
    return yaml.load(stream, Loader=ConfigLoader)  # noqa: S506 - ConfigLoader is a SafeLoader


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping in the YAML file at ``path``; an empty file is an empty config."""
    try:
        with open(path, encoding="utf-8") as stream:
            config = load_yaml(stream)
    except FileNotFoundError:
        raise CommandError(f"config file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise CommandError(f"config file {str(path)!r} is a directory") from None
    except yaml.YAMLError as exc:
        raise ConfigurationError(
            f"config file {str(path)!r} is not valid YAML: {exc}"
        ) from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ConfigurationError(
            f"config file {str(path)!r} must contain a mapping at the top level, "
            f"not {type(config).__name__}"
        )
    return config


def parse_define(option: str) -> tuple[str, Any]:
    """``KEY=VALUE`` → ``(KEY, VALUE parsed as YAML)``; a bare ``KEY`` → ``(KEY, True)``."""
    key, sep, value = option.partition("=")
    key = key.strip()
    if not key:
        raise CommandError(f"--define {option!r}: expected KEY=VALUE or KEY")
    if not sep:
        return key, True
    try:
        return key, load_yaml(value)
    except yaml.YAMLError as exc:
        raise CommandError(
            f"--define {option!r}: the value is not valid YAML ({exc})"
        ) from None


def setup_config(
    config_path: str | os.PathLike[str] | None = None,
    defines: Iterable[str] = (),
    broker: str | None = None,
) -> dict[str, Any]:
    """The config a command runs with: the file, then ``--define``s, then ``--broker``.

    ``--broker`` only fills in ``AMQP_URI`` when neither the file nor a define set
    it (nameko 2.x ignored it whenever ``--config`` was given, which surprised
    people who passed both).
    """
    config = load_config(config_path) if config_path is not None else {}
    for option in defines:
        key, value = parse_define(option)
        config[key] = value
    if broker is not None:
        config.setdefault(AMQP_URI_CONFIG_KEY, broker)
    return config


def add_config_arguments(
    parser: argparse.ArgumentParser,
    default_config: str | None = None,
    broker: bool = True,
) -> None:
    """The options every command that reads a config shares."""
    config_help = "YAML config file"
    if default_config is not None:
        config_help += f" (default: {default_config})"
    parser.add_argument(
        "-c", "--config", metavar="FILE", default=default_config, help=config_help
    )
    parser.add_argument(
        "-d",
        "--define",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="set a config key after loading the file; VALUE is parsed as YAML, "
        "a bare KEY means true (repeatable)",
    )
    if broker:
        parser.add_argument(
            "--broker",
            metavar="URI",
            default=DEFAULT_AMQP_URI,
            help=f"AMQP broker URI, used when the config sets no {AMQP_URI_CONFIG_KEY} "
            f"(default: {DEFAULT_AMQP_URI})",
        )


def setup_logging(config: Mapping[str, Any]) -> None:
    """Configure logging for a long-running command.

    An explicit ``LOGGING`` dictConfig wins. Otherwise ``framework.logs`` decides,
    when it is installed (it reads ``LOG_FORMAT``, e.g. ``json``); without it, plain
    text at INFO.
    """
    logging_config = config.get(LOGGING_CONFIG_KEY)
    if logging_config is not None:
        if not isinstance(logging_config, dict):
            raise ConfigurationError(
                f"{LOGGING_CONFIG_KEY} must be a logging dictConfig mapping"
            )
        try:
            logging.config.dictConfig(logging_config)
        except (ValueError, TypeError, AttributeError, ImportError) as exc:
            raise ConfigurationError(
                f"{LOGGING_CONFIG_KEY} is not a valid dictConfig: {exc}"
            ) from None
        return

    configure = _find_logs_hook()
    if configure is not None:
        configure(dict(config))
        return

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if os.environ.get("LOG_FORMAT", "").lower() == "json":
        log.warning(
            "LOG_FORMAT=json needs %s, which is not installed; logging plain text",
            LOGS_MODULE,
        )


def _find_logs_hook() -> Any:
    # find_spec instead of try/except ImportError: a module that exists but fails to
    # import is a bug that must surface, not be mistaken for "not written yet".
    if importlib.util.find_spec(LOGS_MODULE) is None:
        return None
    module = importlib.import_module(LOGS_MODULE)
    return getattr(module, "configure_logging", None)
