"""Strict, bounded YAML reading for files that an admin writes and a long-running hub trusts.

libyaml (PyYAML's C parser) turns the text into events; this module builds plain Python data
(dict, list, the safe scalars) from those events itself, so that every bound is checked before
anything is expanded or copied:

- at most `Bounds.max_bytes` are read (never more, whatever the file claims);
- UTF-8 only (a UTF-8 byte-order mark is fine); UTF-16/32 and bytes that are not UTF-8 are
  refused with the line of the first bad byte;
- nesting at most `Bounds.max_depth` deep (libyaml itself stops flow nesting at 1000);
- at most `Bounds.max_nodes` nodes once every alias is expanded: an "alias bomb" is refused
  from counts, as soon as it passes the bound, before anything is built twice;
- numbers at most `Bounds.max_number_chars` long (YAML 1.1's base-60 integers make a long one
  quadratic to convert);
- duplicate keys refused at every level, naming both lines (PyYAML keeps the last one
  silently); duplicate anchors and aliases to an unfinished node refused;
- only the safe tags (SafeConstructor's scalars, plain mappings and lists) and one document;
  YAML merge keys (`<<: *defaults`) work, explicit keys winning over merged ones.

Every key and list item's line is kept by key path (`Document.line_of`), so a validator can
give a line for any problem. `short_repr` bounds any value shown in a message.
"""

from __future__ import annotations

import codecs
import os
import re
import reprlib
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.nodes import ScalarNode

from ds01hub.errors import Ds01hubError

__all__ = [
    "Bounds",
    "Document",
    "SourceProblem",
    "StrictYamlError",
    "format_key_path",
    "read_yaml",
    "read_yaml_file",
    "short_repr",
]

KeyPath = tuple[Any, ...]

# The C loader when PyYAML was built with libyaml (the wheels are); the same events otherwise.
_Loader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_CONSTRUCTORS = yaml.SafeLoader.yaml_constructors
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_NUMBER_TAGS = frozenset({"tag:yaml.org,2002:int", "tag:yaml.org,2002:float"})
SHORT = 80  # characters of a value shown in a message


@dataclass(frozen=True)
class Bounds:
    """What a file may cost to read. The defaults are far above any real limits file (DS01's
    production file: 2 KiB, 150 nodes, depth 4) and far below what hurts a hub."""

    max_bytes: int = 1 << 20
    max_depth: int = 32
    max_nodes: int = 100_000
    max_number_chars: int = 64


@dataclass(frozen=True)
class SourceProblem:
    """One reason the text cannot be read: a short `code`, the line (1-based) and the fix."""

    code: str
    message: str
    fix: str
    line: int | None = None
    path: KeyPath = ()


class StrictYamlError(Ds01hubError, ValueError):
    """The text cannot be used; `problems` says why (usually one, several duplicate keys).
    When only duplicate keys were wrong, `document` holds what was read anyway (the last of
    each duplicate), so a validator can report the file's other problems in the same pass."""

    def __init__(self, problems: list[SourceProblem], document: Document | None = None):
        self.problems = list(problems)
        self.document = document
        super().__init__("; ".join(f"line {p.line}: {p.message}" for p in self.problems[:5]))


