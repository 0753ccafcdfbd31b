"""Hints for habits from elsewhere (Stan, R, BUGS, PyMC).

Two kinds:

- `syntax_hint`: the parser found its first syntax error; if the offending
  line shows a habit from another language at the error's position (a
  trailing `;`, `target +=`, `<-`, a Stan block or declaration, a `for` loop,
  `T[0,]` truncation, keyword arguments, the conditional bar `|`), a message
  that says what ppl expects instead replaces the generic one.  Only the
  offending line is looked at (a regular expression or two), and only after an
  error: a valid model never pays for it.
- `warnings`: non-fatal notes on a parsed model, today one: a bare name that
  says "variance" (`sigma2`, `var_y`, `tau_sq`, `sigma^2`) passed where a
  distribution takes an sd or a scale.

Every message is one clause or two, located, in the voice of the other errors.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from .. import distributions as DS
from .. import functions as FN
from ..errors import Diagnostic, Source, _printable
from . import ast as A

# (first column, end column (exclusive), message), columns 1-based on the error's line
Hint = Tuple[int, int, str]

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_EXAMPLE = "`y ~ normal(mu, 1)`"


def syntax_hint(source: Source, line: int, col: int, open_brackets: Sequence[Tuple[str, int, int]] = ()
                ) -> Optional[Hint]:
    """A hint for the syntax error at (line, col), or None.

    `open_brackets`: the brackets still open before the error, innermost last,
    as (character, line, column)."""
    text = source.line(line)
    i = col - 1
    if not 0 <= i < len(text):
        return None
    at_top = not open_brackets
    for rule in (_block, _block_close, _stan_decl, _for_loop, _target) if at_top else ():
        h = rule(text, i, source)
        if h:
            return h
    inner = open_brackets[-1] if open_brackets else None
    if inner is not None and inner[0] == "(":
        h = (_bar(text, i, inner if inner[1] == line else None)
             or _keyword_arg(text, i, source, inner))
        if h:
            return h
    if at_top:
        for rule in (_r_assign, _truncation):
            h = rule(text, i, source)
            if h:
                return h
    return _semicolon(text, i, at_top)


# ---- statement-level habits (no bracket open) ---------------------------------
_BLOCK = re.compile(r"^\s*(functions|data|transformed\s+data|parameters|transformed\s+parameters|model"
                    r"|generated\s+quantities)\s*\{")


def _block(text: str, i: int, source: Source) -> Optional[Hint]:
    m = _BLOCK.match(text)
    if not m or i >= m.end():
        return None
    return (m.start(1) + 1, m.end() + 1,
            "ppl has no blocks: declare data with `data y: real[N]`, latents with `mu ~ normal(0, 1)`; see README")


def _block_close(text: str, i: int, source: Source) -> Optional[Hint]:
    if text[i] != "}" or text[:i].strip():
        return None
    return i + 1, i + 2, "ppl has no blocks or loops; drop the '}'"


_STAN_TYPES = ("real|int|vector|row_vector|matrix|simplex|ordered|positive_ordered|unit_vector|cov_matrix"
               "|corr_matrix|cholesky_factor_corr|cholesky_factor_cov")
_DECL = re.compile(rf"^\s*(?:array\s*(?P<outer>\[[^\]\n]*\])\s*)?(?P<type>{_STAN_TYPES})\b\s*(?P<bounds><[^>\n]*>)?"
                   rf"\s*(?P<dims>\[[^\]\n]*\])?\s*(?P<name>{_NAME})\s*(?:;|=|#|$)")
_SQUARE = {"cov_matrix", "corr_matrix", "cholesky_factor_corr", "cholesky_factor_cov"}
_LATENT = {"real": "real", "vector": "real", "row_vector": "real", "matrix": "real", "simplex": "simplex",
           "ordered": "ordered", "cholesky_factor_corr": "cholesky_factor_corr"}


def _stan_decl(text: str, i: int, source: Source) -> Optional[Hint]:
    """`real<lower=0> sigma;`, `vector[N] y;`, `array[N] int y;`: Stan writes the type first."""
    m = _DECL.match(text)
    if not m or i >= m.end("name"):
        return None
    name, stan, bounds = m.group("name"), m.group("type"), m.group("bounds") or ""
    outer = [d.strip() for d in (m.group("outer") or "[]")[1:-1].split(",") if d.strip()]
    inner = [d.strip() for d in (m.group("dims") or "[]")[1:-1].split(",") if d.strip()]
    if stan in _SQUARE and len(inner) == 1:
        inner = inner * 2                    # cov_matrix[K] is K x K
    dims = f"[{', '.join(outer + inner)}]" if outer + inner else ""
    latent = _LATENT.get(stan)
    data = f"`data {name}: {'int' if stan == 'int' else 'real'}{bounds}{dims}` for data"
    start = text.index("array") if m.group("outer") else m.start("type")
    lead = "ppl writes the name before the type: "
    if latent is None:
        return start + 1, m.end("name") + 1, lead + data
    return start + 1, m.end("name") + 1, lead + f"`{name}: {latent}{bounds}{dims}` for a latent, " + data


_FOR = re.compile(rf"^\s*(for)\b\s*(?:\(|{_NAME}\s+in\b)")


def _for_loop(text: str, i: int, source: Source) -> Optional[Hint]:
    m = _FOR.match(text)
    if not m or i >= m.end():
        return None
    return (m.start(1) + 1, m.end(1) + 1,
            "ppl has no loops: statements are vectorised (`y ~ normal(mu, sigma)` covers every element of y)")


_TARGET = re.compile(r"^\s*(target\s*\+=)")


def _target(text: str, i: int, source: Source) -> Optional[Hint]:
    m = _TARGET.match(text)
    if not m or i >= m.end():
        return None
    rewrite = _lpdf_rewrite(text, m.end(), whole=True)
    msg = (f"ppl has no `target +=`; write `{rewrite}` for a likelihood term" if rewrite else
           f"ppl has no `target +=`; write each density term with '~', like {_EXAMPLE}")
    return m.start(1) + 1, m.end(1) + 1, msg


def _r_assign(text: str, i: int, source: Source) -> Optional[Hint]:
    """R's `x <- expr`."""
    if text[i] != "<" or text[i + 1: i + 2] != "-":
        return None
    m = re.match(rf"^\s*({_NAME})\s*$", text[:i])
    if not m:
        return None
    rest = _code(text[i + 2:]).strip().rstrip(";").strip()
    rhs = rest if rest and len(rest) <= 40 else "..."
    return i + 1, i + 3, f"ppl assigns with '=', not '<-': write `{m.group(1)} = {rhs}`"


