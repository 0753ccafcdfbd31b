"""Fit configuration: the options of a fit, validated once (torch is imported
only when the names are checked against the registries).

Stage: options from the command line or from Python -> `FitConfig`.

`FitConfig` is built by `ppl fit` (`from_cli`) and by `PplModel.fit(**options)`
(`from_python`) alike, and checked here, in one place: each option's range,
and each combination that cannot apply (`--rank` without a family that takes
a rank, `--alpha` without an objective that takes it, `--optimizer dadvi` with
a family or objective it cannot serve).  A bad option is a `UsageError`
(exit 2) that names the option as the caller spelled it: `--rank` on the
command line, `rank=` from Python.  The engine speaks of options through
`config.opt(name)`, so it never knows which caller it serves.

Names of families, objectives and estimators are checked against their
registries (imported when the check runs), so a new registry entry is an
accepted option without a change here.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, Optional, Tuple

from .errors import UsageError

INITS = ("laplace", "zero")


def cli_opt(name: str, value: Any = None) -> str:
    """An option as the command line spells it: `--mc-samples` (`--mc-samples 4`)."""
    flag = "--" + name.replace("_", "-")
    return flag if value is None else f"{flag} {value}"


def python_opt(name: str, value: Any = None) -> str:
    """An option as Python spells it: `mc_samples=` (`mc_samples=4`)."""
    return f"{name}=" if value is None else f"{name}={value!r}"


SPELLERS = {"cli": cli_opt, "python": python_opt}
DEVICES = ("cpu", "cuda", "auto")
DTYPES = ("float64", "float32")


@dataclass(frozen=True)
class FitConfig:
    method: str = "auto"                 # a family name (registry ppl.infer.families.FAMILIES) or auto
    estimator: str = "auto"              # auto | reparam | score | enumerate | relaxed (| score-all from Python)
    objective: str = "elbo"              # registry ppl.infer.objectives.OBJECTIVES
    alpha: Optional[float] = None        # objective option (renyi)
    rank: Optional[int] = None           # family option (lowrank)
    components: Optional[int] = None     # family option (mixture)
    steps: Optional[int] = None          # Adam step cap; given: exactly a stochastic fit of at most N steps
    tol: float = 0.01                    # relative ELBO change for convergence; 0 turns the check off
    lr: Optional[float] = None           # Adam step size (None: chosen from the start and the MC samples)
    mc_samples: Optional[int] = None     # Monte Carlo samples per gradient (None: from the model's size)
    draws: int = 1000                    # posterior draws reported
    seed: int = 0
    init: str = "laplace"                # laplace | zero (cold start) | a saved fit's directory (warm start)
    optimizer: str = "auto"              # registry ppl.infer.engine.OPTIMIZERS or auto
    gradient: str = "auto"               # registry ppl.infer.estimators.GRADIENTS or auto (Python only)
    device: str = "cpu"
    dtype: str = "float64"
    max_memory: Optional[int] = None     # bytes a fit may use (None: the machine's available memory)
    min_steps: int = 300                 # no convergence check before this many Adam steps
    batch_size: Optional[int] = None     # rows per minibatch (None: the full data every step)
    epochs: Optional[int] = None         # passes over the data under batch_size (a cap; None: from MAX_STEPS)
    procs: int = 1                       # data-parallel processes (ppl.dist; the command line starts them)
    refine_local: Optional[int] = None   # after a fit with encoders: steps of each row's own q (the amortisation gap)
    holdout: Optional[float] = None      # a share of the rows set aside, scored by the encoders after the fit
    caller: str = "python"               # "cli" or "python": how options are spelled in messages

    # ---- spelling ---------------------------------------------------------------------------
    def opt(self, name: str, value: Any = None) -> str:
        """An option as the caller spells it: `--mc-samples` / `mc_samples=` (with a value when given)."""
        return SPELLERS[self.caller](name, value)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_python(cls, **options) -> "FitConfig":
        names = {f.name for f in fields(cls)} - {"caller"}
        unknown = sorted(set(options) - names)
        if unknown:
            raise UsageError(f"unknown option {unknown[0]}= (options: {', '.join(sorted(names))})")
        return cls(caller="python", **options).validated()

    @classmethod
    def from_cli(cls, args) -> "FitConfig":
        keys = [f.name for f in fields(cls) if f.name not in ("caller", "min_steps")]
        return cls(caller="cli", **{k: getattr(args, k) for k in keys if hasattr(args, k)}).validated()

    def _check_memory(self):
        if self.max_memory is None or (isinstance(self.max_memory, int) and not isinstance(self.max_memory, bool)):
            value = self.max_memory
        else:
            from .infer.budget import parse_size
            try:
                value = parse_size(self.max_memory)
            except UsageError as e:
                self._fail(f"{self.opt('max_memory')} takes {e}")
        if value is not None and value <= 0:
            self._fail(f"{self.opt('max_memory')} must be positive, got {self.max_memory!r}")
        object.__setattr__(self, "max_memory", value)

    # ---- validation ---------------------------------------------------------------------------
    def validated(self) -> "FitConfig":
        self._check_memory()
        self._check_types()
        self._check_ranges()
        self._check_names()
        self._check_combinations()
        return self

    def _fail(self, msg: str):
        raise UsageError(msg)

    def _check_types(self):
        ints = ("rank", "components", "steps", "mc_samples", "draws", "seed", "min_steps", "batch_size", "epochs",
                "procs", "refine_local")
        floats = ("alpha", "tol", "lr", "holdout")
        strs = ("method", "estimator", "objective", "init", "optimizer", "device", "dtype", "gradient")
        for k in ints:
            v = getattr(self, k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                if isinstance(v, float) and v.is_integer():
                    object.__setattr__(self, k, int(v))
                else:
                    self._fail(f"{self.opt(k)} takes a whole number, got {v!r}")
        for k in floats:
            v = getattr(self, k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                self._fail(f"{self.opt(k)} takes a number, got {v!r}")
            if v is not None and v != v:
                self._fail(f"{self.opt(k)} must be a number, got nan")
        for k in strs:
            v = getattr(self, k)
            if not isinstance(v, str):
                self._fail(f"{self.opt(k)} takes a name, got {v!r}")

    def _check_ranges(self):
        at_least = {"steps": 1, "mc_samples": 1, "draws": 1, "rank": 1, "components": 1, "min_steps": 0, "seed": 0,
                    "batch_size": 1, "epochs": 1, "refine_local": 1}
        for k, lo in at_least.items():
            v = getattr(self, k)
            if v is not None and v < lo:
                self._fail(f"{self.opt(k)} must be at least {lo}, got {v}")
        if self.tol < 0 or self.tol == float("inf"):
            self._fail(f"{self.opt('tol')} must be a non-negative number (0 turns the convergence check off), "
                       f"got {self.tol}")
        if self.lr is not None and not (0 < self.lr < float("inf")):
            self._fail(f"{self.opt('lr')} must be a positive step size, got {self.lr}")
        if self.alpha is not None and not (-1e6 < self.alpha < 1e6):
            self._fail(f"{self.opt('alpha')} must be a finite number, got {self.alpha}")
        if self.holdout is not None and not (0 < self.holdout < 1):
            self._fail(f"{self.opt('holdout')} is the share of rows held out: a number between 0 and 1, got "
                       f"{self.holdout}")
        if self.seed >= 2 ** 63:
            self._fail(f"{self.opt('seed')} must be below 2^63, got {self.seed}")

    def _check_names(self):
        from .infer.families import FAMILIES
        from .infer.objectives import OBJECTIVES
        from .infer.engine import OPTIMIZERS
        from .infer.estimators import GRADIENTS
        from .plan import ESTIMATORS
        one_of = {
            "gradient": ("auto",) + tuple(GRADIENTS),
            "method": ("auto",) + tuple(FAMILIES),
            "objective": tuple(OBJECTIVES),
            "estimator": ESTIMATORS + (("score-all",) if self.caller == "python" else ()),
            "optimizer": ("auto",) + tuple(OPTIMIZERS),
            "init": INITS, "device": DEVICES, "dtype": DTYPES,
        }
        for k, valid in one_of.items():
            v = getattr(self, k)
            if k == "init" and v not in valid and is_fit_dir(v):
                continue                       # a warm start from a saved fit (ppl.posterior.warm_start)
            if v not in valid:
                also = ", or a directory written by `ppl fit --out`" if k == "init" else ""
                self._fail(f"unknown {k} {v!r} for {self.opt(k)} (valid: {', '.join(valid)}){also}")

    def _check_combinations(self):
        from .infer.families import FAMILIES
        from .infer.objectives import OBJECTIVES
        from .infer.engine import OPTIMIZERS
        for opt_name, owner, table in (("rank", "method", FAMILIES), ("components", "method", FAMILIES),
                                       ("alpha", "objective", OBJECTIVES)):
            if getattr(self, opt_name) is None:
                continue
            takers = [n for n, entry in table.items() if opt_name in getattr(entry, "options", ())]
            if opt_name not in getattr(table.get(getattr(self, owner)), "options", ()):
                self._fail(f"{self.opt(opt_name)} applies to {self.opt(owner)} "
                           f"{' or '.join(takers) if takers else '(none)'}, not to "
                           f"{self.opt(owner, getattr(self, owner))}")
        takes = getattr(FAMILIES.get(self.method), "objectives", None)
        if takes and self.objective not in takes:
            self._fail(f"{self.opt('method', self.method)} is fitted by {' or '.join(self.opt('objective', o) for o in takes)}"
                       f", not {self.opt('objective', self.objective)}")
        if self.estimator == "relaxed" and not OBJECTIVES[self.objective].linear:
            self._fail(f"{self.opt('estimator', 'relaxed')} fits the ELBO only, not "
                       f"{self.opt('objective', self.objective)}; use {self.opt('objective', 'elbo')}")
        if self.optimizer != "auto":
            OPTIMIZERS[self.optimizer].check_config(self)
        self._check_minibatch()
        if self.procs < 1:
            self._fail(f"{self.opt('procs')} must be at least 1, got {self.procs}")
        if self.procs > 1 and self.caller == "python":
            self._fail(f"{self.opt('procs')} starts worker processes from the command line "
                       f"(ppl fit --procs {self.procs}); from Python, run under torchrun")
        if self.device == "cuda":
            import torch
            if not torch.cuda.is_available():
                self._fail(f"{self.opt('device', 'cuda')}: no CUDA device is available here "
                           f"(use {self.opt('device', 'cpu')} or {self.opt('device', 'auto')})")


    def _check_minibatch(self):
        from .infer.objectives import OBJECTIVES
        if self.epochs is not None and self.batch_size is None:
            self._fail(f"{self.opt('epochs')} applies with {self.opt('batch_size')} (passes over the data in "
                       f"minibatches)")
        if self.batch_size is None:
            return
        if self.steps is not None:
            self._fail(f"{self.opt('steps')} does not apply with {self.opt('batch_size')}; "
                       f"cap the passes over the data with {self.opt('epochs')}")
        if not OBJECTIVES[self.objective].linear:
            self._fail(f"{self.opt('objective', self.objective)} cannot run on minibatches (its value is not "
                       f"a sum over rows); use {self.opt('objective', 'elbo')} with {self.opt('batch_size')}")
        if self.estimator == "score-all":
            self._fail(f"{self.opt('estimator', 'score-all')} cannot run on minibatches")

    def check_rows(self, n_rows: Optional[int]) -> None:
        """`batch_size` against the data: at most the N rows there are (once the data are bound)."""
        if self.batch_size is not None and n_rows is not None and self.batch_size > n_rows:
            self._fail(f"{self.opt('batch_size', self.batch_size)} is larger than the data: "
                       f"there are {n_rows} rows")


def is_fit_dir(path: str) -> bool:
    """A directory that `ppl fit --out` wrote (it holds a run.json)."""
    import os
    return isinstance(path, str) and os.path.isdir(path) and os.path.isfile(os.path.join(path, "run.json"))


def resolved_device(config: FitConfig) -> Tuple[str, str]:
    """(device, note): `auto` picks CUDA when present, else the CPU, and says so."""
    import torch
    if config.device == "auto":
        if torch.cuda.is_available():
            return "cuda", "auto"
        return "cpu", "auto: no CUDA device"
    return config.device, ""


def describe(config: FitConfig) -> Dict[str, Any]:
    """The configuration as a plain dict (for the run record)."""
    return {f.name: getattr(config, f.name) for f in fields(config) if f.name != "caller"}
