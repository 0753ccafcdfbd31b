"""A hand-written, plain-torch ADVI loop: the floor a torch backend could reach.

    python bench/systems/torch_loop.py MODEL DATA_DIR STEPS SEED meanfield|fullrank
        [--mc-samples S] [--lr X] [--draws D] [--checkpoints ...] [--init cold|laplace] [--average F]

Each model's log density is written directly in torch on an unconstrained
vector (the same transforms as ppl: exp for positive, stick-breaking for the
simplex, y1=x1, y2=y1+exp(x2) for ordered), in float64 like ppl, vectorised
over S Monte Carlo samples.  Families: mean-field (loc, log sd) or full-rank
(loc, lower-triangular L with exp'd diagonal).  Adam (written out here:
torch.optim's first Adam imports torch._dynamo, ~2 s of start-up a backend
need not pay) with ppl's schedule lr_t = lr / sqrt(1 + t/100); S samples per
step; no per-step checks or syncs.

`--init laplace --average 0.5` (mode by L-BFGS, Hessian, then iterate
averaging over the last half) is what the driver uses for the long reference
runs; the default (cold start: loc 0, sd 0.1) is the plain ADVI loop.
"""
from __future__ import annotations

import math

from common import Checkpoints, Phases, emit, parse_args, summarise  # noqa: E402  (also sets T_START)

args = parse_args("torch_loop", default_lr=0.05, default_S=16)
ph = Phases()

import torch  # noqa: E402

import data as bench_data  # noqa: E402

ph.mark("startup+imports")
torch.manual_seed(args.seed)
DT = torch.float64
LOG2PI = math.log(2 * math.pi)


def normal_lp(x, m, s):
    z = (x - m) / s
    return -0.5 * z * z - (torch.log(s) if torch.is_tensor(s) else math.log(s)) - 0.5 * LOG2PI


def half_normal_lp(x, s):
    return normal_lp(x, 0.0, s) + math.log(2.0)


# ---- the models: dim, log_density(theta (S, dim)) -> (S,), constrain(theta) -> {name: (S, *shape)} ----------
class EightSchools:
    def __init__(self, d):
        self.y = torch.as_tensor(d["y"], dtype=DT)
        self.sigma = torch.as_tensor(d["sigma"], dtype=DT)
        self.J = len(d["y"])
        self.dim = 2 + self.J                      # mu, log tau, theta_raw[J]

    def log_density(self, th):
        mu, ltau, raw = th[:, 0], th[:, 1], th[:, 2:]
        tau = torch.exp(ltau)
        lp = normal_lp(mu, 0.0, 5.0)
        lp = lp + math.log(2 / math.pi / 5) - torch.log1p((tau / 5) ** 2) + ltau      # half_cauchy(5) + log|J|
        lp = lp + normal_lp(raw, 0.0, 1.0).sum(-1)
        theta = mu[:, None] + tau[:, None] * raw
        return lp + normal_lp(self.y, theta, self.sigma).sum(-1)

    def constrain(self, th):
        mu, tau, raw = th[:, 0], torch.exp(th[:, 1]), th[:, 2:]
        return {"mu": mu, "tau": tau, "theta_raw": raw, "theta": mu[:, None] + tau[:, None] * raw}


class Logistic:
    def __init__(self, d):
        self.X = torch.as_tensor(d["X"], dtype=DT).contiguous()
        self.y = torch.as_tensor(d["y"], dtype=DT)
        self.D = self.X.shape[1]
        self.dim = 1 + self.D

    def log_density(self, th):
        alpha, beta = th[:, 0], th[:, 1:]
        eta = alpha[:, None] + beta @ self.X.T                          # (S, N)
        lik = (self.y * eta - torch.nn.functional.softplus(eta)).sum(-1)
        return normal_lp(alpha, 0.0, 2.5) + normal_lp(beta, 0.0, 2.5).sum(-1) + lik

    def constrain(self, th):
        return {"alpha": th[:, 0], "beta": th[:, 1:]}


