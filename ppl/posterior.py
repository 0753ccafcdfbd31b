"""The posterior after a fit: the fitted approximation q as an object that
outlives the optimiser — it draws more, is saved as arrays and restored in a
new process — and the methods a `Fit` offers on top of its draws (`draw`,
`predict`, `log_likelihood`, `loo`, `save`, `table`).

Stage: the fit's compiled model, family and discrete q's -> `Approximation`
(draws in constrained space with their log p and log q; arrays <-> files).
The methods delegate to one module per job: `ppl.predict` (replicated data),
`ppl.loo` (pointwise log-likelihood, PSIS-LOO), `ppl.saved` (the files of
`--out`), `ppl.summary` (the printed table).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch


@dataclass
class QDraws:
    """The reported draws as q made them: unconstrained theta (S, dim), discrete latents on the score
    path, and for each draw log p (the model's log density on the unconstrained space, Jacobian
    included, enumerated latents summed out) and log q."""
    theta: torch.Tensor
    z: Dict[str, torch.Tensor]
    log_p: np.ndarray
    log_q: np.ndarray

    @property
    def log_weights(self) -> np.ndarray:
        return self.log_p - self.log_q


class Approximation:
    """The fitted q: the family (continuous latents, unconstrained), the discrete q's (score path),
    and the compiled model they live on."""

    def __init__(self, program, family, discrete, plan, method: str, structure=None, windows=None):
        self.program, self.family, self.discrete = program, family, dict(discrete)
        self.plan, self.method, self.structure = plan, method, structure
        self.gen: torch.Generator = family.gen
        # count latents summed over windows (ppl.infer.windows): their windows, and those sent to the score path
        self.too_wide = sorted(windows.too_wide) if windows is not None else []

    # ---- draws ------------------------------------------------------------------------------------
    def draw(self, S: int, seed: Optional[int] = None, on_chunk=None) -> Tuple[Dict[str, np.ndarray], QDraws]:
        """S draws of q -> (values of every latent and deterministic node, constrained, by name;
        their theta, z, log p and log q).  With `seed`, the same draws whenever the same q is drawn
        from (in this process or after a restore); without, the stream goes on."""
        if seed is not None:
            self.gen.manual_seed(int(seed))
        program, fam, dq = self.program, self.family, self.discrete
        values: Dict[str, List[np.ndarray]] = {}
        log_p = []
        with torch.no_grad():
            theta, log_q = fam.rsample_with_log_q(S)
            z = {k: q.sample(S, theta) for k, q in dq.items()}
            for k, q in dq.items():
                log_q = log_q + q.log_q(z[k], theta).reshape(S, -1).sum(-1)
            chunk = program.chunk_size()
            for i in range(0, S, chunk):
                ev = program.evaluate(theta[i:i + chunk], {k: v[i:i + chunk] for k, v in z.items()},
                                      keep_enum=True)
                log_p.append(ev.total)
                for k, v in program.values(ev, self.gen).items():
                    values.setdefault(k, []).append(v.detach().cpu().numpy().copy())
                if on_chunk is not None:
                    on_chunk(None)
            lp = torch.cat(log_p)
        out = {k: np.concatenate(v, 0) for k, v in values.items()}
        return out, QDraws(theta, z, lp.cpu().numpy().copy(), log_q.cpu().numpy().copy())

    # ---- the first two moments in theta (the warm start of a new fit) --------------------------------
    def moments(self, S: int = 4000, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mean, Cholesky factor of the covariance) of q over theta: exact for the Gaussian families
        whose scale in the whitened coordinates is known, else from S draws."""
        fam = self.family
        pre = getattr(fam, "pre", None)           # (none for per-row families: their moments come from draws)
        with torch.no_grad():
            if getattr(fam, "closed_form", False) and type(fam).__name__ in ("MeanField", "FullRank"):
                m, C = fam.mean_scale_u()
                mean = pre.to_theta(m.unsqueeze(0))[0]
                if C.dim() == 1:
                    scale = pre.A * C if pre.diag else pre.A * C[None, :]
                else:
                    scale = torch.diag(pre.A) @ C if pre.diag else pre.A @ C
                if scale.dim() == 1:
                    return mean, torch.diag(scale)
                cov = scale @ scale.T
            else:
                self.gen.manual_seed(seed)
                theta, _ = fam.rsample_with_log_q(max(S, 4 * fam.dim + 100))
                mean = theta.mean(0)
                d = theta - mean
                cov = d.T @ d / (theta.shape[0] - 1)
            cov = 0.5 * (cov + cov.T)
            jitter = 1e-10 * float(torch.diagonal(cov).abs().max().clamp_min(1e-300))
            eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
            return mean, torch.linalg.cholesky(cov + jitter * eye)

    # ---- arrays <-> a saved approximation ----------------------------------------------------------
    def state(self) -> Dict[str, np.ndarray]:
        """Every number that defines q, as arrays (for `fit.npz`)."""
        fam = self.family
        own = getattr(fam, "state_arrays", None)      # a family with rows of its own (minibatch.RowLocal)
        out = {"q.method": np.asarray(self.method), **own()} if own is not None else \
            {"q.method": np.asarray(self.method), "q.pre.mu0": _np(fam.pre.mu0), "q.pre.A": _np(fam.pre.A)}
        base = getattr(fam, "base", None)
        if base is not None:
            out["q.base.pre.mu0"], out["q.base.pre.A"] = _np(base.pre.mu0), _np(base.pre.A)
        params = fam.parameters() + [q.param for q in self.discrete.values()]
        for i, p in enumerate(params):
            out[f"q.param{i}"] = _np(p)
        out["q.discrete"] = np.asarray(list(self.discrete), dtype=str)
        for name, q in self.discrete.items():          # a conditional q's whitening of theta
            if getattr(q, "c0", None) is not None:
                out[f"q.center.{name}.c0"], out[f"q.center.{name}.sd"] = _np(q.c0), _np(q.c_sd)
        out["q.too_wide"] = np.asarray(self.too_wide, dtype=str)
        for g in self.program.enum:                    # the windows of counts summed by truncated enumeration
            for m in g.members:
                if m.window:
                    lo, hi = self.program.window(m.name)
                    out[f"q.window.{m.name}.lo"], out[f"q.window.{m.name}.hi"] = lo, hi
        return out

    @classmethod
    def restore(cls, model, config, state: Dict[str, np.ndarray]) -> "Approximation":
        """The q of `state` on `model` (checked with the data it was fitted to, or other data of the
        same sizes).  A mismatch is a `ValueError` naming what differs."""
        from .backend.log_joint import LogJoint
        from .backend.runtime import Runtime
        from .infer.families import FAMILIES, Preconditioner
        from .infer.fit import model_structure
        from .plan import plan as make_plan
        rt = Runtime.make("cpu", config.dtype, config.seed)
        too_wide = frozenset(str(x) for x in state.get("q.too_wide", np.asarray([], dtype=str)))
        from .infer.relaxed_rows import auto_relax
        plan = make_plan(model, config.estimator, config.opt, too_wide, relax=auto_relax(model, config))
        program = LogJoint(model, plan, rt)
        for name, p in plan.items():
            if p.window:
                lo, hi = state.get(f"q.window.{name}.lo"), state.get(f"q.window.{name}.hi")
                if lo is None or hi is None or tuple(lo.shape) != tuple(int(d) for d in model.nodes[name].shape):
                    raise ValueError(f"the saved approximation has no window for the count latent '{name}'")
                program.set_window(name, lo, hi)
        method = str(state["q.method"])
        if "q.rows" in state:                      # per-row q's (minibatch.RowLocal, amortized.Amortized)
            from .infer.amortized import restore as restore_amortized
            family = restore_amortized(program, config, state, FAMILIES[method], rt.generator())
            return cls._restored(program, family, model, plan, method, None, too_wide, state, rt)
        mu0 = rt.tensor(state["q.pre.mu0"])
        if mu0.shape[0] != program.dim:
            raise ValueError(f"the saved approximation has {mu0.shape[0]} unconstrained dimensions, "
                             f"the model {program.dim}")
        structure = model_structure(model, plan, program, method)
        gen = rt.generator()
        fam_cls = FAMILIES[method]
        pre = Preconditioner(mu0, rt.tensor(state["q.pre.A"]))
        family = fam_cls(pre, gen, config, structure=structure) if fam_cls.needs_structure else \
            fam_cls(pre, gen, config)
        if "q.base.pre.mu0" in state:
            family.base.pre = Preconditioner(rt.tensor(state["q.base.pre.mu0"]), rt.tensor(state["q.base.pre.A"]))
        return cls._restored(program, family, model, plan, method, structure, too_wide, state, rt)

    @classmethod
    def _restored(cls, program, family, model, plan, method, structure, too_wide, state, rt) -> "Approximation":
        from .infer.discrete import discrete_families
        gen = family.gen
        discrete = discrete_families(model, program, plan, gen)
        if list(discrete) != [str(x) for x in state["q.discrete"]]:
            raise ValueError("the saved approximation's discrete latents differ from the model's")
        for name, q in discrete.items():
            if f"q.center.{name}.c0" in state:
                q.c0, q.c_sd = rt.tensor(state[f"q.center.{name}.c0"]), rt.tensor(state[f"q.center.{name}.sd"])
        params = family.parameters() + [q.param for q in discrete.values()]
        with torch.no_grad():
            for i, p in enumerate(params):
                saved = state.get(f"q.param{i}")
                if saved is None or tuple(saved.shape) != tuple(p.shape):
                    raise ValueError(f"parameter {i} of the saved approximation does not fit the model")
                p.copy_(rt.tensor(saved))
        out = cls(program, family, discrete, plan, method, structure)
        out.too_wide = sorted(too_wide)
        return out


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


