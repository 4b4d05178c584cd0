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


def _construct(node, path: tuple, lines: dict, where_file: str):
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise SourceError([f"{where_file}:{key_node.start_mark.line + 1}: keys must be plain names"])
            key = key_node.value
            if key in out:
                raise SourceError([f"{where_file}:{key_node.start_mark.line + 1}: duplicate key {key!r}"])
            out[key] = _construct(value_node, path + (key,), lines, where_file)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(v, path + (i,), lines, where_file) for i, v in enumerate(node.value)]
    return _scalar(node)


def _scalar(node: yaml.ScalarNode):
    """The scalar's value, typed as YAML resolves it, with two YAML 1.1
    surprises turned off: base-60 numbers ("22:10" stays a string) and
    timestamps (fields that want a time parse it themselves)."""
    tag, value = node.tag, node.value
    if tag == "tag:yaml.org,2002:null":
        return None
    if tag == "tag:yaml.org,2002:bool":
        return value.lower() in ("true", "yes", "on", "y")
    if tag == "tag:yaml.org,2002:int" and ":" not in value:
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
        node = yaml.compose(text, Loader=yaml.SafeLoader)
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
    data = _construct(node, (), lines, name)
    return data, Where(name, lines)
