"""CLI: `ppl check | graph | fit` over the Python API.

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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ppl", description="probabilistic programs with automatic variational inference")
    p.add_argument("--version", action="version", version=f"ppl {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="{check,graph,fit}")

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
    g.add_argument("--estimator", default="auto", choices=["auto", "reparam", "score", "enumerate"])

    f = sub.add_parser("fit", help="fit the model by variational inference")
    common(f)
    f.add_argument("--method", default="auto",
                   help="a variational family: auto|meanfield|fullrank|lowrank|graph|flow|mixture")
    f.add_argument("--estimator", default="auto", help="auto|reparam|score|enumerate (for discrete latents)")
    f.add_argument("--objective", default="elbo", help="elbo|iwae|renyi")
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
    f.add_argument("--init", default="laplace", help="laplace|zero: the starting point of the fit")
    f.add_argument("--optimizer", default="auto",
                   help="adam: stochastic steps only; dadvi: L-BFGS on fixed draws (after 300 Adam steps "
                        "when the start is cold); auto: dadvi for meanfield/fullrank on small and medium data "
                        "unless --steps, --lr or --mc-samples tune Adam")
    f.add_argument("--device", default="cpu", help="cpu|cuda|auto")
    f.add_argument("--dtype", default="float64", help="float64|float32")
    f.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="refuse a fit estimated to need more memory than SIZE (e.g. 4G; default: what is available)")
    f.add_argument("--out", metavar="DIR", help="write draws.csv, summary.csv, elbo.csv and run.json to DIR")
    f.add_argument("--force", action="store_true", help="replace an existing --out DIR that ppl wrote")
    f.add_argument("--format", default="table", choices=["table", "json"])
    f.add_argument("--profile", action="store_true", help="print where the time went")
    f.add_argument("--progress", choices=["auto", "on", "off"], default="auto")
    return p


_OUT_OF_MEMORY = ("the fit ran out of memory; use a smaller model or data, --method meanfield, fewer "
                  "--mc-samples or --draws, or set --max-memory so ppl refuses such a fit before it starts")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = _parser()
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if args.cmd is None:
        p.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return {"check": cmd_check, "graph": cmd_graph, "fit": cmd_fit}[args.cmd](args)
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
        print(f"{args.model}: error: internal error ({type(e).__name__}: {e}); "
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
        print(dump(m.program.statements))
        return 0
    model = m.check(_data_arg(args), args.set)
    if args.dump == "ir":
        for name in model.order:
            n = model.nodes[name]
            print(f"{n.kind:<13} {name} shape={list(n.shape)} int={n.is_int} support={n.support} deps={list(n.deps)}")
        return 0
    nl = sum(1 for n in model.nodes.values() if n.kind == "latent")
    no = sum(1 for n in model.nodes.values() if n.kind == "observed")
    sizes = ", ".join(f"{k}={v}" for k, v in model.dims.items())
    print(f"{args.model}: ok ({nl} latent, {no} observed" + (f"; {sizes}" if sizes else "") + ")")
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
    timings = {"imports+config": time.perf_counter() - t_start}
    inputs = [args.model, *args.data]
    if args.out is not None:
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
    process = time.perf_counter() - t_start
    if args.out is not None:
        report.write_outputs(f, args.out, args.force, inputs)
    sys.stdout.write(report.to_json(f, process) + "\n" if args.format == "json" else report.table(f, process))
    if args.profile:
        sys.stderr.write(report.profile(timings, f, process))
    return 0


if __name__ == "__main__":
    sys.exit(main())