class PosteriorMethods:
    """What a `Fit` does after the fit (mixed into `ppl.infer.fit.Fit`)."""

    def __repr__(self) -> str:
        return (f"<Fit {self.model.source.path}: {self.method}, ELBO {self.elbo:.4g}, k-hat {self.khat:.2f}, "
                f"{self.verdict_label}, {_n_draws(self)} draws>")

    def draw(self, draws: Optional[int] = None, seed: Optional[int] = None) -> Dict[str, np.ndarray]:
        """More draws of the approximation: name -> (draws, *shape), constrained.  The same `seed`
        gives the same draws, also from a fit restored by `ppl.load_fit` in another process."""
        if self.q is None:
            raise RuntimeError("this fit has no approximation to draw from")
        values, _ = self.q.draw(draws or self.config.draws, seed)
        return values

    def predict(self, data=None, sets=(), *, prior: bool = False, draws: Optional[int] = None,
                seed: Optional[int] = None) -> Dict[str, np.ndarray]:
        """Replicated data for every observed node (and every deterministic node) given the posterior
        draws, or prior draws with `prior=True`; for the fitted data, or for new data (`data` as
        `PplModel.fit` takes it: files or a mapping).  -> name -> (draws, *shape)."""
        from .predict import predictive
        return predictive(self, data, sets, prior=prior, draws=draws, seed=seed)

    def encode(self, data=None, sets=()) -> Dict[str, Dict[str, np.ndarray]]:
        """The fitted encoders' q(z_n | x_n) for new rows (`data` as `predict` takes it: files or a
        mapping of column names to values; None: the fitted rows): latent -> {"mean", "sd"}, each
        (rows, *latent shape), in the latent's unconstrained space (the latent itself where it is real)."""
        from .infer.amortized import encode_data
        return encode_data(self, data, sets)

    def log_likelihood(self) -> Dict[str, np.ndarray]:
        """log p(y_i | theta_s) per observed element (unscaled), for each reported draw: name -> (draws, *obs shape)."""
        from .loo import pointwise_log_likelihood
        if self.q is not None and self.q.program.local_rows:     # it holds this process's own rows (ppl.dist)
            got = getattr(self, "_pointwise", None)
            if got is None:
                from .errors import UsageError
                raise UsageError("this fit's processes each read their own rows; the first process holds the "
                                 "pointwise log-likelihood only where fit.nc keeps it (few draws x rows)")
            return got
        return pointwise_log_likelihood(self)

    def loo(self, correct: bool = True):
        """PSIS-LOO (`ppl.loo.Loo`) of the reported draws, corrected for draws from q rather than the
        posterior (the importance ratios p/q, Magnusson et al. 2019); `correct=False`: the draws taken
        as posterior draws, as `az.loo` computes it on fit.nc."""
        from .loo import loo
        return loo(self, correct=correct)

    def save(self, out_dir: str, force: bool = False) -> None:
        """Write what `ppl fit --out DIR` writes (draws, summary, run record, fit.nc, the approximation)."""
        from .report import write_outputs
        write_outputs(self, out_dir, force, [])

    def table(self, vars=None, quantiles=None, hdi=None) -> str:
        """The printed summary (`ppl fit`'s table), with its choice of variables and columns."""
        from .report import table
        return table(self, vars=vars, quantiles=quantiles, hdi=hdi)


