"""CLI: `ppl check | graph | fit | predict | draws | loo | plot | summary` over the Python API.

Exit codes: 0 ok; 1 the model or data is wrong (located message, no
traceback); 2 usage; 3 inference failed numerically.  `--debug` shows a
traceback.  `check` and `graph` never import torch.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import List, Optional

from . import __version__
from .errors import EXIT_USAGE, EXIT_USER, PplError, UsageError
from .outdir import write_file
from .plan import ESTIMATORS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ppl", description="probabilistic programs with automatic variational inference")
    p.add_argument("--version", action="version", version=f"ppl {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="{check,graph,fit,predict,draws,loo,plot,summary}")

    def common(sp):
        sp.add_argument("model", help="the .ppl model file")
        sp.add_argument("data", nargs="*", help="data files: CSV (columns) or JSON (names to values)")
        sp.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a scalar data value")
        sp.add_argument("--debug", action="store_true", help="show a traceback on errors")

    c = sub.add_parser("check", help="check a model (and its data)")
    common(c)
    c.add_argument("--dump", choices=["ast", "ir"], help="print a stage's output")

    g = sub.add_parser("graph", help="show the model's directed graph")
    common(g)
    g.add_argument("--format", default=None, choices=["text", "dot", "json", "png", "svg"],
                   help="default: from -o FILE's suffix (.txt .dot .gv .json .png .svg), else text")
    g.add_argument("-o", "--output", metavar="FILE", help="write to FILE (png/svg need it)")
    g.add_argument("--estimator", default="auto", choices=list(ESTIMATORS))

    f = sub.add_parser("fit", help="fit the model by variational inference")
    common(f)
    f.add_argument("--method", default="auto",
                   help="a variational family: auto|meanfield|fullrank|lowrank|graph|flow|mixture")
    f.add_argument("--estimator", default="auto", help="|".join(ESTIMATORS) + " (for discrete latents)")
    f.add_argument("--objective", default="elbo", help="elbo|iwae|renyi|vimco")
    f.add_argument("--alpha", type=float, default=None, help="Renyi alpha (with --objective renyi; default 0.5)")
    f.add_argument("--rank", type=int, default=None, help="rank of the lowrank family (with --method lowrank)")
    f.add_argument("--components", type=int, default=None,
                   help="Gaussian components of the mixture family (with --method mixture; default 4)")
    f.add_argument("--steps", type=int, default=None, help="Adam step cap (default 10000)")
    f.add_argument("--tol", type=float, default=0.01, help="relative ELBO change for convergence; 0 turns it off")
    f.add_argument("--lr", type=float, default=None, help="step size (default: adaptive)")
    f.add_argument("--mc-samples", type=int, default=None, help="Monte Carlo samples per gradient")
    f.add_argument("--draws", type=int, default=1000, help="posterior draws to report")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--init", default="laplace",
                   help="laplace|zero|FIT_DIR: the starting point of the fit (FIT_DIR: a saved fit's q)")
    f.add_argument("--optimizer", default="auto",
                   help="adam: stochastic steps only; dadvi: L-BFGS on fixed draws (after 300 Adam steps "
                        "when the start is cold); auto: dadvi for meanfield/fullrank on small and medium data "
                        "unless --steps, --lr or --mc-samples tune Adam")
    f.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="minibatch stochastic VI: B rows per step, per-row terms scaled by N/B (with --procs W: "
                        "B rows per process, W*B a step)")
    f.add_argument("--epochs", type=int, default=None, metavar="E",
                   help="with --batch-size: at most E passes over the data (default: about 10000 steps)")
    f.add_argument("--procs", type=int, default=1, metavar="W",
                   help="a data-parallel fit: W local processes (torch.distributed, gloo), each with its share "
                        "of the rows; under torchrun the group comes from the environment")
    f.add_argument("--refine-local", type=int, default=None, metavar="K",
                   help="after a fit with encoders (amortize): K steps of each row's own q from the encoder's "
                        "output; reports the amortisation gap (ELBO after minus before)")
    f.add_argument("--holdout", type=float, default=None, metavar="F",
                   help="set aside a seeded random share F of the rows; after the fit, report the ELBO per row "
                        "of those rows under the encoders' q(z_n | x_n) (a model with encoders)")
    f.add_argument("--device", default="cpu", help="cpu|cuda|auto")
    f.add_argument("--dtype", default="float64", help="float64|float32")
    f.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="refuse a fit estimated to need more memory than SIZE (e.g. 4G; default: what is available)")
    f.add_argument("--out", metavar="DIR", help="write draws.csv, summary.csv, elbo.csv and run.json to DIR")
    f.add_argument("--force", action="store_true", help="replace an existing --out DIR that ppl wrote")
    f.add_argument("--format", default="table", choices=["table", "json"])
    f.add_argument("--profile", action="store_true", help="print where the time went")
    f.add_argument("--progress", choices=["auto", "on", "off"], default="auto")
    summary_options(f)

    def fit_dir(sp, many=False):
        sp.add_argument("fit_dir", nargs="+" if many else None, metavar="FIT_DIR",
                        help="a directory written by `ppl fit --out`")
        sp.add_argument("--debug", action="store_true", help="show a traceback on errors")

    pr = sub.add_parser("predict", help="replicated data from a saved fit (posterior or prior predictive)")
    pr.add_argument("model", help="the .ppl model file (the fitted one, or it with more deterministic nodes)")
    pr.add_argument("fit_dir", metavar="FIT_DIR", help="a directory written by `ppl fit --out`")
    pr.add_argument("data", nargs="*", metavar="DATA", help="new data (the observed columns may be left out)")
    pr.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a scalar data value")
    pr.add_argument("--debug", action="store_true", help="show a traceback on errors")
    pr.add_argument("--prior", action="store_true", help="prior predictive: every latent from its prior")
    pr.add_argument("--draws", type=int, default=None, help="draws (default: as many as the fit kept)")
    pr.add_argument("--seed", type=int, default=None)
    pr.add_argument("--out", "-o", metavar="FILE", help="write the draws: FILE.csv (one row per draw) or FILE.nc")
    summary_options(pr)

    d = sub.add_parser("draws", help="more draws from a saved fit's approximation")
    fit_dir(d)
    d.add_argument("--draws", type=int, default=1000)
    d.add_argument("--seed", type=int, default=None, help="default: the fit's seed")
    d.add_argument("--out", "-o", metavar="FILE", help="write draws.csv-style rows to FILE (default: stdout)")

    lo = sub.add_parser("loo", help="PSIS-LOO of saved fits, and their comparison")
    fit_dir(lo, many=True)
    lo.add_argument("--plain", action="store_true",
                    help="rank by the estimate that takes q's draws as posterior draws (as az.loo on fit.nc) "
                         "instead of the one corrected by the importance ratios p/q; both are shown")

    pl = sub.add_parser("plot", help="plots of a saved fit (needs the plot extra: matplotlib)")
    fit_dir(pl)
    pl.add_argument("--kind", default="marginals", help="trace|marginals|forest|ppc|pair")
    pl.add_argument("-o", "--output", metavar="FILE", help="the PNG to write (default: FIT_DIR-KIND.png beside it)")
    pl.add_argument("--vars", default=None, metavar="NAMES", help="the variables to plot (as ppl fit --vars)")

    sm = sub.add_parser("summary", help="the summary table of a saved fit")
    fit_dir(sm)
    summary_options(sm)
    sm.add_argument("--format", default="table", choices=["table", "json"])
    return p


def summary_options(sp) -> None:
    sp.add_argument("--vars", default=None, metavar="NAMES",
                    help="comma-separated names, globs (sigma*) or elements (a[3], a[Carver]) to show")
    sp.add_argument("--quantiles", default=None, metavar="P,P,...", help="quantile columns (default 0.05,0.5,0.95)")
    sp.add_argument("--hdi", type=float, default=None, metavar="P", help="add the highest-density interval of mass P")


INTERNAL = "error: internal error ("      # an unexpected exception's message (ppl.dist.launch recognises it)
_OUT_OF_MEMORY = ("the fit ran out of memory; use a smaller model or data, --method meanfield, fewer "
                  "--mc-samples or --draws, or set --max-memory so ppl refuses such a fit before it starts")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = _parser()
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    args.argv = argv
    if args.cmd is None:
        p.print_help(sys.stderr)
        return EXIT_USAGE
    if not hasattr(args, "model"):
        args.model = args.fit_dir if isinstance(args.fit_dir, str) else args.fit_dir[0]
    try:
        return COMMANDS[args.cmd](args)
    except PplError as e:
        if args.debug:
            traceback.print_exc()
        print(e.render(), file=sys.stderr)
        return e.code
    except UsageError as e:
        if args.debug:
            traceback.print_exc()
        print(f"ppl {args.cmd}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        if args.debug:
            traceback.print_exc()
        print(f"{args.model}: error: {_OUT_OF_MEMORY}", file=sys.stderr)
        return EXIT_USER
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug in ppl, not in the input: still no traceback unless asked
        if args.debug:
            traceback.print_exc()
        if "can't allocate memory" in str(e) or "out of memory" in str(e).lower():
            print(f"{args.model}: error: {_OUT_OF_MEMORY}", file=sys.stderr)
            return EXIT_USER
        print(f"{args.model}: {INTERNAL}{type(e).__name__}: {e}); "
              f"please report it (rerun with --debug for a traceback)", file=sys.stderr)
        return EXIT_USER


def _model(args):
    from .api import load
    return load(args.model)


def _data_arg(args):
    return args.data if (args.data or args.set) else None


def cmd_check(args) -> int:
    m = _model(args)
    if args.dump == "ast":
        from .frontend.ast import dump
        print(dump(m.program.statements + m.program.encoders))
        return 0
    model = m.check(_data_arg(args), args.set)
    if args.dump == "ir":
        for name in model.order:
            n = model.nodes[name]
            print(f"{n.kind:<13} {name} shape={list(n.shape)} int={n.is_int} support={n.support} deps={list(n.deps)}")
        return 0
    nl = sum(1 for n in model.nodes.values() if n.kind == "latent")
    no = sum(1 for n in model.nodes.values() if n.kind == "observed")
    n_par = sum(1 for n in model.nodes.values() if n.kind == "param")
    sizes = ", ".join(f"{k}={v}" for k, v in model.dims.items())
    print(f"{args.model}: ok ({nl} latent, " + (f"{n_par} param, " if n_par else "") + f"{no} observed"
          + (f"; {sizes}" if sizes else "") + ")")
    _print_warnings(model)
    return 0


def _print_warnings(model_or_program) -> None:
    """Non-fatal notes on the model (a variance passed where a scale is taken), to stderr."""
    from .frontend.hints import warnings
    for w in warnings(model_or_program):
        print(w.render(), file=sys.stderr)


GRAPH_SUFFIXES = {".txt": "text", ".dot": "dot", ".gv": "dot", ".json": "json", ".png": "png", ".svg": "svg"}


def graph_format(fmt: Optional[str], output: Optional[str]) -> str:
    """`ppl graph`'s format: --format, else -o FILE's suffix, else text; a suffix that says otherwise is a usage error."""
    if output is None:
        return fmt or "text"
    if not output:
        raise UsageError("-o needs a file name")
    implied = GRAPH_SUFFIXES.get(os.path.splitext(output)[1].lower())
    if fmt is None and implied is None:
        raise UsageError(f"cannot tell the format from the name '{output}': use a suffix "
                         f"({' '.join(GRAPH_SUFFIXES)}) or give --format")
    if fmt is not None and implied is not None and fmt != implied:
        raise UsageError(f"--format {fmt} does not match the suffix of '{output}' ({implied}); "
                         f"drop --format or change the suffix")
    return fmt or implied


def cmd_graph(args) -> int:
    from . import graph as G
    fmt = graph_format(args.format, args.output)
    if fmt in ("png", "svg") and args.output is None:
        raise UsageError(f"--format {fmt} writes a file: give -o FILE")
    from .config import cli_opt
    g = _model(args).graph(_data_arg(args), args.set, args.estimator, cli_opt)
    if fmt in ("png", "svg"):
        data = G.render(G.to_dot(g), fmt)
    else:
        text = {"text": G.to_text, "dot": G.to_dot, "json": G.to_json}[fmt](g)
        if args.output is None:
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
            return 0
        data = text.encode()
    write_file(args.output, data, inputs=[args.model, *args.data])
    return 0


def cmd_fit(args) -> int:
    """flags -> FitConfig -> the API (load, check, fit) -> report."""
    import time
    t_start = time.perf_counter()
    from .config import FitConfig                 # checking the options imports the registries (torch)
    config = FitConfig.from_cli(args)
    _check_summary_options(args)
    from . import dist
    if config.procs > 1 and not dist.in_group():        # start the workers; each runs this command
        return dist.launch(_worker_argv(args), config.procs)
    from .config import resolved_device
    group = dist.join(resolved_device(config)[0])      # a --procs worker, or under torchrun: its group
    leader = group is None or group.leader
    timings = {"imports+config": time.perf_counter() - t_start}
    inputs = [args.model, *args.data]
    if args.out is not None and leader:
        from .outdir import check_target
        check_target(args.out, args.force, inputs)         # refused before the fit, not after
    from . import report
    from .api import load
    bar = report.Progress() if report.show_progress(args.progress, args.format) else None
    t0 = time.perf_counter()
    m = load(args.model)
    timings["parse"] = time.perf_counter() - t0
    _print_warnings(m.program)
    try:
        f = m.fit(_data_arg(args) or [], args.set, config=config, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    if args.out is not None:
        f.gather_data()        # (a collective where each process read its own rows: the outputs need every row)
    process = time.perf_counter() - t_start
    if not leader:                                     # the outputs are the first process's
        return 0
    if args.out is not None:
        report.write_outputs(f, args.out, args.force, inputs, quantiles=args.quantiles, hdi=args.hdi,
                             command=["ppl"] + list(sys.argv[1:] if args.argv is None else args.argv),
                             process_seconds=process)
    sys.stdout.write(report.to_json(f, process) + "\n" if args.format == "json"
                     else report.table(f, process, _vars(args), args.quantiles, args.hdi))
    if args.profile:
        sys.stderr.write(report.profile(timings, f, process))
    return 0


def _worker_argv(args) -> List[str]:
    """The command each worker of --procs runs: the same, without a progress display."""
    argv = list(sys.argv[1:] if args.argv is None else args.argv)
    return argv + ["--progress", "off"]


def _vars(args):
    from .summary import parse_vars
    return parse_vars(args.vars)


def _check_summary_options(args) -> None:
    """--quantiles and --hdi are checked before any work."""
    from .summary import parse_quantiles
    parse_quantiles(args.quantiles)
    if args.hdi is not None and not 0 < args.hdi < 1:
        raise UsageError(f"--hdi takes a probability between 0 and 1 (exclusive), got {args.hdi:g}")


def _positive(name: str, value) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{name} must be at least 1, got {value}")


def cmd_predict(args) -> int:
    """Replicated data (and deterministic nodes) per draw, from a saved fit, for its data or new data."""
    _check_summary_options(args)
    _positive("--draws", args.draws)
    from .predict import simulate
    from .saved import load_fit
    if args.out is not None:
        _check_suffix(args.out, (".csv", ".nc"))
    m = _model(args)
    fit = load_fit(args.fit_dir)
    new = list(args.data)
    out, model = simulate(fit, new if (new or args.set) else None, args.set, prior=args.prior, draws=args.draws,
                          seed=args.seed, pmodel=m)
    from . import report
    kind = "prior_predictive" if args.prior else ("predictions" if (new or args.set) else "posterior_predictive")
    if args.out is not None:
        data = report.predictive_file(out, args.out, kind, model)
        write_file(args.out, data, inputs=[args.model, *new, args.fit_dir])
    sys.stdout.write(report.predictive_table(out, model, kind, _vars(args), args.quantiles, args.hdi))
    return 0


def _check_suffix(path: str, suffixes) -> None:
    if os.path.splitext(path)[1].lower() not in suffixes:
        raise UsageError(f"cannot tell the format from the name '{path}': use {' or '.join(suffixes)}")


def cmd_draws(args) -> int:
    """More draws of a saved fit's approximation, as draws.csv rows."""
    _positive("--draws", args.draws)
    from . import report
    from .saved import load_fit
    if args.out is not None:
        _check_suffix(args.out, (".csv",))
    fit = load_fit(args.fit_dir)
    seed = fit.config.seed if args.seed is None else args.seed
    if fit.q is None:
        raise UsageError(f"{args.fit_dir}: the fit saved there keeps no approximation to draw from")
    values, qd = fit.q.draw(args.draws, seed)
    text = report.draws_csv(values, qd)
    if args.out is None:
        sys.stdout.write(text)
    else:
        write_file(args.out, text.encode(), inputs=[args.fit_dir])
    return 0


