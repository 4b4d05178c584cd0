"""Reading YAML (and JSON, which YAML reads too) while remembering where
every value came from, so that errors can name file:line.

`load(path)` returns the plain Python data and a `Where` that maps a path
inside the data (a tuple of keys and indices) to its line.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from loader.errors import DataplaneError


class SourceError(DataplaneError):
    """One or more located problems in an input file; str() is one line each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclasses.dataclass
class Where:
    file: str
    lines: dict

    def line(self, path: tuple) -> int:
        """Line of the value at path, or of its nearest ancestor."""
        while path not in self.lines and path:
            path = path[:-1]
        return self.lines.get(path, 1)

    def at(self, path: tuple) -> str:
        return f"{self.file}:{self.line(path)}"


# Bounds on what a document may unfold into. A policy or an inventory nests a
# handful of levels; aliases may share a few parts. Past these the input is
# refused with its line, instead of exhausting the stack or the memory.
MAX_DEPTH = 64                  # nesting levels, aliases unfolded
MAX_ALIAS_NODES = 100_000       # nodes built again because an alias names them
MAX_INT_DIGITS = 100            # longer integers are refused, not printed (Python limits int <-> str)


class _Loader(yaml.SafeLoader):
    """The safe loader, refusing nesting deeper than MAX_DEPTH while it
    composes (PyYAML's composer recurses once per level)."""

    def __init__(self, stream, name: str):
        super().__init__(stream)
        self._name = name
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise SourceError([f"{self._name}:{line}: nested more than {MAX_DEPTH} levels deep"])
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


@dataclasses.dataclass
class _Build:
    """What one document's construction has seen: every node, the nodes on
    the current path (an alias to one of them is a cycle) and how many nodes
    aliases made it build again."""

    name: str
    lines: dict
    seen: set = dataclasses.field(default_factory=set)
    open: set = dataclasses.field(default_factory=set)
    copies: int = 0


def _construct(node, path: tuple, b: _Build, at: int = 0):
    """at: the line of the key holding this value, named where an alias is
    used (an aliased node's own line is its anchor's)."""
    line = node.start_mark.line + 1
    if id(node) in b.seen:
        line = at or line
        if id(node) in b.open:
            raise SourceError([f"{b.name}:{line}: an alias refers to a node that contains it"])
        b.copies += 1
        if b.copies > MAX_ALIAS_NODES:
            raise SourceError([f"{b.name}:{line}: aliases unfold to more than {MAX_ALIAS_NODES} nodes"])
    if len(path) > MAX_DEPTH:
        raise SourceError([f"{b.name}:{line}: nested more than {MAX_DEPTH} levels deep (aliases unfolded)"])
    b.seen.add(id(node))
    b.lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        b.open.add(id(node))
        out = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise SourceError([f"{b.name}:{key_node.start_mark.line + 1}: keys must be plain names"])
            key = key_node.value
            _check_text(key, b.name, key_node)
            if key in out:
                raise SourceError([f"{b.name}:{key_node.start_mark.line + 1}: duplicate key {key!r}"])
            out[key] = _construct(value_node, path + (key,), b, key_node.start_mark.line + 1)
        b.open.discard(id(node))
        return out
    if isinstance(node, yaml.SequenceNode):
        b.open.add(id(node))
        out = [_construct(v, path + (i,), b, at) for i, v in enumerate(node.value)]
        b.open.discard(id(node))
        return out
    return _scalar(node, b.name)


def _check_text(value: str, name: str, node) -> None:
    """A lone surrogate (only a "\\ud800" escape can make one) is no text:
    nothing could print, log or send it. Refused where it is written."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SourceError([f"{name}:{node.start_mark.line + 1}: not valid Unicode text: a lone surrogate "
                           f"(\\u{ord(value[e.start]):04x}) at character {e.start + 1}"]) from None


def _scalar(node: yaml.ScalarNode, name: str = "<input>"):
    """The scalar's value, typed as YAML resolves it, with two YAML 1.1
    surprises turned off: base-60 numbers ("22:10" stays a string) and
    timestamps (fields that want a time parse it themselves). Integers of
    more than MAX_INT_DIGITS digits are refused: no field wants one, and
    Python cannot print one of more than 4300."""
    tag, value = node.tag, node.value
    _check_text(value, name, node)
    if tag == "tag:yaml.org,2002:null":
        return None
    if tag == "tag:yaml.org,2002:bool":
        return value.lower() in ("true", "yes", "on", "y")
    if tag == "tag:yaml.org,2002:int" and ":" not in value:
        digits = value.replace("_", "").lstrip("+-")
        if len(digits) > MAX_INT_DIGITS:
            raise SourceError([f"{name}:{node.start_mark.line + 1}: a number of {len(digits)} characters is "
                               f"too long (at most {MAX_INT_DIGITS}); quote it if it is a name"])
        try:
            return int(value.replace("_", ""), 10)
        except ValueError:
            try:
                return int(value.replace("_", ""), 0)
            except ValueError:
                return value
    if tag == "tag:yaml.org,2002:float" and ":" not in value:
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load(path: str | Path) -> tuple[object, Where]:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SourceError([f"{path}: no such file"]) from None
    except OSError as e:
        raise SourceError([f"{path}: cannot read: {e.strerror}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise SourceError([f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x})"]) from None
    return loads(text, str(path))


def loads(text: str, name: str) -> tuple[object, Where]:
    if text.lstrip()[:1] in ("{", "["):
        # JSON: tabs may only be whitespace there (a string cannot hold a raw
        # tab), but YAML refuses them as indentation. Same lines either way.
        text = text.replace("\t", " ")
    try:
        node = yaml.compose(text, Loader=lambda stream: _Loader(stream, name))
    except yaml.reader.ReaderError as e:
        line = text[:e.position].count("\n") + 1
        raise SourceError([f"{name}:{line}: not valid YAML or JSON: unacceptable character "
                           f"#x{e.character if isinstance(e.character, int) else ord(e.character):04x}"]) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        raise SourceError([f"{name}:{line}: not valid YAML or JSON: {e.problem or e.context}"]) from None
    except yaml.YAMLError as e:
        raise SourceError([f"{name}: not valid YAML or JSON: {e}"]) from None
    if node is None:
        raise SourceError([f"{name}:1: the file is empty"])
    lines: dict = {}
    data = _construct(node, (), _Build(name, lines))
    return data, Where(name, lines)
