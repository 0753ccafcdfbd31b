"""Parse: model text -> AST (`ast.Program`).

The grammar lives in grammar/ppl.lark (installed as package data `ppl.grammar`).
Lark types never leave this module: a syntax error becomes a located
`PplError`, a parse tree becomes frozen AST nodes with spans.

Only the first syntax error is reported (as stanc3 does); semantic errors are
all collected by the checker.  A syntax error that shows a habit from another
language (a trailing `;`, `target +=`, a Stan block, ...) says what ppl expects
instead (hints.py).
"""
from __future__ import annotations

import os
import sys
from functools import lru_cache
from importlib import resources
from typing import Optional

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from ..errors import Diagnostic, PplError, Source, Span, decode_source, read_source
from . import ast as A
from .hints import syntax_hint

_BRACKETS_OPEN = {"LPAR", "LSQB", "LESSTHAN"}
_BRACKETS_CLOSE = {"RPAR", "RSQB", "MORETHAN"}

# readable names for terminals in "expected ..." lists
_TERMINAL_WORDS = {
    "NAME": "a name", "NUMBER": "a number", "STRING": "a string", "_NL": "end of line",
    "COMPOP": "a comparison", "$END": "end of file",
}


_OPERATORS = {"PLUS", "MINUS", "STAR", "SLASH", "AT", "CIRCUMFLEX", "COMPOP", "LSQB"}


class _BracketNewlines:
    """Post-lexer: a newline inside (), [] or <> of a type continues the line.

    It also tells the two meanings of `>` apart: LALR merges the state after an
    operand inside a type's `<...>` with the one in an expression, so the
    contextual lexer calls every `>` the closing MORETHAN; outside `<...>`
    (or nested in brackets within it) it is a comparison, COMPOP."""
    always_accept = ("_NL",)

    def process(self, stream):
        stack = []
        self.opened = opened = []     # the open bracket tokens, for syntax-error hints
        for tok in stream:
            if tok.type == "MORETHAN" and (not stack or stack[-1] != "LESSTHAN"):
                tok.type = "COMPOP"
            elif tok.type in _BRACKETS_OPEN:
                stack.append(tok.type)
                opened.append(tok)
            elif tok.type in _BRACKETS_CLOSE:
                if stack:
                    stack.pop()
                    opened.pop()
            elif tok.type == "_NL" and stack:
                continue
            yield tok


def _cache_file():
    """Where Lark caches the parse tables: a directory only this user can write.

    (Lark's `cache=True` unpickles a file with a predictable name in the shared
    temp directory, which another local user could plant: that would run code.)"""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    d = os.path.join(base, "ppl")
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        st = os.stat(d)
        if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o022):
            return False
    except OSError:
        return False
    return os.path.join(d, "grammar-py%d%d.lark-cache" % sys.version_info[:2])


@lru_cache(maxsize=1)
def _parser() -> Lark:
    text = resources.files("ppl.grammar").joinpath("ppl.lark").read_text()
    return Lark(text, parser="lalr", lexer="contextual", postlex=_BracketNewlines(),
                propagate_positions=True, maybe_placeholders=True, cache=_cache_file())


decode = decode_source   # bytes of a model file -> Source


def parse(source: Source) -> A.Program:
    """Source text -> AST; raises PplError on a syntax error."""
    text = source.text
    if "\0" in text:
        before = text[: text.index("\0")]
        line, col = before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1
        raise PplError([Diagnostic(Span(source, line, col, line, col + 1), "a NUL byte is not allowed in a model")])
    try:
        tree = _parser().parse(text + "\n")
    except UnexpectedInput as e:
        d = _syntax_diagnostic(e, source)
        opened = getattr(_parser().options.postlex, "opened", [])
        hint = _hint(d, opened, source)
        if hint is not None:
            d = hint
        elif opened and d.span is not None and opened[-1].line < d.span.line:
            o = opened[-1]
            d = Diagnostic(d.span, f"{d.message} (inside the '{o}' opened at line {o.line}, column {o.column})")
        raise PplError([d]) from None
    except RecursionError:
        raise PplError([Diagnostic(Span(source, 1, 1, 1, 2), "expression is nested too deeply")]) from None
    _check_depth(tree, source)
    try:
        items = _ToAst(source).transform(tree)
    except VisitError as e:
        if isinstance(e.orig_exc, PplError):
            raise e.orig_exc from None
        if isinstance(e.orig_exc, RecursionError):
            raise PplError([Diagnostic(Span(source, 1, 1, 1, 2), "expression is nested too deeply")]) from None
        raise
    except RecursionError:
        raise PplError([Diagnostic(Span(source, 1, 1, 1, 2), "expression is nested too deeply")]) from None
    stmts = tuple(s for s in items if not isinstance(s, A.Amortize))
    encoders = tuple(s for s in items if isinstance(s, A.Amortize))
    return A.Program(stmts, source.path, Span(source, 1, 1, 1, 2), encoders)


