"""Where new images start: z from the prior N(0, I), or from a mixture fitted to the codes.

A VAE's prior samples are blurry partly because the aggregate posterior q(z) = E_x q(z|x), the
region the decoder was trained on, does not fill N(0, I): prior draws land in holes the decoder
never saw. Ex-post density estimation (Ghosh et al. 2020, "From variational to deterministic
autoencoders"; Pythae's ``GaussianMixtureSampler``) fits a Gaussian mixture to the posterior
means of the training set after training and samples z from it instead.

The mixture is fitted once by ``vae generate`` (scikit-learn's EM, in the pipeline extra) and
stored as plain tensors in ``models/sampler.safetensors``; the registered model carries the
same file and samples it with torch alone, so loading a model never needs scikit-learn. This
module ships inside every registered model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

__all__ = ["SAMPLER_FILE", "GaussianMixture", "fit_gmm", "load_sampler", "save_sampler"]

SAMPLER_FILE = "sampler.safetensors"


class GaussianMixture:
    """sum_m weights[m] N(means[m], scale_tril[m] scale_tril[m]^T) over (D,) latent vectors."""

    def __init__(
        self, weights: torch.Tensor, means: torch.Tensor, scale_tril: torch.Tensor
    ) -> None:
        m, d = means.shape
        if weights.shape != (m,) or scale_tril.shape != (m, d, d):
            raise ValueError(
                f"a mixture of {m} components in {d} dimensions needs weights ({m},) and "
                f"scale_tril ({m}, {d}, {d}); got {tuple(weights.shape)} and "
                f"{tuple(scale_tril.shape)}"
            )
        self.weights = weights.float()  # normalised where used, so a file round-trips exactly
        self.means = means.float()
        self.scale_tril = scale_tril.float()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, D) draws: a component per draw, then mean + L eps. On ``generator``'s device."""
        device = generator.device if generator is not None else self.means.device
        w, mu, tril = (t.to(device) for t in (self.weights, self.means, self.scale_tril))
        comp = torch.multinomial(w, n, replacement=True, generator=generator)  # (n,)
        eps = torch.randn((n, self.dim, 1), generator=generator, device=device)
        return mu[comp] + (tril[comp] @ eps).squeeze(-1)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log sum_m w_m N(z; mu_m, Sigma_m) for z (..., D); returns (...)."""
        diff = (z.unsqueeze(-2) - self.means).unsqueeze(-1)  # (..., M, D, 1)
        tril = self.scale_tril.expand(*diff.shape[:-2], self.dim, self.dim)
        sol = torch.linalg.solve_triangular(tril, diff, upper=False).squeeze(-1)  # (..., M, D)
        log_det = self.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # (M,)
        log_n = -0.5 * (self.dim * math.log(2 * math.pi) + sol.pow(2).sum(-1)) - log_det
        log_w = self.weights.log() - self.weights.sum().log()
        return torch.logsumexp(log_n + log_w, dim=-1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weights": self.weights, "means": self.means, "scale_tril": self.scale_tril}


def fit_gmm(z: torch.Tensor, n_components: int, seed: int) -> GaussianMixture:
    """Fit a full-covariance mixture to codes z (N, D) by EM (scikit-learn), seeded."""
    from sklearn.mixture import GaussianMixture as SkMixture

    if z.shape[0] < n_components:
        raise ValueError(
            f"generate.gmm_components: {n_components} components need at least as many "
            f"training images, got {z.shape[0]}"
        )
    sk = SkMixture(n_components, covariance_type="full", random_state=seed, reg_covar=1e-5)
    sk.fit(z.double().numpy())
    return GaussianMixture(
        torch.from_numpy(sk.weights_),
        torch.from_numpy(sk.means_),
        torch.linalg.cholesky(torch.from_numpy(sk.covariances_)),
    )


def save_sampler(path: str | Path, kind: str, gmm: GaussianMixture | None) -> None:
    """Write the chosen ``kind`` (prior | gmm) and the fitted mixture, if any, as safetensors."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in gmm.tensors().items()} if gmm else {}
    save_file(tensors, str(path), metadata={"kind": kind, "format": json.dumps(1)})


def load_sampler(path: str | Path) -> tuple[str, GaussianMixture | None]:
    """``(kind, mixture or None)`` from :func:`save_sampler`'s file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        kind = (f.metadata() or {}).get("kind", "prior")
        keys = set(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    if kind not in ("prior", "gmm"):
        raise ValueError(f"{path}: unknown sampler kind {kind!r}; expected prior or gmm")
    gmm = GaussianMixture(**tensors) if {"weights", "means", "scale_tril"} <= keys else None
    if kind == "gmm" and gmm is None:
        raise ValueError(f"{path}: the sampler is 'gmm' but the file holds no mixture")
    return kind, gmm
