"""The NumPyro models of the bench (the same models as models/*.ppl), for NUTS (nuts_models.py) and
SVI (numpyro_svi.py): one definition each."""
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints


def eight_schools(y, sigma):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("J", y.shape[0]):
        theta_raw = numpyro.sample("theta_raw", dist.Normal(0.0, 1.0))
        theta = mu + tau * theta_raw
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def logistic(X, y):
    alpha = numpyro.sample("alpha", dist.Normal(0.0, 2.5))
    beta = numpyro.sample("beta", dist.Normal(0.0, 2.5).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("N", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=alpha + X @ beta), obs=y)


def radon(log_radon, floor, county, K):
    mu_a = numpyro.sample("mu_a", dist.Normal(0.0, 10.0))
    sigma_a = numpyro.sample("sigma_a", dist.HalfNormal(5.0))
    with numpyro.plate("K", K):
        a = numpyro.sample("a", dist.Normal(mu_a, sigma_a))
    b = numpyro.sample("b", dist.Normal(0.0, 10.0))
    sigma_y = numpyro.sample("sigma_y", dist.HalfNormal(5.0))
    with numpyro.plate("N", log_radon.shape[0]):
        numpyro.sample("log_radon", dist.Normal(a[county] + b * floor, sigma_y), obs=log_radon)


def linreg(X, y):
    alpha = numpyro.sample("alpha", dist.Normal(0.0, 10.0))
    beta = numpyro.sample("beta", dist.Normal(0.0, 10.0).expand([X.shape[1]]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(5.0))
    with numpyro.plate("N", X.shape[0]):
        numpyro.sample("y", dist.Normal(alpha + X @ beta, sigma), obs=y)


def poisson(deaths, exposure, age):
    a = numpyro.sample("a", dist.Normal(0.0, 5.0))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    with numpyro.plate("N", deaths.shape[0]):
        numpyro.sample("deaths", dist.Poisson(rate=jnp.exp(jnp.log(exposure) + a + b * age)), obs=deaths)


def mixture(y):
    w = numpyro.sample("w", dist.Dirichlet(jnp.ones(2)))
    mu = numpyro.sample("mu", dist.ImproperUniform(constraints.ordered_vector, (), (2,)))
    numpyro.factor("mu_prior", dist.Normal(0.0, 10.0).log_prob(mu).sum())
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0).expand([2]).to_event(1))
    with numpyro.plate("N", y.shape[0]):
        numpyro.sample("y", dist.MixtureSameFamily(dist.Categorical(probs=w), dist.Normal(mu, sigma)), obs=y)