@dataclass(frozen=True)
class Document:
    """The data, and the line of every key and list item by key path (`("groups", "a")`)."""

    data: Any
    lines: Mapping[KeyPath, int] = field(default_factory=dict)

    def line_of(self, path: KeyPath) -> int | None:
        """The line of `path`, else of its nearest enclosing key (values reached through an
        alias or a merge report the line that refers to them)."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return line
        return None


# --------------------------------------------------------------------------------------------
# Bounded text for messages


class _ShortRepr(reprlib.Repr):
    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxdict, self.maxlist = 2, 3, 4
        self.maxtuple, self.maxset, self.maxstring, self.maxother = 4, 3, SHORT, SHORT

    def repr_int(self, x: int, level: int) -> str:
        # repr() of a huge int is slow (and refused past 4300 digits): name its size instead
        return repr(x) if x.bit_length() <= 128 else f"<a {x.bit_length()}-bit number>"


_SHORT_REPR = _ShortRepr()


def short_repr(value: Any, limit: int = SHORT) -> str:
    """repr() bounded in length and in work (nested data is cut at two levels and a few
    items), so a message never carries or computes an unbounded value."""
    try:
        text = _SHORT_REPR.repr(value)
    except Exception:  # a value whose repr fails still gets a message
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_-]{1,60}$|^<<$")


def format_key_path(path: KeyPath) -> str:
    """`("groups", "a", "members", 2)` -> `groups.a.members[2]`. A name that is not plain
    (dots, spaces, empty, long) is quoted and cut: `user_overrides.'h.baker@lab.lan'`; YAML's
    null is `~`."""
    text = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            text += f"[{part}]"
            continue
        if part is None:
            name = "~"
        elif isinstance(part, str) and _PLAIN_NAME.match(part):
            name = part
        else:
            name = short_repr(part, 60)
        text += f".{name}" if text else name
    return text


# --------------------------------------------------------------------------------------------
# Reading


def read_yaml_file(path: str | os.PathLike, bounds: Bounds = Bounds()) -> Document:
    """Read a YAML file within `bounds`. A missing or unreadable file raises OSError (the
    caller knows what fix to suggest); everything else wrong raises StrictYamlError."""
    # O_NONBLOCK: a FIFO put where the file was cannot make open() wait for a writer
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise StrictYamlError(
                [SourceProblem("not-a-file", "is not a regular file", "point at a YAML file")]
            )
        if info.st_size > bounds.max_bytes:
            raise _too_large(info.st_size, bounds)
        raw = file.read(bounds.max_bytes + 1)
    return read_yaml(raw, bounds)


def read_yaml(raw: bytes | str, bounds: Bounds = Bounds()) -> Document:
    """Build the data of one YAML document from `raw` within `bounds` (module docstring)."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", errors="surrogatepass")
    if len(raw) > bounds.max_bytes:
        raise _too_large(len(raw), bounds)
    text = _decode(raw)
    loader = _Loader(text)
    try:
        return _Builder(loader, bounds, text).build()
    except yaml.YAMLError as error:
        raise StrictYamlError([_syntax_problem(error, text)]) from None
    finally:
        loader.dispose()


def _too_large(size: int, bounds: Bounds) -> StrictYamlError:
    limit = f"{bounds.max_bytes >> 10} KiB"
    return StrictYamlError(
        [
            SourceProblem(
                "too-large",
                f"the file is larger than {limit} ({size} bytes or more)",
                f"a limits file is a few KiB: keep it under {limit} (list groups, not users, "
                "where many users share limits)",
            )
        ]
    )


