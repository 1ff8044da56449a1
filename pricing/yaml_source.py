"""Read a YAML document exactly and within limits, and remember where each value came from.

Exactly: a number with a fraction or exponent becomes a ``Decimal`` built from its text, never a float,
and timestamps stay strings for pydantic to parse (so a missing time zone is caught, not assumed).
Where: every mapping value and list item keeps the line it was written on, so a validation problem can
be reported as ``file:line: field: problem``. Duplicate keys, which YAML would silently merge, are errors.

Within limits: every YAML file a user gives us (price tables, the gateway's configuration) is read with
``read_yaml_file`` and ``load_yaml``, which refuse with ``YamlLimitError`` (a ``yaml.YAMLError`` with the
line) a file larger than ``MAX_YAML_BYTES``, nesting deeper than ``MAX_YAML_DEPTH`` and a document whose
aliases expand to more than ``MAX_YAML_NODES`` nodes (the "billion laughs"). The limits are checked on the
parser's events, before anything is composed: PyYAML's parser is a loop, its composer and our builder
recurse (50,000 nested brackets would exhaust the stack) and the builder expands every alias (nine
anchors of nine aliases each would expand to 387 million nodes).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import yaml

Path = tuple[str | int, ...]

#: Largest YAML file read. The bundled price table is 18 KB and a table imported from one-api with a few
#: hundred models about 100 KB; loading costs about 0.6 ms per KB (a 1.2 MB table: 0.7 s on the reference
#: machine), so this bounds a load to about a second.
MAX_YAML_BYTES = 2 * 1024 * 1024
#: Deepest nesting of mappings and sequences. A price table nests 5 levels (models.m.versions[0].long_context.
#: input), a gateway configuration 3; the composer and the builder recurse a few frames per level.
MAX_YAML_DEPTH = 32
#: Most nodes a document may hold once every alias is expanded (each alias counts the nodes of its anchor).
#: The bundled price table has about 1,000; this leaves room for 100 times as many models while bounding what
#: the builder makes (an alias bomb is refused as soon as its expansion passes this).
MAX_YAML_NODES = 100_000

# libyaml's parser when PyYAML was built with it (the wheels are): the limits refuse a hostile file after a
# few events, and libyaml reads them about 10 times faster than the pure-Python parser (which looks ahead
# up to 1,024 characters for a possible key at each flow level: about 0.2 s for 50,000 nested brackets).
_EVENT_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class YamlLimitError(yaml.MarkedYAMLError):
    """A YAML file or document beyond one of this module's limits, or with an alias that cannot be expanded
    (undefined, or inside its own anchor); ``problem_mark`` has the line, if known."""


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


class _ReplayLoader(_ExactLoader):
    """The exact loader composing from events already read (and checked) instead of parsing again."""

    def __init__(self, events: list[yaml.Event]) -> None:
        super().__init__("")
        self._events = deque(events)

    def check_event(self, *choices: type) -> bool:
        return bool(self._events) and (not choices or isinstance(self._events[0], choices))

    def peek_event(self) -> yaml.Event:
        return self._events[0]

    def get_event(self) -> yaml.Event:
        return self._events.popleft()


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


def read_yaml_file(path: str | os.PathLike[str]) -> str:
    """The text of a YAML file, never reading more than ``MAX_YAML_BYTES`` (a pipe or /dev/zero included).

    ``OSError`` or ``UnicodeDecodeError`` when it cannot be read; ``YamlLimitError`` when it is too large.
    """
    with open(path, "rb") as file:
        data = file.read(MAX_YAML_BYTES + 1)
    if len(data) > MAX_YAML_BYTES:
        raise YamlLimitError(problem=f"the file is larger than {MAX_YAML_BYTES:,} bytes")
    return data.decode("utf-8")


def load_yaml(text: str) -> YamlDocument:
    """Parse ``text`` (one document) into plain data with Decimals, recording lines and duplicate keys.

    Raises a ``yaml.YAMLError``: ``YamlLimitError`` beyond a limit, else the parser's or composer's error.
    """
    if len(text) > MAX_YAML_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_YAML_BYTES:
        raise YamlLimitError(problem=f"the document is larger than {MAX_YAML_BYTES:,} bytes")
    loader = _ReplayLoader(checked_events(text))
    try:
        node = loader.get_single_node()
    finally:
        loader.dispose()
    document = YamlDocument(data=None)
    if node is None:
        return document
    document.data = _build(node, (), loader, document)
    return document


def checked_events(text: str) -> list[yaml.Event]:
    """The parser's events for ``text``, refused with ``YamlLimitError`` past the depth or expansion limit.

    An alias counts the nodes of its anchor, expanded (so nested aliases multiply, as the builder would);
    an alias of an anchor not closed yet (a recursive structure) or never defined is refused too.
    """
    events: list[yaml.Event] = []
    open_nodes: list[tuple[str | None, int]] = []  # (anchor, nodes counted before it) of each open collection
    expanded: dict[str, int] = {}  # anchor -> nodes of its node, aliases expanded
    nodes = 0
    for event in yaml.parse(text, Loader=_EVENT_LOADER):
        events.append(event)
        if isinstance(event, yaml.AliasEvent):
            size = expanded.get(event.anchor)
            if size is None:
                recursive = any(anchor == event.anchor for anchor, _ in open_nodes)
                problem = "is inside its own anchor" if recursive else "has no anchor"
                raise YamlLimitError(problem=f"alias *{event.anchor} {problem}", problem_mark=event.start_mark)
            nodes += size
        elif isinstance(event, yaml.ScalarEvent):
            nodes += 1
            if event.anchor is not None:
                expanded[event.anchor] = 1
        elif isinstance(event, yaml.CollectionStartEvent):
            open_nodes.append((event.anchor, nodes))
            nodes += 1
            if len(open_nodes) > MAX_YAML_DEPTH:
                raise YamlLimitError(problem=f"nested deeper than {MAX_YAML_DEPTH} levels", problem_mark=event.start_mark)
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, before = open_nodes.pop()
            if anchor is not None:
                expanded[anchor] = nodes - before
        if nodes > MAX_YAML_NODES:
            raise YamlLimitError(problem=f"more than {MAX_YAML_NODES:,} nodes once its aliases are expanded",
                                 problem_mark=event.start_mark)
    return events


def _build(node: yaml.Node, path: Path, loader: _ExactLoader, document: YamlDocument) -> Any:
    document.lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if isinstance(key, Decimal):
                key = str(key)
            if not isinstance(key, Hashable):  # a mapping or list as a key (``? [a]``): no field is named so
                raise yaml.constructor.ConstructorError(problem="a key must be a scalar", problem_mark=key_node.start_mark)
            if key in result:
                document.duplicates.append(((*path, key), key_node.start_mark.line + 1))
            result[key] = _build(value_node, (*path, key), loader, document)
            document.lines[(*path, key)] = key_node.start_mark.line + 1
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, (*path, index), loader, document) for index, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


__all__ = ["MAX_YAML_BYTES", "MAX_YAML_DEPTH", "MAX_YAML_NODES", "YamlDocument", "YamlLimitError", "checked_events",
           "load_yaml", "read_yaml_file"]