def _n_draws(fit) -> int:
    return next((int(v.shape[0]) for v in fit.draws.values()), 0)


def warm_start(program, config, full: bool):
    """The start of a new fit from a saved one (`init=DIR`, `--init DIR`): the saved q's mean and
    covariance over theta, as the point and whitening the family starts from (no mode search).  The
    model must have the same continuous latents (names and sizes); the data may differ."""
    from .errors import UsageError
    from .infer.laplace import Start
    from .saved import load_fit
    where = f"{config.opt('init', config.init)}"
    saved = load_fit(config.init)
    if saved.q is None:
        raise UsageError(f"{where}: the fit saved there keeps no approximation; fit it again with --out")
    old = {b.name: b for b in saved.q.program.blocks}
    for b in program.blocks:
        o = old.get(b.name)
        if o is None:
            raise UsageError(f"{where}: the saved fit has no latent '{b.name}' (it has: {', '.join(old) or 'none'})")
        if o.size != b.size or o.kind != b.kind:
            raise UsageError(f"{where}: the latent '{b.name}' has {b.size} unconstrained values here and "
                             f"{o.size} in the saved fit; a warm start needs the same sizes")
    if program.params:              # the saved point estimates of the params the two models share
        have = {k: v for k, v in (saved.params or {}).items() if k in program.params.shapes and
                tuple(np.shape(v)) == program.params.shapes[k]}
        current = program.params.values()
        current.update(have)
        program.params.load(current)
    mean, L = saved.q.moments()
    idx = torch.cat([torch.arange(old[b.name].offset, old[b.name].offset + b.size) for b in program.blocks]
                    + [torch.zeros(0, dtype=torch.long)])
    cov = (L @ L.T)[idx][:, idx]
    mu0 = mean[idx].to(dtype=program.dtype, device=program.device)
    cov = cov.to(dtype=program.dtype, device=program.device)
    A = torch.linalg.cholesky(cov) if full else torch.sqrt(torch.diagonal(cov))
    return Start(mu0, A, False, f"warm start from {config.init}")
