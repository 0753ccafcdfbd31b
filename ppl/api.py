"""Python API: `ppl.load(path)` -> `PplModel`, whose `.check()`, `.graph()` and
`.fit()` run the pipeline stages.  The CLI calls these same methods: `ppl fit`
parses its flags into a `FitConfig` and hands it to `PplModel.fit`.

Stage: model path (+ data) -> checked `Model` -> DAG / `Fit`.
Torch is imported only by `.fit()`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence, Union

import networkx as nx

from .config import python_opt
from .data import load_data
from .errors import Source, UsageError, read_source
from .frontend import ast as A
from .frontend.check import Model, check
from .frontend.parse import parse

DataArg = Union[None, str, Sequence[str], Mapping[str, Any]]


class PplModel:
    def __init__(self, source: Source):
        self.source = source
        self.program: A.Program = parse(source)

    @property
    def path(self) -> str:
        return self.source.path

    def check(self, data: DataArg = None, sets: Sequence[str] = ()) -> Model:
        """Checked IR; with `data=None` and no `sets`, sizes stay symbolic."""
        files, objects = _split_data(data)
        if data is None and not sets:
            return check(self.program, self.source, None)

        def loader(decls, syms):
            return load_data(decls, files, sets, syms, objects=objects)
        return check(self.program, self.source, loader)

    def graph(self, data: DataArg = None, sets: Sequence[str] = (), estimator: str = "auto",
              opt: Callable = python_opt) -> nx.DiGraph:
        """The model's DAG; `opt` spells options in messages (the CLI passes `cli_opt`)."""
        from .graph import build_graph
        return build_graph(self.check(data, sets), estimator, opt)

    def fit(self, data: DataArg = (), sets: Sequence[str] = (), config=None, progress=None, **options):
        """Fit the model.  Options as `ppl fit`'s, spelled as keywords (method, estimator, objective,
        alpha, rank, steps, tol, lr, mc_samples, draws, seed, init, optimizer, device, dtype), or a
        ready `ppl.config.FitConfig` as `config`.  Options are checked before the data are read."""
        import time
        from .config import FitConfig
        if config is None:
            config = FitConfig.from_python(**options)
        elif options:
            raise UsageError("give either config= or options, not both")
        t0 = time.perf_counter()
        model = self.check(data if data is not None else (), sets)
        t_check = time.perf_counter() - t0
        from .infer.fit import fit as run_fit
        f = run_fit(model, config, progress)
        f.timings = {"data+check": t_check, **f.timings}
        return f


def load(path: str) -> PplModel:
    """Parse a model file (raises PplError with a located message on bad input)."""
    return PplModel(read_source(path, "model"))


def loads(text: str, path: str = "<string>") -> PplModel:
    return PplModel(Source(path, text))


def _split_data(data: DataArg):
    if data is None:
        return [], []
    if isinstance(data, str):
        return [data], []
    if isinstance(data, Mapping):
        return [], [dict(data)]
    files, objects = [], []
    for d in data:
        (objects if isinstance(d, Mapping) else files).append(d)
    return files, objects
