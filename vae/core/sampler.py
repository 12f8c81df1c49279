"""Where new images start: z from the prior p(z), or from a density fitted to the codes.

A VAE's prior samples are blurry partly because the aggregate posterior q(z) = E_x q(z|x), the
region the decoder was trained on, does not fill N(0, I): prior draws land in holes the decoder
never saw. Ex-post density estimation (Ghosh et al. 2020, "From variational to deterministic
autoencoders"; Pythae's ``GaussianMixtureSampler``) fits a Gaussian mixture to the posterior
means of the training set after training and samples z from it instead.

The densities, both fitted once by ``vae generate`` to the training set's posterior means:

- ``gmm``: a Gaussian mixture (scikit-learn's EM, in the pipeline extra);
- ``diffusion``: a small diffusion model of the codes (:mod:`vae.core.diffusion`, fitted by
  :mod:`vae.training.latent`), a far more flexible density for the same codes.

Both are stored as plain tensors in ``models/sampler.safetensors``, with the kind that
``generate.sampler`` chose and the temperature it samples at; the registered model carries the
same file and samples it with torch alone, so loading a model never needs scikit-learn. This
module ships inside every registered model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from vae.core.diffusion import LatentDiffusion

__all__ = [
    "KINDS",
    "SAMPLER_FILE",
    "GaussianMixture",
    "LatentDensity",
    "fit_gmm",
    "load_sampler",
    "save_sampler",
]

SAMPLER_FILE = "sampler.safetensors"
KINDS = ("prior", "gmm", "diffusion")
FORMAT = 2  # 1: a mixture's three tensors, unprefixed, and no temperature


class GaussianMixture:
    """sum_m weights[m] N(means[m], scale_tril[m] scale_tril[m]^T) over (D,) latent vectors.

    At temperature t a draw is mean + t L eps: each component's covariance scaled by t^2.
    """

    kind = "gmm"

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
        self.temperature = 1.0  # what sample() uses unless it is given one

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(
        self, n: int, generator: torch.Generator | None = None, temperature: float | None = None
    ) -> torch.Tensor:
        """(n, D) draws: a component per draw, then mean + t L eps. On ``generator``'s device."""
        device = generator.device if generator is not None else self.means.device
        t = self.temperature if temperature is None else temperature
        w, mu, tril = (t_.to(device) for t_ in (self.weights, self.means, self.scale_tril))
        comp = torch.multinomial(w, n, replacement=True, generator=generator)  # (n,)
        eps = torch.randn((n, self.dim, 1), generator=generator, device=device)
        return mu[comp] + t * (tril[comp] @ eps).squeeze(-1)

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


LatentDensity = GaussianMixture | LatentDiffusion


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


def save_sampler(
    path: str | Path, kind: str, fitted: dict[str, LatentDensity], temperature: float = 1.0
) -> None:
    """Write the chosen ``kind``, its temperature and every ``fitted`` density (by kind)."""
    from safetensors.torch import save_file

    if kind != "prior" and kind not in fitted:
        raise ValueError(f"save_sampler: the chosen sampler {kind!r} is not among the fitted")
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, object] = {"kind": kind, "format": FORMAT, "temperature": temperature}
    for name, density in fitted.items():
        state = density.tensors() if name == "gmm" else density.state_dict()
        tensors |= {f"{name}.{k}": v.detach().cpu().contiguous() for k, v in state.items()}
        if name == "diffusion":
            meta["diffusion"] = density.settings()
    # one metadata entry: safetensors writes several in a random order, so equal samplers
    # would give files with other bytes (and another sha256)
    save_file(tensors, str(path), metadata={"vae": json.dumps(meta, sort_keys=True)})


def load_sampler(path: str | Path) -> tuple[str, dict[str, LatentDensity]]:
    """``(kind, {kind: density})`` from :func:`save_sampler`'s file (format 1 files too); every
    density samples at the file's temperature."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = _metadata(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    kind = meta.get("kind", "prior")
    if kind not in KINDS:
        raise ValueError(f"{path}: unknown sampler kind {kind!r}; expected one of {KINDS}")
    if meta["format"] == 1:  # a mixture's tensors, unprefixed
        tensors = {f"gmm.{k}": v for k, v in tensors.items()}
    fitted: dict[str, LatentDensity] = {}
    part = {
        n: {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{n}.")}
        for n in ("gmm", "diffusion")
    }
    if {"weights", "means", "scale_tril"} <= part["gmm"].keys():
        fitted["gmm"] = GaussianMixture(**part["gmm"])
    if "diffusion" in meta:
        diffusion = LatentDiffusion(**meta["diffusion"])
        diffusion.load_state_dict(part["diffusion"], strict=True)
        fitted["diffusion"] = diffusion.eval()
    if kind != "prior" and kind not in fitted:
        raise ValueError(f"{path}: the sampler is {kind!r} but the file holds no {kind}")
    for density in fitted.values():
        density.temperature = float(meta.get("temperature", 1.0))
    return kind, fitted


def _metadata(raw: dict[str, str]) -> dict[str, Any]:
    """The file's metadata as one dict: format 2's one JSON entry, or format 1's strings."""
    if "vae" in raw:
        return json.loads(raw["vae"])
    return {"kind": raw.get("kind", "prior"), "format": json.loads(raw.get("format", "1"))}