class Radon:
    def __init__(self, d):
        self.y = torch.as_tensor(d["log_radon"], dtype=DT)
        self.floor = torch.as_tensor(d["floor"], dtype=DT)
        self.county = torch.as_tensor(d["county"], dtype=torch.long)
        self.K = int(d["K"])
        self.dim = self.K + 4                       # mu_a, log sigma_a, a[K], b, log sigma_y

    def log_density(self, th):
        K = self.K
        mu_a, lsa, a, b, lsy = th[:, 0], th[:, 1], th[:, 2:2 + K], th[:, 2 + K], th[:, 3 + K]
        sa, sy = torch.exp(lsa), torch.exp(lsy)
        lp = normal_lp(mu_a, 0.0, 10.0) + half_normal_lp(sa, 5.0) + lsa + half_normal_lp(sy, 5.0) + lsy
        lp = lp + normal_lp(b, 0.0, 10.0)
        lp = lp + normal_lp(a, mu_a[:, None], sa[:, None]).sum(-1)
        # gather with an expanded (copy-free) index: a[:, county] is several times slower, both ways
        m = torch.gather(a, 1, self.county.expand(a.shape[0], -1)) + b[:, None] * self.floor
        return lp + normal_lp(self.y, m, sy[:, None]).sum(-1)

    def constrain(self, th):
        K = self.K
        return {"mu_a": th[:, 0], "sigma_a": torch.exp(th[:, 1]), "a": th[:, 2:2 + K], "b": th[:, 2 + K],
                "sigma_y": torch.exp(th[:, 3 + K])}


class LinReg:
    def __init__(self, d):
        self.X = torch.as_tensor(d["X"], dtype=DT).contiguous()
        self.y = torch.as_tensor(d["y"], dtype=DT)
        self.D = self.X.shape[1]
        self.dim = self.D + 2                       # alpha, beta[D], log sigma

    def log_density(self, th):
        alpha, beta, ls = th[:, 0], th[:, 1:1 + self.D], th[:, 1 + self.D]
        sigma = torch.exp(ls)
        lp = normal_lp(alpha, 0.0, 10.0) + normal_lp(beta, 0.0, 10.0).sum(-1) + half_normal_lp(sigma, 5.0) + ls
        mean = alpha[:, None] + beta @ self.X.T                          # (S, N)
        return lp + normal_lp(self.y, mean, sigma[:, None]).sum(-1)

    def constrain(self, th):
        return {"alpha": th[:, 0], "beta": th[:, 1:1 + self.D], "sigma": torch.exp(th[:, 1 + self.D])}


class Mixture:
    """w ~ dirichlet(1,1) (stick-breaking), mu ordered ~ normal(0,10), sigma ~ half_normal(2); z summed out."""

    def __init__(self, d):
        self.y = torch.as_tensor(d["y"], dtype=DT)
        self.dim = 5                                # w (1), mu (2), log sigma (2)

    def _w(self, u):
        w1 = torch.sigmoid(u)
        return torch.stack([w1, 1 - w1], -1), torch.nn.functional.logsigmoid(u) + torch.nn.functional.logsigmoid(-u)

    def log_density(self, th):
        w, ljw = self._w(th[:, 0])                  # dirichlet(1, 1) density is constant (log Gamma(2) = 0)
        mu = torch.stack([th[:, 1], th[:, 1] + torch.exp(th[:, 2])], -1)
        ls = th[:, 3:5]
        sigma = torch.exp(ls)
        lp = ljw + th[:, 2] + normal_lp(mu, 0.0, 10.0).sum(-1) + (half_normal_lp(sigma, 2.0) + ls).sum(-1)
        comp = torch.log(w)[:, None, :] + normal_lp(self.y[None, :, None], mu[:, None, :], sigma[:, None, :])
        return lp + torch.logsumexp(comp, -1).sum(-1)

    def constrain(self, th):
        w, _ = self._w(th[:, 0])
        return {"w": w, "mu": torch.stack([th[:, 1], th[:, 1] + torch.exp(th[:, 2])], -1),
                "sigma": torch.exp(th[:, 3:5])}


def make_model(name, d):
    if name == "eight_schools":
        return EightSchools(d)
    if name == "logistic":
        return Logistic(d)
    if name == "radon":
        return Radon(d)
    if name == "mixture":
        return Mixture(d)
    return LinReg(d)


