"""Source spans and user-facing errors (every stage).

A `Span` locates a piece of source text (a model file or a data file); a
`Diagnostic` is one located message; `PplError` carries one or more of them
and the exit code.  `render` turns a diagnostic into the
``file:line:col: error: message`` block with the source line and a caret.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Optional, Sequence

EXIT_OK, EXIT_USER, EXIT_USAGE, EXIT_NUMERIC = 0, 1, 2, 3


@dataclass(frozen=True)
class Source:
    """The text of one input file, kept so messages can quote its lines."""
    path: str
    text: str

    @cached_property
    def _lines(self):
        return self.text.split("\n")     # as the lexer counts lines (not str.splitlines: \f, \x85 ...)

    def line(self, lineno: int) -> str:
        lines = self._lines
        return lines[lineno - 1].rstrip("\r") if 1 <= lineno <= len(lines) else ""


@dataclass(frozen=True)
class Span:
    source: Optional[Source]
    line: int
    col: int
    end_line: int
    end_col: int          # exclusive

    @property
    def path(self) -> str:
        return self.source.path if self.source else "<input>"

    def __repr__(self) -> str:  # keeps AST dumps short
        return f"{self.line}:{self.col}"


def _printable(text: str) -> str:
    """A message on one line: control characters and line separators (from user text) escaped."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


_SHOW = 100     # longest source line quoted in full under a message


@dataclass(frozen=True)
class Diagnostic:
    span: Optional[Span]
    message: str
    path: Optional[str] = None          # for errors with no span (a whole file)

    def render(self) -> str:
        if self.span is None:
            return f"{self.path or 'ppl'}: error: {_printable(self.message)}"
        s = self.span
        head = f"{s.path}:{s.line}:{s.col}: error: {_printable(self.message)}"
        if s.source is None:
            return head
        # one character per column; control characters (NUL, ...) would garble the terminal
        text = "".join(c if c.isprintable() else " " if c.isspace() else "\ufffd" for c in s.source.line(s.line))
        if not text and s.line > len(s.source.text.splitlines()):
            return head
        width = (s.end_col - s.col) if s.end_line == s.line else len(text) - s.col + 1
        width = max(1, min(width, max(1, len(text) - s.col + 1)))
        pad = s.col - 1
        if len(text) > _SHOW:        # a very long line: show a window around the caret
            start = max(0, min(pad - _SHOW // 3, len(text) - _SHOW))
            text = ("..." if start else "") + text[start:start + _SHOW] + ("..." if start + _SHOW < len(text) else "")
            width = max(1, min(width, _SHOW - (pad - start)))
            pad = pad - start + (3 if start else 0)
        gutter = f"{s.line:>5} | "
        return "\n".join([head, gutter + text,
                          " " * (len(gutter) - 2) + "| " + " " * pad + "^" * width])

    def sort_key(self):
        s = self.span
        return (s.path, s.line, s.col) if s else (self.path or "", 0, 0)


class PplError(Exception):
    """One or more located user errors; `code` is the process exit code."""

    def __init__(self, diagnostics: Sequence[Diagnostic] | Diagnostic, code: int = EXIT_USER):
        if isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        self.diagnostics = sorted(diagnostics, key=Diagnostic.sort_key)
        self.code = code
        super().__init__(self.render())

    def render(self) -> str:
        return "\n".join(d.render() for d in self.diagnostics)


class UsageError(Exception):
    """Bad command-line usage (exit 2)."""


def did_you_mean(name: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=3, cutoff=0.6)
    if not close:
        return ""
    if len(close) == 1:
        return f"; did you mean '{close[0]}'?"
    return "; did you mean " + ", ".join(f"'{c}'" for c in close[:-1]) + f" or '{close[-1]}'?"


def one_of(options: Iterable[str]) -> str:
    return ", ".join(sorted(options))


def decode_source(raw: bytes, path: str) -> Source:
    """Bytes of a text file -> Source (a UTF-8 BOM dropped); invalid UTF-8 is a located error."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        before = raw[: e.start].decode("utf-8", "replace")
        line = before.count("\n") + 1
        col = len(before) - (before.rfind("\n") + 1) + 1
        raise PplError([Diagnostic(Span(Source(path, before), line, col, line, col + 1),
                                   f"byte 0x{raw[e.start]:02x} is not UTF-8 text")])
    return Source(path, text[1:] if text.startswith("\ufeff") else text)


def read_source(path: str, what: str) -> Source:
    """Read a model or data file; unreadable or not UTF-8 -> a PplError naming the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise PplError([Diagnostic(None, f"cannot read {what} file: {e.strerror}", path)])
    return decode_source(raw, path)
