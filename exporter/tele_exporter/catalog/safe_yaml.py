"""YAML for configuration files: safe types only, no aliases, no duplicate keys.

Aliases let a few kilobytes expand to gigabytes (the "billion laughs"), and a
repeated key silently replaces the first; both are refused with the line named.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases and duplicate mapping keys."""

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, f"found alias *{event.anchor}; aliases are not allowed here", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                repeated = key in seen
            except TypeError:
                continue  # an unhashable key: the base constructor reports it
            if repeated:
                raise ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def load(text: str) -> Any:
    """Parse one YAML document strictly; raises yaml.YAMLError naming the line."""
    return yaml.load(text, Loader=_StrictLoader)


def load_file(file: Path, error: type[Exception], what: str) -> Any:
    """Read and parse one configuration file strictly; an unreadable file or bad YAML raises `error` naming it."""
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"{file}: cannot read {what}: {exc.strerror or exc}") from None
    try:
        return load(text)
    except yaml.YAMLError as exc:
        raise error(f"{file}: not valid YAML: {exc}") from None
