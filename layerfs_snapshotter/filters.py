"""containerd's filter syntax (github.com/containerd/containerd/filters), for List.

    filters  := one string per alternative (List matches any of them)
    selectors := selector ("," selector)*          all must match
    selector := fieldpath [operator value]
    fieldpath := field ("." field)*                 field: [A-Za-z0-9_]+ or a quoted string
    operator := "==" | "!=" | "~="                  ~= is a regular expression (re.search)
    value    := quoted | any run of characters up to "," (spaces trimmed)

Quotes are ``"..."``, ``/.../`` and ``|...|`` with Go escapes; a value after ``~=`` may use
any of them, other values only ``"..."``, as containerd's parser has it. A snapshot exposes
``kind`` (active, view, committed), ``name``, ``parent`` and ``labels.<key>``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from layerfs_snapshotter.errors import InvalidArgument

# (value, present) for a field path, as containerd's adaptors answer.
Adaptor = Callable[[Sequence[str]], tuple[str, bool]]

_QUOTES = '"/|'
_ESCAPES = {
    "a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\",
}  # fmt: skip


@dataclass(frozen=True)
class Selector:
    fieldpath: tuple[str, ...]
    operator: str | None  # None: the field is present
    value: str = ""

    def match(self, adaptor: Adaptor) -> bool:
        value, present = adaptor(self.fieldpath)
        if self.operator is None:
            return present
        if self.operator == "==":
            return present and value == self.value
        if self.operator == "!=":
            return value != self.value
        return re.search(self.value, value) is not None


Filter = tuple[tuple[Selector, ...], ...]  # any of (all of)


def parse_all(texts: Sequence[str]) -> Filter:
    """Parse List's filters; an empty list or an empty string matches everything."""
    alternatives = []
    for text in texts:
        if not text:
            return ((),)
        alternatives.append(_Parser(text).selectors())
    return tuple(alternatives) or ((),)


def matches(flt: Filter, adaptor: Adaptor) -> bool:
    return any(all(s.match(adaptor) for s in alt) for alt in flt)


def snapshot_adaptor(name: str, parent: str, kind: str, labels: Mapping[str, str]) -> Adaptor:
    """The fields of a snapshot, as containerd's adaptSnapshot exposes them."""

    def field(path: Sequence[str]) -> tuple[str, bool]:
        if not path:
            return "", False
        head = path[0]
        if head == "kind":
            return kind, True
        if head == "name":
            return name, True
        if head == "parent":
            return parent, True
        if head == "labels":
            if not labels:
                return "", False
            key = ".".join(path[1:])
            return labels.get(key, ""), key in labels
        return "", False

    return field


class _Parser:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0

    def error(self, what: str) -> InvalidArgument:
        return InvalidArgument(f"filter {self.s!r}: {what} at {self.i}")

    def skip_space(self) -> None:
        while self.i < len(self.s) and self.s[self.i].isspace():
            self.i += 1

    def peek(self) -> str:
        self.skip_space()
        return self.s[self.i] if self.i < len(self.s) else ""

    def selectors(self) -> tuple[Selector, ...]:
        out = [self.selector()]
        while self.peek() == ",":
            self.i += 1
            out.append(self.selector())
        if self.peek():
            raise self.error("expected ',' or the end")
        return tuple(out)

    def selector(self) -> Selector:
        path = [self.field()]
        while self.peek() == ".":
            self.i += 1
            path.append(self.field())
        ch = self.peek()
        if ch in ("", ","):
            return Selector(tuple(path), None)
        op = self.s[self.i : self.i + 2]
        if op not in ("==", "!=", "~="):
            raise self.error('expected an operator ("=="|"!="|"~=")')
        self.i += 2
        return Selector(tuple(path), op, self.value(alt_quotes=op == "~="))

    def field(self) -> str:
        ch = self.peek()
        if ch in _QUOTES and ch:
            return self.quoted(allowed='"')
        m = re.compile(r"[A-Za-z0-9_]+").match(self.s, self.i)
        if not m:
            raise self.error("expected a field")
        self.i = m.end()
        return m.group()

    def value(self, *, alt_quotes: bool) -> str:
        ch = self.peek()
        if ch and ch in _QUOTES:
            return self.quoted(allowed=_QUOTES if alt_quotes else '"')
        m = re.compile(r"[^,\s]+").match(self.s, self.i)
        if not m:
            raise self.error("expected a value")
        self.i = m.end()
        return m.group()

    def quoted(self, allowed: str) -> str:
        quote = self.s[self.i]
        if quote not in allowed:
            raise self.error(f"quote {quote!r} not allowed here")
        self.i += 1
        out: list[str] = []
        while True:
            if self.i >= len(self.s) or self.s[self.i] == "\n":
                raise self.error("quoted literal not terminated")
            ch = self.s[self.i]
            self.i += 1
            if ch == quote:
                return "".join(out)
            if ch != "\\":
                out.append(ch)
                continue
            esc = self.s[self.i : self.i + 1]
            self.i += 1
            if esc in _ESCAPES:
                out.append(_ESCAPES[esc])
            elif esc == quote:
                out.append(quote)
            elif esc and esc in "xuU":
                width = {"x": 2, "u": 4, "U": 8}[esc]
                out.append(self.code(16, width))
            elif esc and esc in "01234567":
                self.i -= 1
                out.append(self.code(8, 3))
            else:
                raise self.error("unknown escape sequence")

    def code(self, base: int, width: int) -> str:
        digits = self.s[self.i : self.i + width]
        try:
            if len(digits) != width:
                raise ValueError
            value = int(digits, base)
        except ValueError:
            raise self.error("bad escape sequence") from None
        self.i += width
        return chr(value)
