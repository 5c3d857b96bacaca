"""The documents under docs/ against the code they describe.

Events in the Mermaid diagrams come from the contracts' registry (``ALL_EVENTS``) and who
publishes or consumes them from ``access.json`` (kept equal to the AsyncAPI documents by
tests/deploy/test_rabbit_access.py); settings, make targets, CLI commands, HTTP routes, repository
paths and Python objects named anywhere in docs/ are looked up in the code.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest
import typer
from fastapi import APIRouter
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry
from typer.core import TyperGroup

from flywheel_cli.app import app as cli_app
from flywheel_contracts import ALL_EVENTS
from flywheel_contracts.topology import EVENTS_EXCHANGE, INFERENCE_EXCHANGE
from flywheel_runtime.http import ops_router

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
SEQUENCES = DOCS / "sequences.md"
CHECKED_DIAGRAMS = (SEQUENCES, DOCS / "architecture.md")
"""Documents whose Mermaid arrows may name events only as the contracts define them."""
ACCESS = ROOT / "deploy" / "helm" / "flywheel" / "files" / "rabbitmq" / "access.json"

BROKER = "RabbitMQ"
"""Label of the broker participant in sequence diagrams."""

MERMAID = re.compile(r"^```mermaid\n(.*?)^```", re.MULTILINE | re.DOTALL)
FENCED = re.compile(r"^```([^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
EVENT_LIKE = re.compile(
    r"(?<![\w./-])[a-z][a-z0-9]*(?:_[a-z0-9]+)*\.[a-z][a-z0-9]*(?:_[a-z0-9]+)*(?:\.v[0-9]+)?"
    r"(?![\w/-]|\.\w)"
)
"""``word.word`` (``labels.saved``, ``data.quality_failed``, ``labels.saved.v2``), not part of a
longer dotted, slashed or dashed name."""

# --- Mermaid parsing ------------------------------------------------------------------------

PARTICIPANT = re.compile(r"^(?:participant|actor)\s+(\w+)(?:\s+as\s+(.+))?$")
MESSAGE = re.compile(
    r"^(?P<src>\w+)\s*(?P<arrow><<-->>|<<->>|--?>>|--?>|--?x|--?\))\s*[+-]?\s*(?P<dst>\w+)"
    r"\s*:(?P<label>.*)$"
)
SEQUENCE_KEYWORDS = frozenset(
    {
        "autonumber",
        "participant",
        "actor",
        "note",
        "loop",
        "alt",
        "else",
        "opt",
        "par",
        "and",
        "critical",
        "option",
        "break",
        "end",
        "rect",
        "activate",
        "deactivate",
        "box",
        "title",
        "link",
        "links",
        "create",
        "destroy",
    }
)
NODE = re.compile(r"(\w+)\s*(?:\[\(|\(\[|\[\[|\(\(|\{\{|\[|\(|\{|>)\s*\"([^\"]*)\"")
EDGE = re.compile(r"(\w+)\s*<?[-.=]{2,}[>ox]?\s*\|\"?([^|\"]*)\"?\|\s*(\w+)")
EDGE_LABEL = re.compile(r"\|\"?([^|\"]*)\"?\||[-.=]{2}\s*\"([^\"]+)\"\s*[-.=]{2,}")


@dataclass(frozen=True)
class Arrow:
    source: str
    target: str
    label: str
    line: str


@dataclass
class Diagram:
    kind: str
    names: dict[str, str] = field(default_factory=dict)
    """Participant or node id → its label's first line."""
    arrows: list[Arrow] = field(default_factory=list)
    unparsed: list[str] = field(default_factory=list)


def diagrams(path: Path) -> list[Diagram]:
    return [parse(block) for block in MERMAID.findall(path.read_text())]


def parse(block: str) -> Diagram:
    lines = [line.strip() for line in block.splitlines()]
    lines = [line for line in lines if line and not line.startswith("%%")]
    kind = lines[0].split()[0] if lines else ""
    diagram = Diagram(kind)
    for line in lines[1:]:
        if kind == "sequenceDiagram":
            _sequence_line(diagram, line)
        elif kind in ("flowchart", "graph"):
            _flowchart_line(diagram, line)
    return diagram


