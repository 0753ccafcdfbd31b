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
from .errors import Diagnostic, PplError, Source, UsageError, read_source
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

    def check(self, data: DataArg = None, sets: Sequence[str] = (), fill_missing=None) -> Model:
        """Checked IR; with `data=None` and no `sets`, sizes stay symbolic.  `fill_missing`: data
        names that may be absent, with the value that fills them (`ppl.data.load_data`)."""
        files, objects = _split_data(data)
        if data is None and not sets:
            return check(self.program, self.source, None)
        _check_data_size(files)

        def loader(decls, syms):
            return load_data(decls, files, sets, syms, objects=objects, fill_missing=fill_missing,
                             own_rows=not self.program.encoders)
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


def load_fit(fit_dir: str):
    """A fit saved by `ppl fit --out DIR` (or `fit.save(DIR)`), restored whole: draws, diagnostics,
    and the approximation (`fit.draw`, `fit.predict`, `fit.loo`; `init=DIR` starts a new fit from it)."""
    from .saved import load_fit as _load_fit
    return _load_fit(fit_dir)


def load(path: str) -> PplModel:
    """Parse a model file (raises PplError with a located message on bad input)."""
    return PplModel(read_source(path, "model"))


def loads(text: str, path: str = "<string>") -> PplModel:
    return PplModel(Source(path, text))


DATA_FACTOR = 3      # peak memory while reading a file, in multiples of its size (text, parsed columns, arrays)
STREAMED_FACTOR = 1.5  # a large CSV is streamed (ppl/data.py): its arrays (8 bytes a number, about its text's
                       # size at 6-8 digits a number) and one chunk


def _check_data_size(files: Sequence[str]) -> None:
    """Refuse data files that cannot be read into the memory available, before reading them."""
    import os
    from .infer.budget import available_memory, _gb
    avail = available_memory()
    from .data import FAST_CSV_BYTES
    sizes, need = [], 0.0
    for f in files:
        try:
            size = os.path.getsize(f)
        except OSError:
            continue                  # a missing file is reported, located, by the reader
        sizes.append((size, f))
        streamed = size > FAST_CSV_BYTES and not f.lower().endswith(".json")
        need += (STREAMED_FACTOR if streamed else DATA_FACTOR) * size
    total = sum(s for s, _ in sizes)
    if avail is not None and sizes and need > 0.8 * avail:
        size, biggest = max(sizes)
        raise PplError([Diagnostic(None, f"the data files take {_gb(total)}; reading them needs about "
                                   f"{_gb(need)} of memory, more than the {_gb(avail)} available; "
                                   f"use fewer rows or columns", biggest)])


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