# Parse-tree depth allowed (real models stay under 30).  Later stages recurse
# over expressions; deeper input is a located error, never a RecursionError.
MAX_DEPTH = 200


def _check_depth(tree: Tree, source: Source) -> None:
    stack = [(tree, 0)]
    while stack:
        t, d = stack.pop()
        kids = [c for c in t.children if isinstance(c, Tree)]
        if kids and d >= MAX_DEPTH:
            m = t.meta
            line, col = getattr(m, "line", 1), getattr(m, "column", 1)
            raise PplError([Diagnostic(Span(source, line, col, line, col + 1),
                                       "expression is nested too deeply; "
                                       "split it into several statements")])
        stack.extend((c, d + 1) for c in kids)


def _hint(d: Diagnostic, opened, source: Source) -> Optional[Diagnostic]:
    """The syntax error with a hint for a habit from elsewhere (see hints.py), or None."""
    s = d.span
    if s is None:
        return None
    before = [(str(t), t.line, t.column) for t in opened if (t.line, t.column) < (s.line, s.col)]
    try:
        h = syntax_hint(source, s.line, s.col, before)
    except Exception:       # a hint is a nicety: never let it hide the syntax error (tests call it bare)
        h = None
    if h is None:
        return None
    col, end, msg = h
    return Diagnostic(Span(source, s.line, col, s.line, end), msg)


def _describe(tok: Token) -> str:
    if tok.type == "_NL":
        return "end of line"
    if tok.type == "$END":
        return "end of file"
    return repr(str(tok)) if len(str(tok)) <= 20 else repr(str(tok)[:20] + "...")


def _expected(names) -> str:
    parser = _parser()
    words = set()
    names = set(names or ())
    if not getattr(parser.options.postlex, "opened", None):
        # LALR merges states: outside brackets, closers and ',' are offered but never valid
        names = (names - {"RPAR", "RSQB", "COMMA", "MORETHAN"}) or names
    if len(names) > 1:
        names.discard("_NL")   # always accepted by the post-lexer, rarely what was meant
    ops = names & _OPERATORS
    if len(ops) >= 3:
        names = (names - _OPERATORS) | {"an operator"}
    for n in names:
        if n == "an operator":
            words.add(n)
            continue
        if n in _TERMINAL_WORDS:
            words.add(_TERMINAL_WORDS[n])
            continue
        try:
            pat = parser.get_terminal(n).pattern
            words.add(repr(pat.value) if pat.type == "str" else n.lower())
        except KeyError:
            words.add(n.lower())
    words = sorted(words)
    if not words or len(words) > 8:
        return ""
    return "; expected " + (words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1])


def _syntax_diagnostic(e: UnexpectedInput, source: Source) -> Diagnostic:
    nlines = max(1, len(source.text.splitlines()))
    if isinstance(e, UnexpectedCharacters):
        ch = source.text[e.pos_in_stream] if e.pos_in_stream < len(source.text) else ""
        what = repr(ch) if ch.isprintable() else f"character U+{ord(ch):04X}" if ch else "input"
        msg = f"unexpected {what}"
        if ch == '"':
            msg = "unterminated or misplaced string"
        elif ch == "." and (source.text[e.pos_in_stream + 1: e.pos_in_stream + 2].isalpha()
                            or source.text[e.pos_in_stream + 1: e.pos_in_stream + 2] == "_"):
            msg = "unexpected '.': ppl has no attribute access or methods"
        elif e.allowed:
            msg += _expected(e.allowed)
        return Diagnostic(Span(source, e.line, e.column, e.line, e.column + 1), msg)
    if isinstance(e, UnexpectedToken):
        tok = e.token
        if tok.type in ("$END",) or tok.line is None:
            line = nlines
            col = len(source.line(line)) + 1
            return Diagnostic(Span(source, line, col, line, col + 1),
                              "unexpected end of file" + _expected(e.expected))
        line, col = tok.line, tok.column
        if tok.type == "_NL":
            # point just past the end of the line that ended too early
            col = len(source.line(line)) + 1
            if col == 1 and line > 1:
                line -= 1
                col = len(source.line(line)) + 1
            return Diagnostic(Span(source, line, col, line, col + 1),
                              "unexpected end of line" + _expected(e.expected))
        end = tok.end_column if tok.end_line == tok.line and tok.end_column else col + 1
        msg = f"unexpected {_describe(tok)}" + _expected(e.expected)
        if tok.type == "STAR" and tok.start_pos and source.text[tok.start_pos - 1: tok.start_pos] == "*":
            msg = "unexpected '*': '**' is not an operator; write powers with '^'"
        elif tok.type == "COMPOP" and "PLUS" in (e.expected or ()):
            msg = f"unexpected {_describe(tok)}: comparisons do not chain (a < b < c is not allowed)"
        elif tok.type == "STRING":
            msg = f"unexpected string {tok}: a string is allowed only in `from \"pattern\"` of a data declaration"
        return Diagnostic(Span(source, line, col, line, end), msg)
    if isinstance(e, UnexpectedEOF):
        line = nlines
        col = len(source.line(line)) + 1
        return Diagnostic(Span(source, line, col, line, col + 1), "unexpected end of file")
    return Diagnostic(Span(source, 1, 1, 1, 2), "syntax error")