def cmd_loo(args) -> int:
    """PSIS-LOO of each saved fit and, with several, their comparison."""
    from .loo import loo, report
    from .saved import load_fit
    named, other, fits = {}, {}, {}
    for d in args.fit_dir:
        name = d.rstrip("/") or d
        if name in named:
            raise UsageError(f"'{d}' is given twice")
        fits[name] = f = load_fit(d)
        try:
            named[name] = loo(f, correct=not args.plain)
            other[name] = loo(f, correct=args.plain)
        except RuntimeError as e:
            raise UsageError(f"{d}: {e}") from None
    if len(named) > 1:
        from .loo import compare
        try:
            compare(named)
        except ValueError as e:
            raise UsageError(str(e)) from None
    sys.stdout.write(report(named, fits, other))
    return 0


def cmd_plot(args) -> int:
    from .plots import KINDS, plot
    if args.kind not in KINDS:
        raise UsageError(f"unknown kind {args.kind!r} for --kind (valid: {', '.join(KINDS)})")
    out = args.output or (args.fit_dir.rstrip("/") + f"-{args.kind}.png")
    _check_suffix(out, (".png",))
    from .saved import load_fit
    fit = load_fit(args.fit_dir)
    data = plot(fit, args.kind, _vars(args))
    write_file(out, data, inputs=[args.fit_dir])
    print(out)
    return 0


def cmd_summary(args) -> int:
    _check_summary_options(args)
    from . import report
    from .saved import load_fit
    fit = load_fit(args.fit_dir)
    sys.stdout.write(report.to_json(fit) + "\n" if args.format == "json"
                     else report.table(fit, None, _vars(args), args.quantiles, args.hdi))
    return 0


COMMANDS = {"check": cmd_check, "graph": cmd_graph, "fit": cmd_fit, "predict": cmd_predict, "draws": cmd_draws,
            "loo": cmd_loo, "plot": cmd_plot, "summary": cmd_summary}


if __name__ == "__main__":
    sys.exit(main())