# ---- families -------------------------------------------------------------------------------------------------
class MeanField:
    def __init__(self, loc, sd):
        self.loc = loc.clone().requires_grad_()
        self.log_sd = torch.log(sd).clone().requires_grad_()

    def params(self):
        return [self.loc, self.log_sd]

    def sample(self, S, gen):
        eps = torch.randn(S, self.loc.numel(), dtype=DT, generator=gen)
        return self.loc + eps * torch.exp(self.log_sd)

    def entropy(self):
        return self.log_sd.sum()


class FullRank:
    def __init__(self, loc, L):
        self.loc = loc.clone().requires_grad_()
        self.log_diag = torch.log(torch.diagonal(L)).clone().requires_grad_()
        self.off = torch.tril(L, -1).clone().requires_grad_()

    def params(self):
        return [self.loc, self.log_diag, self.off]

    def L(self):
        return torch.tril(self.off, -1) + torch.diag(torch.exp(self.log_diag))

    def sample(self, S, gen):
        eps = torch.randn(S, self.loc.numel(), dtype=DT, generator=gen)
        return self.loc + eps @ self.L().T

    def entropy(self):
        return self.log_diag.sum()


class Adam:
    """Plain Adam (Kingma & Ba), the same update as torch.optim.Adam's defaults."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.lr, (self.b1, self.b2), self.eps = params, lr, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self):
        self.t += 1
        c1, c2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for p, m, v in zip(self.params, self.m, self.v):
            g = p.grad
            m.mul_(self.b1).add_(g, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            p.addcdiv_(m, v.div(c2).sqrt_().add_(self.eps), value=-self.lr / c1)

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def laplace_start(model):
    """Mode of the unconstrained log density (L-BFGS) and the Cholesky factor of the inverse Hessian."""
    x = torch.zeros(model.dim, dtype=DT, requires_grad=True)
    opt = torch.optim.LBFGS([x], lr=1, max_iter=1000, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -model.log_density(x[None])[0]
        loss.backward()
        return loss
    for _ in range(3):
        opt.step(closure)
    x = x.detach()
    H = -torch.autograd.functional.hessian(lambda v: model.log_density(v[None])[0], x)
    cov = torch.linalg.inv(H)
    return x, torch.linalg.cholesky(0.5 * (cov + cov.T)), 1 / torch.sqrt(torch.diagonal(H))


def main():
    with ph("data"):
        d = bench_data.arrays(args.model)
    with ph("build"):
        model = make_model(args.model, d)
    with ph("init"):
        if args.init == "laplace":
            loc, L, cond_sd = laplace_start(model)
        else:
            loc, L, cond_sd = (torch.zeros(model.dim, dtype=DT), 0.1 * torch.eye(model.dim, dtype=DT),
                               torch.full((model.dim,), 0.1, dtype=DT))
        fam = MeanField(loc, cond_sd) if args.family == "meanfield" else FullRank(loc, L)
        params = fam.params()
        opt = Adam(params, lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    draw_gen = torch.Generator().manual_seed(10_000 + args.seed)   # draws never touch the fit's stream

    def summary():
        with torch.no_grad():
            th = fam.sample(args.draws, draw_gen)
            return summarise({k: v.numpy() for k, v in model.constrain(th).items()})

    cps = Checkpoints(args)
    avg_from = int(args.steps * (1 - args.average)) if args.average > 0 else None
    avg, n_avg = [torch.zeros_like(p) for p in params], 0
    S = args.mc_samples
    with ph("fit"):
        for t in range(args.steps):
            opt.lr = args.lr / math.sqrt(1.0 + t / 100.0)
            opt.zero_grad()
            elbo = model.log_density(fam.sample(S, gen)).mean() + fam.entropy()
            (-elbo).backward()
            opt.step()
            if avg_from is not None and t >= avg_from:
                n_avg += 1
                with torch.no_grad():
                    for a, p in zip(avg, params):
                        a.add_(p.detach() - a, alpha=1.0 / n_avg)
            if (t + 1) in cps:
                ph.mark("fit")
                stop = cps.record(t + 1, summary())
                ph.mark("checkpoints")
                if stop:
                    break
    if n_avg:
        with torch.no_grad():
            for a, p in zip(avg, params):
                p.copy_(a)
    with ph("summarise"):
        out = summary()
    emit(args, "torch_loop", out, ph, cps, dim=model.dim, init=args.init)


main()