def _sequence_line(diagram: Diagram, line: str) -> None:
    participant = PARTICIPANT.match(line)
    if participant:
        alias, label = participant.groups()
        diagram.names[alias] = (label or alias).strip()
        return
    message = MESSAGE.match(line)
    if message:
        diagram.arrows.append(Arrow(message["src"], message["dst"], message["label"].strip(), line))
        return
    if line.split()[0].lower() not in SEQUENCE_KEYWORDS:  # statements, in any case
        diagram.unparsed.append(line)


def _flowchart_line(diagram: Diagram, line: str) -> None:
    for node, label in NODE.findall(line):
        diagram.names[node] = re.split(r"<br\s*/?>", label)[0].strip()
    edges = EDGE.findall(line)
    for source, label, target in edges:
        diagram.arrows.append(Arrow(source, target, label.strip(), line))
    if not edges:
        for piped, dashed in EDGE_LABEL.findall(line):
            diagram.arrows.append(Arrow("", "", (piped or dashed).strip(), line))


# --- what the code says -----------------------------------------------------------------------


def contract_events() -> dict[str, str]:
    """Routing key → exchange of every event class in the contracts' registry."""
    return {event.routing_key(): event.EXCHANGE for event in ALL_EVENTS}


def access() -> dict[str, dict[str, dict[str, list[str]]]]:
    services: dict[str, dict[str, dict[str, list[str]]]] = json.loads(ACCESS.read_text())[
        "services"
    ]
    return services


def _keys(grants: dict[str, list[str]]) -> set[str]:
    return {key for keys in grants.values() for key in keys}


def named_events(label: str) -> list[str]:
    return EVENT_LIKE.findall(label)


# --- Mermaid tests ----------------------------------------------------------------------------


def test_sequence_diagrams_show_every_contract_event() -> None:
    shown = {
        event
        for diagram in diagrams(SEQUENCES)
        if diagram.kind == "sequenceDiagram"
        for arrow in diagram.arrows
        for event in named_events(arrow.label)
    }

    missing = sorted(set(contract_events()) - shown)

    assert len(diagrams(SEQUENCES)) >= 2
    assert missing == [], f"events of flywheel_contracts on no arrow of {SEQUENCES.name}"


def unknown_events(diagram: Diagram) -> list[str]:
    """Event-like names on arrows that are no contract event's routing key."""
    events = contract_events()
    return [
        f"{token!r} in: {arrow.line}"
        for arrow in diagram.arrows
        for token in named_events(arrow.label)
        if token not in events
    ]


def misdrawn(diagram: Diagram) -> list[str]:
    """Arrows showing a service publish or consume an event it does not, or an event on the
    wrong exchange."""
    events = contract_events()
    grants = access()
    exchanges = {EVENTS_EXCHANGE, INFERENCE_EXCHANGE}

    def is_broker(name: str) -> bool:
        return name == BROKER or name in exchanges

    problems: list[str] = []
    for arrow in diagram.arrows:
        source = diagram.names.get(arrow.source, arrow.source)
        target = diagram.names.get(arrow.target, arrow.target)
        # A service sends to the broker (or straight to a service), the broker delivers to one.
        sends = source in grants and (is_broker(target) or target in grants)
        receives = target in grants and (is_broker(source) or source in grants)
        for event in (token for token in named_events(arrow.label) if token in events):
            if sends and event not in _keys(grants[source]["publishes"]):
                problems.append(f"{source} does not publish {event}")
            if receives and event not in _keys(grants[target]["consumes"]):
                problems.append(f"{target} does not consume {event}")
            problems += [
                f"{event} travels on {events[event]}, not {end}"
                for end in (source, target)
                if end in exchanges and end != events[event]
            ]
    return problems


@pytest.mark.parametrize("path", CHECKED_DIAGRAMS, ids=lambda p: p.name)
def test_diagram_arrows_name_only_contract_events(path: Path) -> None:
    unknown = [problem for diagram in diagrams(path) for problem in unknown_events(diagram)]

    assert unknown == [], "event-like names that are not contract events"