@v_args(meta=True)
class _ToAst(Transformer):
    def __init__(self, source: Source):
        super().__init__()
        self.src = source

    # spans -------------------------------------------------------------
    def _m(self, meta) -> Span:
        return Span(self.src, meta.line, meta.column, meta.end_line, meta.end_column)

    def _t(self, tok: Token) -> Span:
        return Span(self.src, tok.line, tok.column, tok.end_line, tok.end_column)

    # statements ----------------------------------------------------------
    def start(self, meta, children):
        return [c for c in children if c is not None]

    def data_decl(self, meta, c):
        name, typ, pattern = c[0], c[1], (c[2] if len(c) > 2 else None)
        return A.DataDecl(str(name), typ, pattern, self._m(meta), self._t(name))

    def from_clause(self, meta, c):
        return str(c[0])[1:-1]

    def sample(self, meta, c):
        name = c[0]
        dims = c[1] if c[1] is not None else ()
        return A.Sample(str(name), dims, None, c[2], self._m(meta), self._t(name))

    def typed_sample(self, meta, c):
        name = c[0]
        return A.Sample(str(name), c[1].dims, c[1], c[2], self._m(meta), self._t(name))

    def param_decl(self, meta, c):
        return A.ParamDecl(str(c[0]), c[1], self._m(meta), self._t(c[0]))

    def flat_decl(self, meta, c):
        return A.FlatDecl(str(c[0]), c[1], self._m(meta), self._t(c[0]))

    def assign(self, meta, c):
        return A.Assign(str(c[0]), c[1], self._m(meta), self._t(c[0]))

    def amortize(self, meta, c):
        names = [t for t in c if isinstance(t, Token)]
        enc = next(x for x in c if isinstance(x, tuple))
        iaf = c[-1] if isinstance(c[-1], A.Num) else None
        latent, inputs = names[0], names[1:]
        hidden, activation, linear = enc
        return A.Amortize(A.Name(str(latent), self._t(latent)),
                          tuple(A.Name(str(t), self._t(t)) for t in inputs), hidden, activation, linear, iaf,
                          self._m(meta))

    def mlp_encoder(self, meta, c):
        act = c[-1]
        sizes = tuple(self.number(meta, [t]) for t in c[:-1])
        return (sizes, None if act is None else A.Name(str(act), self._t(act)), False)

    def linear_encoder(self, meta, c):
        return ((), None, True)

    def iaf_steps(self, meta, c):
        return self.number(meta, [c[0]])

    # types ----------------------------------------------------------------
    def basic_type(self, meta, c):
        name, bounds, dims = c
        return A.TypeSpec(str(name), bounds or (), dims or (), self._m(meta))

    def level_type(self, meta, c):
        dims, k = c
        return A.TypeSpec("level", (), dims, self._m(meta), A.Dim(str(k), self._t(k)))

    def bounds(self, meta, c):
        return tuple(c)

    def bound(self, meta, c):
        return A.Bound(str(c[0]), c[1], self._m(meta))

    def dims(self, meta, c):
        return tuple(c)

    def dim_name(self, meta, c):
        return A.Dim(str(c[0]), self._t(c[0]))

    def dim_int(self, meta, c):
        tok = c[0]
        text = str(tok)
        if not text.isdigit():
            raise PplError([Diagnostic(self._t(tok), f"a dimension must be a whole number or a name, not {text}")])
        return A.Dim(int(text), self._t(tok))

    # expressions ------------------------------------------------------------
    def number(self, meta, c):
        text = str(c[0])
        is_int = text.isdigit()
        return A.Num(int(text) if is_int else float(text), is_int, self._t(c[0]))

    def name(self, meta, c):
        return A.Name(str(c[0]), self._t(c[0]))

    def call(self, meta, c):
        name, args = c
        return A.Call(str(name), tuple(args or ()), self._m(meta), self._t(name))

    def args(self, meta, c):
        return tuple(c)

    def vector(self, meta, c):
        return A.Vector(tuple(c[0]), self._m(meta))

    def index(self, meta, c):
        return A.Index(c[0], tuple(c[1]), self._m(meta))

    def neg(self, meta, c):
        return A.Neg(c[0], self._m(meta))

    def compare(self, meta, c):
        return A.BinOp(str(c[1]), c[0], c[2], self._m(meta))

    def _bin(op):  # noqa: N805 - a factory for the five arithmetic rules
        def rule(self, meta, c):
            return A.BinOp(op, c[0], c[1], self._m(meta))
        return rule

    add, sub, mul, div, matmul, pow = _bin("+"), _bin("-"), _bin("*"), _bin("/"), _bin("@"), _bin("^")


def parse_file(path: str) -> A.Program:
    return parse(read_source(path, "model"))