def _decode(raw: bytes) -> str:
    """UTF-8 text (without a BOM), or a problem naming the encoding or the first bad byte."""
    for boms, name in (
        ((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE), "UTF-32"),
        ((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE), "UTF-16"),
    ):
        if raw.startswith(boms):
            raise StrictYamlError(
                [
                    SourceProblem(
                        "encoding",
                        f"the file is {name} (it starts with a {name} byte-order mark)",
                        "save it as UTF-8 (e.g. iconv -f " + name + " -t UTF-8)",
                        1,
                    )
                ]
            )
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise StrictYamlError(
            [
                SourceProblem(
                    "encoding",
                    "the file contains NUL bytes (UTF-16 without a byte-order mark, or not "
                    "text at all)",
                    "save it as UTF-8 text",
                    raw.count(b"\n", 0, nul) + 1,
                )
            ]
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        bad = raw[error.start : error.start + 1].hex()
        raise StrictYamlError(
            [
                SourceProblem(
                    "encoding",
                    f"the file is not UTF-8 (byte 0x{bad} on line {line})",
                    "save it as UTF-8 (e.g. iconv -f LATIN1 -t UTF-8)",
                    line,
                )
            ]
        ) from None


def _syntax_problem(error: yaml.YAMLError, text: str) -> SourceProblem:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    if mark is not None:
        line: int | None = mark.line + 1
    elif isinstance(getattr(error, "position", None), int):  # ReaderError: a bad character
        line = text.count("\n", 0, error.position) + 1  # type: ignore[attr-defined]
    else:
        line = None
    what = getattr(error, "problem", None) or getattr(error, "reason", None) or str(error)
    if "maximum nesting depth" in str(what):  # libyaml's own bound (1000 flow levels)
        return SourceProblem(
            "too-deep",
            "nested too deep (more than 1000 brackets)",
            "a limits file is at most 6 levels deep: check the brackets",
            line,
        )
    context = getattr(error, "context", None)
    message = f"not valid YAML: {short_repr(str(what), 120)[1:-1]}"
    if context:
        message += f" ({short_repr(str(context), 80)[1:-1]})"
    return SourceProblem(
        "yaml-syntax", message, "check indentation (spaces, not tabs), colons and brackets", line
    )


# --------------------------------------------------------------------------------------------
# Events -> data


class _Stop(Exception):
    """Internal: a bound or a structural rule broke; the problem is attached."""

    def __init__(self, problem: SourceProblem):
        self.problem = problem


_NO_KEY = object()
_MERGE = object()


@dataclass
class _Frame:
    """One open mapping or sequence while events stream in."""

    is_map: bool
    path: KeyPath
    line: int
    start: int  # nodes counted before this one: its expanded size is counted - start
    anchor: str | None
    items: Any  # dict | list
    key: Any = _NO_KEY
    key_line: int = 0
    key_lines: dict[Any, int] = field(default_factory=dict)
    merges: list[tuple[Any, int]] = field(default_factory=list)


class _Builder:
    def __init__(self, loader: Any, bounds: Bounds, text: str):
        self.loader = loader
        self.bounds = bounds
        self.text = text
        self.stack: list[_Frame] = []
        self.anchors: dict[str, tuple[Any, int, int]] = {}  # name -> (value, size, line)
        self.lines: dict[KeyPath, int] = {}
        self.counted = 0
        self.through_aliases = False
        self.duplicates: list[SourceProblem] = []
        self.root: Any = None
        self.documents = 0

    def build(self) -> Document:
        try:
            while self.loader.check_event():
                self._event(self.loader.get_event())
        except _Stop as stop:
            raise StrictYamlError([stop.problem]) from None
        if self.duplicates:
            raise StrictYamlError(self.duplicates, Document(self.root, self.lines))
        return Document(self.root, self.lines)

    # -- events ---------------------------------------------------------------------------------

    def _event(self, event: Any) -> None:
        kind = type(event)
        line = event.start_mark.line + 1 if event.start_mark is not None else None
        if kind is yaml.DocumentStartEvent:
            self.documents += 1
            if self.documents > 1:
                self._stop(
                    "multiple-documents",
                    "more than one YAML document (a second '---')",
                    "keep one document: remove the '---' line and merge the sections",
                    line,
                )
        elif kind is yaml.ScalarEvent:
            start = self.counted
            self._count(1, line)
            value, tag = self._scalar(event, line)
            self._anchor(event.anchor, value, self.counted - start, line)
            self._add(value, line, merge=tag == _MERGE_TAG)
        elif kind is yaml.AliasEvent:
            self._alias(event.anchor, line)
        elif kind in (yaml.MappingStartEvent, yaml.SequenceStartEvent):
            self._open(event, kind is yaml.MappingStartEvent, line)
        elif kind in (yaml.MappingEndEvent, yaml.SequenceEndEvent):
            self._close()

    def _stop(self, code: str, message: str, fix: str, line: int | None) -> None:
        raise _Stop(SourceProblem(code, message, fix, line, self._child_path(self._top())))

    def _top(self) -> _Frame | None:
        return self.stack[-1] if self.stack else None

    def _count(self, nodes: int, line: int | None) -> None:
        self.counted += nodes
        if self.counted > self.bounds.max_nodes:
            if self.through_aliases:
                self._stop(
                    "alias-expansion",
                    f"aliases expand the document to more than {self.bounds.max_nodes} values "
                    "(an alias bomb?)",
                    "use fewer aliases (*name) of large anchors (&name)",
                    line,
                )
            self._stop(
                "too-many-nodes",
                f"more than {self.bounds.max_nodes} values",
                "a limits file has a few hundred values: list groups, not every user",
                line,
            )

    def _scalar(self, event: Any, line: int | None) -> tuple[Any, str]:
        tag = event.tag
        if tag is None or tag == "!":
            tag = self.loader.resolve(ScalarNode, event.value, event.implicit)
        if tag == _MERGE_TAG:
            return "<<", tag
        if tag in _NUMBER_TAGS and len(event.value) > self.bounds.max_number_chars:
            self._stop(
                "number-too-long",
                f"a number of {len(event.value)} characters",
                "write a number of a sane size (e.g. 32g, 48h, 4)",
                line,
            )
        constructor = _CONSTRUCTORS.get(tag)
        if constructor is None:
            self._unsupported_tag(tag, line)
        node = ScalarNode(tag, event.value, event.start_mark, event.end_mark, event.style)
        try:
            return constructor(self.loader, node), tag
        except (ValueError, OverflowError, TypeError, yaml.YAMLError) as error:
            self._stop(
                "bad-scalar",
                f"cannot read {short_repr(event.value)} as {tag.rsplit(':', 1)[-1]}: "
                f"{short_repr(str(error), 60)[1:-1]}",
                "quote it to make it text, or correct it",
                line,
            )
        raise AssertionError("unreachable")  # _stop raises

    def _unsupported_tag(self, tag: str, line: int | None) -> None:
        self._stop(
            "unsupported-tag",
            f"the tag {short_repr(tag)} is not allowed here",
            "remove the tag: a limits file has plain text, numbers, lists and mappings",
            line,
        )

    def _anchor(self, name: str | None, value: Any, size: int, line: int | None) -> None:
        if name is None:
            return
        if name in self.anchors:
            first = self.anchors[name][2]
            self._stop(
                "duplicate-anchor",
                f"the anchor &{short_repr(name)[1:-1]} is defined twice (lines {first} and {line})",
                "rename one of them",
                line,
            )
        self.anchors[name] = (value, size, line or 0)

    def _alias(self, name: str, line: int | None) -> None:
        if name not in self.anchors:
            self._stop(
                "bad-alias",
                f"the alias *{short_repr(name)[1:-1]} refers to no finished anchor (undefined, "
                "or inside the node it names)",
                "define the anchor (&name) before using it, outside the aliased node",
                line,
            )
        value, size, _ = self.anchors[name]
        self.through_aliases = True
        self._count(size, line)
        self._add(value, line, merge=False)

    def _open(self, event: Any, is_map: bool, line: int | None) -> None:
        tag = event.tag
        if tag not in (None, "!", _MAP_TAG if is_map else _SEQ_TAG):
            self._unsupported_tag(tag, line)
        parent = self.stack[-1] if self.stack else None
        if parent is not None and parent.is_map and parent.key is _NO_KEY:
            self._stop(
                "bad-key",
                "a key is a list or a mapping",
                "keys are plain names: write 'name: value'",
                line,
            )
        if len(self.stack) >= self.bounds.max_depth:
            self._stop(
                "too-deep",
                f"nested more than {self.bounds.max_depth} levels deep",
                "a limits file is at most 6 levels deep: check the indentation and brackets",
                line,
            )
        start = self.counted
        self._count(1, line)
        items: Any = {} if is_map else []
        path = self._child_path(parent)
        self.stack.append(_Frame(is_map, path, line or 0, start, event.anchor, items))

    def _close(self) -> None:
        frame = self.stack.pop()
        value = _merged(frame, self.lines) if frame.is_map and frame.merges else frame.items
        self._anchor(frame.anchor, value, self.counted - frame.start, frame.line)
        self._add(value, frame.line, merge=False)

    @staticmethod
    def _child_path(parent: _Frame | None) -> KeyPath:
        """The path of the next value in `parent` (the parent's own path while it waits for a
        key)."""
        if parent is None:
            return ()
        if parent.is_map:
            if parent.key is _NO_KEY:
                return parent.path
            return parent.path + ("<<" if parent.key is _MERGE else parent.key,)
        return parent.path + (len(parent.items),)

    def _add(self, value: Any, line: int | None, merge: bool) -> None:
        """Put a finished value where it belongs: the root, a list, a key or a key's value."""
        line = line or 0
        if not self.stack:
            self.root = value
            self.lines[()] = line
            return
        parent = self.stack[-1]
        if not parent.is_map:
            self.lines[parent.path + (len(parent.items),)] = line
            parent.items.append(value)
        elif parent.key is _NO_KEY:
            self._key(parent, value, line, merge)
        else:
            self._value(parent, value)

    def _key(self, parent: _Frame, key: Any, line: int, merge: bool) -> None:
        if isinstance(key, dict | list):
            self._stop(
                "bad-key",
                "a key is a list or a mapping (through an alias)",
                "keys are plain names: write 'name: value'",
                line,
            )
        seen = parent.key_lines.get(_MERGE if merge else key)
        if seen is not None:
            name = "<<" if merge else short_repr(key)
            self.duplicates.append(
                SourceProblem(
                    "duplicate-key",
                    f"the key {name} appears twice in one mapping (lines {seen} and {line}); "
                    "YAML would silently keep only the last",
                    "keep one of them (merge their contents)",
                    line,
                    parent.path + (key,),
                )
            )
        else:
            parent.key_lines[_MERGE if merge else key] = line
        parent.key, parent.key_line = (_MERGE if merge else key), line

    def _value(self, parent: _Frame, value: Any) -> None:
        key, parent.key = parent.key, _NO_KEY
        if key is _MERGE:
            sources = value if isinstance(value, list) else [value]
            if not sources or not all(isinstance(source, dict) for source in sources):
                self._stop(
                    "bad-merge",
                    "a merge key (<<) takes an alias of a mapping or a list of them",
                    "write '<<: *name' where &name marks a mapping",
                    parent.key_line,
                )
            parent.merges.append((sources, parent.key_line))
            return
        self.lines[parent.path + (key,)] = parent.key_line
        parent.items[key] = value


def _merged(frame: _Frame, lines: dict[KeyPath, int]) -> dict:
    """A mapping with `<<` merges applied: its own keys win, then earlier merged mappings."""
    result: dict = {}
    for sources, line in frame.merges:
        for source in sources:
            for key, value in source.items():
                if key not in result and key not in frame.items:
                    result[key] = value
                    lines[frame.path + (key,)] = line
    result.update(frame.items)
    return result
