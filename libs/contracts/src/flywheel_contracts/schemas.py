"""Committed JSON Schemas of the events, and the rules that keep a version compatible.

``python -m flywheel_contracts.schemas --check`` fails when a class no longer matches its
committed schema; ``--write`` regenerates the files but refuses a change that would break
consumers of the same version (a field removed, made required, or changed in type). Such a
change needs a new event class with a new ``VERSION``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flywheel_contracts.envelope import Event
from flywheel_contracts.events import ALL_EVENTS

SCHEMA_DIR = Path(__file__).parent / "schemas"

_NOISE = frozenset({"title", "description", "examples", "default"})


def event_schema(cls: type[Event[Any]]) -> dict[str, Any]:
    """JSON Schema of one event class, with its type and version pinned as constants."""
    schema = cls.model_json_schema(mode="validation")
    schema["properties"]["type"] = {"const": cls.TYPE, "type": "string"}
    schema["properties"]["schema_version"] = {"const": cls.VERSION, "type": "integer"}
    schema["required"] = sorted({*schema.get("required", []), "type", "schema_version"})
    schema["$id"] = f"https://flywheel.dev/schemas/events/{cls.schema_name()}.json"
    schema["x-routing-key"] = cls.routing_key()
    schema["x-exchange"] = cls.EXCHANGE
    return schema


def schema_path(cls: type[Event[Any]], directory: Path = SCHEMA_DIR) -> Path:
    return directory / f"{cls.schema_name()}.json"


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def load_committed(cls: type[Event[Any]], directory: Path = SCHEMA_DIR) -> dict[str, Any] | None:
    path = schema_path(cls, directory)
    if not path.exists():
        return None
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def compatibility_problems(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What in ``new`` would break a consumer or producer of ``old`` at the same version."""
    problems: list[str] = []
    _compare(old, new, "$", old.get("$defs", {}), new.get("$defs", {}), problems)
    return problems


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        node = defs[node["$ref"].rsplit("/", 1)[-1]]
    return node


def _strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k not in _NOISE}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def _compare(
    old: Any,
    new: Any,
    path: str,
    old_defs: dict[str, Any],
    new_defs: dict[str, Any],
    problems: list[str],
) -> None:
    old, new = _resolve(old, old_defs), _resolve(new, new_defs)
    if isinstance(old, dict) and isinstance(new, dict) and "properties" in old:
        old_props: dict[str, Any] = old["properties"]
        new_props: dict[str, Any] = new.get("properties", {})
        for name in old_props.keys() - new_props.keys():
            problems.append(f"{path}.{name}: field removed")
        newly_required = set(new.get("required", [])) - set(old.get("required", []))
        for name in sorted(newly_required):
            what = "new field is required" if name not in old_props else "field made required"
            problems.append(f"{path}.{name}: {what}")
        for name in sorted(old_props.keys() & new_props.keys()):
            _compare(
                old_props[name], new_props[name], f"{path}.{name}", old_defs, new_defs, problems
            )
        return
    if _strip(_deref_all(old, old_defs)) != _strip(_deref_all(new, new_defs)):
        problems.append(f"{path}: type changed")


def _deref_all(node: Any, defs: dict[str, Any]) -> Any:
    node = _resolve(node, defs)
    if isinstance(node, dict):
        return {k: _deref_all(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_deref_all(v, defs) for v in node]
    return node


def drift(
    classes: Iterable[type[Event[Any]]] = ALL_EVENTS, directory: Path = SCHEMA_DIR
) -> dict[str, list[str]]:
    """Per schema file: why the committed file and the code disagree (empty when they agree)."""
    report: dict[str, list[str]] = {}
    for cls in classes:
        committed = load_committed(cls, directory)
        current = event_schema(cls)
        name = schema_path(cls, directory).name
        if committed is None:
            report[name] = ["no committed schema"]
        elif render(committed) != render(current):
            breaking = compatibility_problems(committed, current)
            report[name] = breaking or ["schema changed compatibly; regenerate the committed file"]
    return report


def write(
    classes: Iterable[type[Event[Any]]] = ALL_EVENTS, directory: Path = SCHEMA_DIR
) -> list[str]:
    """Regenerate committed schemas; returns breaking problems and writes nothing if any."""
    classes = list(classes)
    problems: list[str] = []
    for cls in classes:
        committed = load_committed(cls, directory)
        if committed is not None:
            problems += [
                f"{cls.schema_name()}: {p}"
                for p in compatibility_problems(committed, event_schema(cls))
            ]
    if problems:
        return problems
    directory.mkdir(parents=True, exist_ok=True)
    for cls in classes:
        schema_path(cls, directory).write_text(render(event_schema(cls)))
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="regenerate the committed schemas")
    args = parser.parse_args(argv)
    if args.write:
        problems = write()
        for problem in problems:
            print(f"breaking: {problem}", file=sys.stderr)
        return 1 if problems else 0
    report = drift()
    for name, reasons in report.items():
        for reason in reasons:
            print(f"{name}: {reason}", file=sys.stderr)
    return 1 if report else 0


if __name__ == "__main__":
    raise SystemExit(main())
