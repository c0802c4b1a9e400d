"""``framework new-service NAME``: lay out a new service the way the others are.

Writes ``services/<name>/`` with the roles every service has (service, schemas,
models, exceptions, dependencies, migrations, config, README) and
``tests/services/<name>/`` with its unit and integration tests, which pass as
generated. The example it holds (an ``items`` table, three RPC methods, one event)
is meant to be replaced; the layout is meant to stay. ``docs/adding-a-service.md``
walks through the result and how to add the service to ``compose.yaml``.
"""

from __future__ import annotations

import argparse
import keyword
import re
import sys
from datetime import UTC, datetime
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from framework.exceptions import CommandError

NAME = "new-service"
TEMPLATE_PACKAGE = "framework.cli"
TEMPLATE_DIR = ("templates", "new_service")
TEMPLATE_SUFFIX = ".tmpl"
# The lowercase identifier rules of a Python package, which the name becomes, and
# of a RabbitMQ routing key's first word (``<name>.<method>``): no dots.
SERVICE_NAME = re.compile(r"[a-z][a-z0-9_]*")
SERVICE_NAME_MAX_LENGTH = 40
# Names the template's own modules or the framework already claim.
RESERVED_NAMES = frozenset({"framework", "services", "tests", "test"})

# template folder -> where it goes, relative to the project root
DESTINATIONS = {"service": Path("services"), "tests": Path("tests", "services")}


def init_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME,
        help="lay out a new service and its tests",
        description="Write services/NAME/ (service, schemas, models, exceptions, "
        "dependencies, migrations, config, README) and tests/services/NAME/, "
        "with an example the generated tests cover.",
    )
    parser.add_argument("name", metavar="NAME", help="the service's name, snake_case")
    parser.add_argument(
        "--root",
        default=".",
        metavar="DIR",
        help="the project root holding services/ and tests/ (default: .)",
    )
    return parser


def main(args: argparse.Namespace) -> int:
    written = create_service(args.name, Path(args.root))
    root = Path(args.root)
    for path in written:
        sys.stdout.write(f"created {path.relative_to(root)}\n")
    sys.stdout.write(next_steps(args.name))
    return 0


def check_name(name: str) -> None:
    if not SERVICE_NAME.fullmatch(name) or len(name) > SERVICE_NAME_MAX_LENGTH:
        raise CommandError(
            f"invalid service name {name!r}: use lowercase letters, digits and "
            f"underscores, starting with a letter, at most {SERVICE_NAME_MAX_LENGTH} "
            "characters (it becomes a Python package and an RPC routing key)"
        )
    if keyword.iskeyword(name) or name in RESERVED_NAMES:
        raise CommandError(f"invalid service name {name!r}: the name is reserved")


def class_name(name: str) -> str:
    """``order_history`` -> ``OrderHistory`` (the service class is ``<it>Service``)."""
    return "".join(part.capitalize() for part in name.split("_") if part)


def render(text: str, name: str) -> str:
    # Plain replacement rather than str.format or string.Template: the templates
    # are Python and YAML full of braces and ${ENV:default} references.
    return (
        text.replace("{{name}}", name)
        .replace("{{Name}}", class_name(name))
        .replace("{{date}}", datetime.now(UTC).date().isoformat())
    )


def _template_files(folder: Traversable, prefix: Path) -> list[tuple[Path, str]]:
    found: list[tuple[Path, str]] = []
    for entry in sorted(folder.iterdir(), key=lambda item: item.name):
        if entry.is_dir():
            if entry.name != "__pycache__":
                found.extend(_template_files(entry, prefix / entry.name))
        elif entry.name.endswith(TEMPLATE_SUFFIX):
            target = prefix / entry.name[: -len(TEMPLATE_SUFFIX)]
            found.append((target, entry.read_text(encoding="utf-8")))
    return found


def create_service(name: str, root: Path) -> list[Path]:
    """Write the new service's files under ``root``; return their paths.

    Refuses (``CommandError``) to touch a service or test folder that exists, so
    it never overwrites work.
    """
    check_name(name)
    templates = resources.files(TEMPLATE_PACKAGE).joinpath(*TEMPLATE_DIR)
    targets = {kind: root / base / name for kind, base in DESTINATIONS.items()}
    for target in targets.values():
        if target.exists():
            raise CommandError(f"{target} already exists; not overwriting it")

    written: list[Path] = []
    for kind, target in targets.items():
        for relative, text in _template_files(templates.joinpath(kind), Path()):
            path = target / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(render(text, name), encoding="utf-8")
            written.append(path)
    # ``services`` is a package (``services.<name>.service``); the tests' folders
    # are not, pytest imports them in importlib mode.
    init = root / "services" / "__init__.py"
    if not init.exists():
        init.write_text("", encoding="utf-8")
        written.append(init)
    return written


def next_steps(name: str) -> str:
    return (
        f"\nNext:\n"
        f"  .venv/bin/pytest tests/services/{name}\n"
        f"  framework db upgrade {name} --config services/{name}/config.yaml\n"
        f"  framework run services.{name}.service --config services/{name}/config.yaml\n"
        "Then add it to compose.yaml, the one-process mode and the e2e tests: "
        "see docs/adding-a-service.md.\n"
    )