def _truncation(text: str, i: int, source: Source) -> Optional[Hint]:
    """Stan's `y ~ normal(0, 1) T[0, ]`."""
    if text[i] != "T" or text[i + 1: i + 2].isalnum() or text[i + 1: i + 2] == "_":
        return None
    after = text[i + 1:].lstrip()
    if not after.startswith("[") or not text[:i].rstrip().endswith(")") or "~" not in text[:i]:
        return None
    close = _matching(text, text.index("[", i))
    if close is None:
        return None
    bounds = _split_top(text[text.index("[", i) + 1: close])
    end = close + 2
    generic = "ppl has no truncation syntax; declare the bound on the variable: `sigma: real<lower=0> ~ normal(0, 1)`"
    if len(bounds) != 2:
        return i + 1, end, generic
    lo, hi = (b.strip() for b in bounds)
    tilde = text.index("~")
    m = re.match(rf"^\s*({_NAME})\s*(\[[^\]]*\])?\s*$", text[:tilde])
    if not m:
        return i + 1, end, generic
    name, dims = m.group(1), m.group(2) or ""
    if re.search(rf"(?m)^\s*data\s+{re.escape(name)}\s*:", source.text):
        msg = f"ppl has no truncation syntax and cannot truncate the density of data '{name}'"
        if lo == "0" and not hi:
            msg += f"; for {name} > 0 use a distribution on (0, inf), like lognormal or gamma"
        return i + 1, end, msg
    keys = ", ".join(f"{k}={v}" for k, v in (("lower", lo), ("upper", hi)) if v)
    call = text[tilde + 1: i].strip()
    if not keys:
        return i + 1, end, generic
    return (i + 1, end, f"ppl has no truncation syntax; declare the bound on the variable: "
            f"`{name}: real<{keys}>{dims} ~ {call}`")