@pytest.mark.parametrize("path", CHECKED_DIAGRAMS, ids=lambda p: p.name)
def test_sequence_diagram_lines_all_parse(path: Path) -> None:
    unparsed = [line for diagram in diagrams(path) for line in diagram.unparsed]

    assert unparsed == [], "lines that are neither a message nor a known statement"


@pytest.mark.parametrize("path", CHECKED_DIAGRAMS, ids=lambda p: p.name)
def test_diagram_arrows_follow_who_publishes_and_consumes(path: Path) -> None:
    wrong = [problem for diagram in diagrams(path) for problem in misdrawn(diagram)]

    assert wrong == []


def test_diagram_checks_fail_on_a_broken_sequence_diagram() -> None:
    diagram = parse(
        "sequenceDiagram\n"
        "    participant LAB as labeling\n"
        "    participant MQ as RabbitMQ\n"
        "    participant DM as data-monitor\n"
        "    LAB-)MQ: labels.save\n"
        "    MQ-)DM: model.validated\n"
        "    DM-)MQ: threshold.reached\n"
        "    LAB -> > MQ labels.saved\n"
    )

    assert unknown_events(diagram) == ["'labels.save' in: LAB-)MQ: labels.save"]
    assert misdrawn(diagram) == ["data-monitor does not consume model.validated"]
    assert diagram.unparsed == ["LAB -> > MQ labels.saved"]


def test_diagram_checks_fail_on_a_broken_flowchart() -> None:
    diagram = parse(
        "flowchart LR\n"
        '    BFF["inference-bff"]\n'
        '    EVX["flywheel.events<br/>topic exchange"]\n'
        '    VAL["validator"]\n'
        '    BFF -->|"inference.logged"| EVX\n'
        '    EVX -->|"model.validated, config.pbtxt"| VAL\n'
    )

    assert unknown_events(diagram) == [
        """'config.pbtxt' in: EVX -->|"model.validated, config.pbtxt"| VAL"""
    ]
    assert misdrawn(diagram) == [
        "inference.logged travels on flywheel.inference, not flywheel.events",
        "validator does not consume model.validated",
    ]


# --- names the documents use ------------------------------------------------------------------


def documents() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def code_fragments(text: str) -> Iterator[str]:
    """Inline code spans and the lines of fenced blocks other than Mermaid diagrams."""
    for info, body in FENCED.findall(text):
        if info.strip() != "mermaid":
            yield from body.splitlines()
    for _, span in INLINE_CODE.findall(FENCED.sub("", text)):
        yield span.strip()


@cache
def _sources() -> str:
    roots = ("libs", "services", "cli", "scripts", "deploy", "tests")
    suffixes = {".py", ".yaml", ".yml", ".tpl", ".json", ".toml", ".sh"}
    texts = [(ROOT / name).read_text() for name in ("Makefile", "docker-compose.yml")]
    texts.append((ROOT / ".env.example").read_text())
    for root in roots:
        for path in (ROOT / root).rglob("*"):
            if path.is_file() and (path.suffix in suffixes or path.name == "Dockerfile"):
                texts.append(path.read_text(errors="replace"))
    return "\n".join(texts)


def _settings_reference() -> set[str]:
    text = (DOCS / "configuration.md").read_text()
    return set(re.findall(r"^\| `(FLYWHEEL_[A-Z0-9_]+)` \|", text, re.MULTILINE))


@pytest.mark.parametrize("path", documents(), ids=lambda p: p.name)
def test_documents_name_only_settings_that_exist(path: Path) -> None:
    reference = _settings_reference()
    names = set(re.findall(r"FLYWHEEL_[A-Z0-9_]*[A-Z0-9]", path.read_text()))

    blocks = {
        "__".join(parts[:cut])
        for parts in (variable.split("__") for variable in reference)
        for cut in range(1, len(parts))
    }
    unknown = sorted(
        name
        for name in names - reference - blocks
        if not re.search(rf"\b{name}(?!_*[A-Z0-9])", _sources())
    )

    assert reference, "docs/configuration.md lists no variable"
    assert unknown == [], "no settings class reads these and no source file names them"


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w-]*):", text, re.MULTILINE))


