"""Read a YAML document exactly and remember where each value came from.

Exactly: a number with a fraction or exponent becomes a ``Decimal`` built from its text, never a float,
and timestamps stay strings for pydantic to parse (so a missing time zone is caught, not assumed).
Where: every mapping value and list item keeps the line it was written on, so a validation problem can
be reported as ``file:line: field: problem``. Duplicate keys, which YAML would silently merge, are errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import yaml

Path = tuple[str | int, ...]


class _ExactLoader(yaml.SafeLoader):
    """SafeLoader with floats as Decimal and without the implicit timestamp type."""


_ExactLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _construct_decimal(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Decimal | str:
    text = loader.construct_scalar(node).replace("_", "")
    try:
        return Decimal(text)
    except InvalidOperation:
        return text  # ".inf", ".nan": left as text for validation to refuse


_ExactLoader.add_constructor("tag:yaml.org,2002:float", _construct_decimal)


@dataclass
class YamlDocument:
    """A parsed document, the line of every value (by path), and structural problems found while parsing."""

    data: Any
    lines: dict[Path, int] = field(default_factory=dict)
    duplicates: list[tuple[Path, int]] = field(default_factory=list)

    def line_of(self, path: Path) -> int | None:
        """The line of ``path``, or of its nearest ancestor that has one."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get(())


def load_yaml(text: str) -> YamlDocument:
    """Parse ``text`` (one document) into plain data with Decimals, recording lines and duplicate keys."""
    node = yaml.compose(text, Loader=_ExactLoader)
    document = YamlDocument(data=None)
    if node is None:
        return document
    loader = _ExactLoader("")
    document.data = _build(node, (), loader, document)
    return document


def _build(node: yaml.Node, path: Path, loader: _ExactLoader, document: YamlDocument) -> Any:
    document.lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if isinstance(key, Decimal):
                key = str(key)
            if key in result:
                document.duplicates.append(((*path, key), key_node.start_mark.line + 1))
            result[key] = _build(value_node, (*path, key), loader, document)
            document.lines[(*path, key)] = key_node.start_mark.line + 1
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, (*path, index), loader, document) for index, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)