def _semicolon(text: str, i: int, at_top: bool) -> Optional[Hint]:
    if text[i] != ";":
        return None
    if _code(text[i + 1:]).strip(" \t;"):
        if not at_top:
            return None          # `f(a; b)`: not a statement's end
        return i + 1, i + 2, "ppl statements end at the end of the line; put each on its own line, without ';'"
    return i + 1, i + 2, "ppl statements end at the end of the line; drop the ';'"


# ---- inside a call -------------------------------------------------------------
_LPDF = re.compile(rf"({_NAME})_(lpdf|lpmf|lupdf|lupmf)\s*\(")


def _bar(text: str, i: int, inner) -> Optional[Hint]:
    """Stan's conditional bar: `normal_lpdf(y | mu, 1)` (the call opened on the error's line)."""
    if text[i] != "|" or inner is None:
        return None
    opener = inner[2] - 1
    m = re.search(rf"({_NAME})_(lpdf|lpmf|lupdf|lupmf)\s*$", text[:opener])
    if not m:
        return None
    rewrite = _lpdf_rewrite(text, m.start(), whole=False)
    example = f"`{rewrite}`" if rewrite else _EXAMPLE
    return i + 1, i + 2, f"ppl has no {m.group(0).strip()}(y | ...): write {example} for a likelihood term"


def _keyword_arg(text: str, i: int, source: Source, inner) -> Optional[Hint]:
    """PyMC's `normal(mu=0, sigma=1)`."""
    if text[i] != "=" or text[i + 1: i + 2] == "=":
        return None
    m = re.search(rf"({_NAME})\s*$", text[:i])
    before = text[:m.start()].rstrip() if m else None
    if before is None or not (before == "" or before.endswith(("(", ","))):   # "" : a continued line
        return None
    opener_line = source.line(inner[1])
    f = re.search(rf"({_NAME})\s*$", opener_line[: inner[2] - 1])
    if not f:
        return None              # `(a = 1)`: a parenthesis, not a call
    func = f.group(1)
    spec = DS.REGISTRY.get(func) or DS.REGISTRY.get(func.lower())
    if spec is not None:
        msg = f"arguments are positional, in Stan's order: {spec.name}({', '.join(p for p, _ in spec.params)})"
    elif func in FN.REGISTRY:
        msg = f"arguments are positional: {func}({', '.join(FN.REGISTRY[func].params)})"
    else:
        msg = f"arguments are positional; drop '{m.group(1)}='"
    return m.start(1) + 1, i + 2, msg


# ---- helpers --------------------------------------------------------------------
def _code(text: str) -> str:
    """A line without its comment."""
    return text.split("#", 1)[0]


def _matching(text: str, open_at: int) -> Optional[int]:
    pairs = {"(": ")", "[": "]"}
    stack = []
    for j in range(open_at, len(text)):
        c = text[j]
        if c in pairs:
            stack.append(pairs[c])
        elif c in ")]":
            if not stack or stack.pop() != c:
                return None
            if not stack:
                return j
    return None


def _split_top(text: str) -> List[str]:
    """Split at commas outside brackets."""
    out, depth, cur = [], 0, ""
    for c in text:
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        if c == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += c
    out.append(cur)
    return out


def _lpdf_rewrite(text: str, start: int, whole: bool) -> Optional[str]:
    """`normal_lpdf(y | mu, 1)` from `start` on -> `y ~ normal(mu, 1)` (a known distribution, a plain
    name before the bar); with `whole`, nothing else may follow on the line."""
    m = _LPDF.search(text, start)
    if not m or (whole and text[start: m.start()].strip()):
        return None
    dist = m.group(1)
    if dist not in DS.REGISTRY:
        return None
    open_at = m.end() - 1
    close = _matching(text, open_at)
    if close is None:
        return None
    inside = text[open_at + 1: close]
    depth, bar = 0, None
    for j, c in enumerate(inside):
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        elif c == "|" and depth == 0:
            bar = j
            break
    if bar is None:
        return None
    value, args = inside[:bar].strip(), inside[bar + 1:].strip()
    if not re.fullmatch(_NAME, value) or not args:
        return None
    if whole and _code(text[close + 1:]).strip(" \t;"):
        return None
    return f"{value} ~ {dist}({' '.join(args.split())})"


