"""YAML from people who are not root, read with limits on what it may cost.

Any member of the ``gpud`` group may send a layout for a dry run, so the daemon parses text it
does not trust. PyYAML's own loaders trust it: libyaml's composer recurses once per nesting level
in C (about 100,000 ``[`` crash the process), and aliases make a few hundred bytes stand for a
tree of millions of nodes that everything walking the result then pays for (an alias bomb). This
loader keeps libyaml's event parser, which is iterative, and composes the nodes itself so that it
can refuse, before anything is built:

* nesting deeper than ``max_depth``;
* more than ``max_nodes`` nodes, counting the nodes an alias stands for each time it is used, so
  an alias bomb is refused as soon as its expansion passes the bound instead of after it is built;
* an alias inside the node it names (a recursive structure) and an anchor defined twice.

Aliases are otherwise allowed: sharing one entry list between two layout names is legitimate. The
constructor is PyYAML's safe one; scalar values it cannot represent (a 5,000-digit number, the
date 2024-13-01) come back as the same :class:`BoundsError` as the limits, with their line.
"""

from __future__ import annotations

from typing import Any

from yaml.constructor import SafeConstructor
from yaml.events import (
    AliasEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

try:  # libyaml's parser: a tenth of the pure-Python parser's time, most of a no-op apply's.
    from yaml.cyaml import CParser as _EventSource
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _EventSource(Reader, Scanner, Parser):  # type: ignore[no-redef]
        def __init__(self, stream: str) -> None:
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)


class BoundsError(Exception):
    """The text is over a limit or holds a value that cannot be read; the message says where."""


def _where(mark: Any) -> str:
    return f"line {mark.line + 1}" if mark is not None else "(file)"


class BoundedLoader(_EventSource, SafeConstructor, Resolver):  # type: ignore[misc,valid-type]
    """PyYAML's safe loader with a composer that counts (see the module docstring)."""

    def __init__(self, text: str, max_depth: int, max_nodes: int) -> None:
        _EventSource.__init__(self, text)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self.max_depth = max_depth
        self.max_nodes = max_nodes
        self.nodes = 0
        # Anchor -> (its node, the nodes it stands for); None while the node is being composed.
        self._anchors: dict[str, tuple[Node, int] | None] = {}

    def get_single_node(self) -> Node | None:
        """The one document's root node, None for an empty stream (PyYAML's contract)."""
        self.get_event()  # StreamStartEvent
        node = None
        if not self.check_event(StreamEndEvent):
            self.get_event()  # DocumentStartEvent
            node = self._node(1)
            self.get_event()  # DocumentEndEvent
            self._anchors = {}
        if not self.check_event(StreamEndEvent):
            event = self.get_event()
            raise BoundsError(f"{_where(event.start_mark)}: a layout file holds one YAML document")
        self.get_event()
        return node

    def _count(self, nodes: int, mark: Any) -> None:
        self.nodes += nodes
        if self.nodes > self.max_nodes:
            raise BoundsError(
                f"{_where(mark)}: more than {self.max_nodes} YAML nodes (aliases count once per "
                "use); a layout file is far smaller"
            )

    def _node(self, depth: int) -> Node:
        event = self.get_event()
        if isinstance(event, AliasEvent):
            return self._alias(event)
        if depth > self.max_depth:
            raise BoundsError(
                f"{_where(event.start_mark)}: nested deeper than {self.max_depth} levels; "
                "a layout file needs 5"
            )
        anchor = event.anchor
        if anchor is not None:
            if anchor in self._anchors:
                raise BoundsError(f"{_where(event.start_mark)}: anchor &{anchor} defined twice")
            self._anchors[anchor] = None
        before = self.nodes
        self._count(1, event.start_mark)
        node: Node
        if isinstance(event, ScalarEvent):
            tag = event.tag
            if tag is None or tag == "!":
                tag = self.resolve(ScalarNode, event.value, event.implicit)
            node = ScalarNode(tag, event.value, event.start_mark, event.end_mark, event.style)
        elif isinstance(event, SequenceStartEvent):
            tag = event.tag
            if tag is None or tag == "!":
                tag = self.resolve(SequenceNode, None, event.implicit)
            items: list[Node] = []
            node = SequenceNode(tag, items, event.start_mark, None, event.flow_style)
            while not self.check_event(SequenceEndEvent):
                items.append(self._node(depth + 1))
            node.end_mark = self.get_event().end_mark
        else:
            assert isinstance(event, MappingStartEvent), event
            tag = event.tag
            if tag is None or tag == "!":
                tag = self.resolve(MappingNode, None, event.implicit)
            pairs: list[tuple[Node, Node]] = []
            node = MappingNode(tag, pairs, event.start_mark, None, event.flow_style)
            while not self.check_event(MappingEndEvent):
                key = self._node(depth + 1)
                pairs.append((key, self._node(depth + 1)))
            node.end_mark = self.get_event().end_mark
        if anchor is not None:
            self._anchors[anchor] = (node, self.nodes - before)
        return node

    def _alias(self, event: AliasEvent) -> Node:
        where = _where(event.start_mark)
        if event.anchor not in self._anchors:
            raise BoundsError(f"{where}: alias *{event.anchor} names no anchor before it")
        known = self._anchors[event.anchor]
        if known is None:
            raise BoundsError(f"{where}: alias *{event.anchor} is inside the node it names")
        node, size = known
        self._count(size, event.start_mark)
        return node

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as exc:
            # SafeConstructor's int() and date() on what the resolver took for one.
            message = str(exc)[:120]
            raise BoundsError(f"{_where(node.start_mark)}: cannot be read: {message}") from None


def load(
    text: str, max_depth: int, max_nodes: int, loader: type[BoundedLoader] = BoundedLoader
) -> Any:
    """The data of ``text``; BoundsError when over a limit, yaml.YAMLError when not YAML."""
    instance = loader(text, max_depth, max_nodes)
    try:
        return instance.get_single_data()
    finally:
        instance.dispose()