@pytest.mark.parametrize("path", documents(), ids=lambda p: p.name)
def test_documents_name_only_make_targets_that_exist(path: Path) -> None:
    used = {
        target
        for fragment in code_fragments(path.read_text())
        for target in re.findall(r"(?:^|&&|;|\|)\s*(?:\$\s+)?make\s+([a-z][\w-]*)", fragment)
    }

    assert sorted(used - _make_targets()) == []


def _command_tree() -> TyperGroup:
    command = typer.main.get_command(cli_app)
    assert isinstance(command, TyperGroup)
    return command


COMMAND = re.compile(
    r"(?:^|&&|;|\|)\s*(?:\$\s+)?(?:\.venv/bin/)?flywheel\s+([a-z][a-z-]*)(?:\s+([a-z][a-z-]*))?"
)


@pytest.mark.parametrize("path", documents(), ids=lambda p: p.name)
def test_documents_name_only_cli_commands_that_exist(path: Path) -> None:
    tree = _command_tree()
    unknown: list[str] = []
    for fragment in code_fragments(path.read_text()):
        for name, sub in COMMAND.findall(fragment):
            command = tree.commands.get(name)
            if command is None:
                unknown.append(f"flywheel {name}")
            elif isinstance(command, TyperGroup) and sub not in command.commands:
                unknown.append(f"flywheel {name} {sub}")

    assert unknown == []


def _api_modules() -> Iterator[ModuleType]:
    for init in sorted(ROOT.glob("services/*/src/flywheel_*/api/__init__.py")):
        package = importlib.import_module(f"{init.parent.parent.name}.api")
        yield package
        for module in pkgutil.iter_modules(package.__path__):
            yield importlib.import_module(f"{package.__name__}.{module.name}")


def _normalized(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "{}", path)


@cache
def _routes() -> frozenset[tuple[str, str]]:
    routers = [ops_router({}, CollectorRegistry())]
    for module in _api_modules():
        routers += [value for value in vars(module).values() if isinstance(value, APIRouter)]
    return frozenset(
        (method, _normalized(route.path))
        for router in routers
        for route in router.routes
        if isinstance(route, APIRoute)
        for method in route.methods or ()
    )


ROUTE = re.compile(r"\b(GET|POST|PUT|PATCH|DELETE) (/[^\s`|)\"'\[?]*)")


@pytest.mark.parametrize("path", documents(), ids=lambda p: p.name)
def test_documents_name_only_http_routes_that_exist(path: Path) -> None:
    routes = _routes()
    named = {
        (method, _normalized(route.rstrip(".,;:")))
        for method, route in ROUTE.findall(path.read_text())
    }

    assert ("POST", "/v1/projects/{}/labels:batch") in routes
    assert sorted(named - routes) == []


REPO_PATH = re.compile(
    r"^(?:\.\./)?((?:libs|services|cli|deploy|scripts|tests|benchmarks|docs)/[^\s:]*)$"
)


@pytest.mark.parametrize("path", documents(), ids=lambda p: p.name)
def test_documents_name_only_files_that_exist(path: Path) -> None:
    text = path.read_text()
    spans = [span for _, span in INLINE_CODE.findall(FENCED.sub("", text))]
    links: list[str] = re.findall(r"\]\((\.\./[^)#\s]+)", text)
    missing: list[str] = []
    for candidate in [*spans, *links]:
        match = REPO_PATH.match(candidate.strip())
        if match is None or re.search(r"[<>{}*…]", match[1]):
            continue
        if not (ROOT / match[1]).exists():
            missing.append(match[1])

    assert missing == []


PYTHON_NAME = re.compile(r"\bflywheel_[a-z_]+(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            if hasattr(found, attribute):
                found = getattr(found, attribute)
            else:
                # A field of a pydantic model or dataclass is declared, not a class attribute.
                return isinstance(found, type) and any(
                    attribute in getattr(klass, "__annotations__", {}) for klass in found.__mro__
                )
        return True
    return False


@pytest.mark.parametrize("path", documents(), ids=lambda p: p.name)
def test_documents_name_only_python_objects_that_exist(path: Path) -> None:
    names = {
        name
        for fragment in code_fragments(path.read_text())
        for name in PYTHON_NAME.findall(fragment)
    }

    assert sorted(name for name in names if not _resolves(name)) == []