# ---- warnings -------------------------------------------------------------------------
@dataclass(frozen=True)
class PplWarning(Diagnostic):
    """A located, non-fatal note; renders like an error, with `warning:`."""

    def render(self) -> str:
        out = super().render()
        if self.span is None:
            return out.replace(": error: ", ": warning: ", 1)
        s = self.span
        head = f"{s.path}:{s.line}:{s.col}: error: "
        return f"{s.path}:{s.line}:{s.col}: warning: " + out[len(head):] if out.startswith(head) else out


# names that say "variance": sigma2, sigma_sq, sigmasq, s2, tau2, var, variance, var_y, y_var ...
_SD_STEMS = r"(?:sigma|sig|sd|s|tau|std|se|omega)"
_VARIANCE_NAME = re.compile(
    rf"^(?:{_SD_STEMS}_?(?:2|sq|squared)(?:_[a-z0-9]+)?"
    rf"|{_SD_STEMS}_[a-z0-9]+_?(?:sq|squared)"
    rf"|var|variance|var_[a-z0-9_]+|variance_[a-z0-9_]+|[a-z0-9_]+_var|[a-z0-9_]+_variance)$")
_SD_DISTS = {"normal", "lognormal", "half_normal"}


def _scale_params(spec: DS.DistSpec) -> List[int]:
    """Indexes of the parameters that take an sd or a scale."""
    out = [spec.scale] if spec.scale is not None else []
    out += [k for k, (p, _) in enumerate(spec.params) if p == "sigma" and k not in out]
    return out


def _looks_like_variance(name: str, names: set) -> bool:
    low = name.lower()
    if not _VARIANCE_NAME.match(low):
        return False
    m = re.match(r"^([a-z_]*?)_?2$", low)
    if m and any(re.fullmatch(rf"{re.escape(m.group(1))}_?[013-9]", n.lower()) for n in names):
        return False          # sigma1, sigma2: a numbering, not a square
    return True


def warnings(model) -> List[PplWarning]:
    """Non-fatal notes on a model (a checked `Model` or a parsed `ast.Program`), in source order.

    Each is a `PplWarning` (a `Diagnostic` whose `render()` says `warning:`); `ppl check` and
    `ppl fit` print them to stderr, after the result line, without changing the exit code."""
    program: A.Program = getattr(model, "program", model)
    names = {s.name for s in program.statements}
    for s in program.statements:
        for e in _exprs(s):
            names.update(n.id for n in A.names_in(e))
    out: List[PplWarning] = []
    for s in program.statements:
        for call in _calls(s):
            spec = DS.REGISTRY.get(call.func)
            if spec is None or len(call.args) != spec.arity:
                continue
            for k in _scale_params(spec):
                a = call.args[k]
                suggestion = _variance_fix(a, names)
                if suggestion is None:
                    continue
                what, fixed = suggestion
                args = [_text(x) for x in call.args]
                args[k] = fixed
                takes = "an sd" if spec.name in _SD_DISTS else "a scale"
                out.append(PplWarning(a.span, f"{spec.name} takes {takes}; '{what}' looks like a variance: "
                                              f"write {spec.name}({', '.join(args)})"))
    return sorted(out, key=lambda w: w.sort_key())


def _variance_fix(a: A.Expr, names: set) -> Optional[Tuple[str, str]]:
    base = a.base if isinstance(a, A.Index) else a
    if isinstance(base, A.Name) and _looks_like_variance(base.id, names):
        return _text(a), f"sqrt({_text(a)})"
    if isinstance(a, A.BinOp) and a.op == "^" and isinstance(a.right, A.Num) and a.right.value == 2:
        return _text(a), _text(a.left)
    if isinstance(a, A.Call) and a.func == "square" and len(a.args) == 1:
        return _text(a), _text(a.args[0])
    return None


def _text(e: A.Expr) -> str:
    """An expression as the model spells it (its source text when on one line)."""
    s = e.span
    if s.source is not None and s.line == s.end_line and s.end_col > s.col:
        return _printable(s.source.line(s.line)[s.col - 1: s.end_col - 1])
    from .check import A_text        # late: the parser imports this module and need not load the checker
    return _printable(A_text(e))


def _exprs(s: A.Stmt):
    if isinstance(s, A.Sample):
        return [s.dist]
    if isinstance(s, A.Assign):
        return [s.expr]
    return []


def _calls(s: A.Stmt):
    """Distribution calls: the right of every `~`."""
    if isinstance(s, A.Sample):
        yield s.dist
