"""Typed, frozen configuration: one dataclass per section of ``params.yaml``.

The defaults here are the shipped ``params.yaml`` (a test checks they agree). :mod:`vae.params`
reads and validates the file into these objects; library functions take them and never read
``params.yaml``. This module imports only the standard library: it ships inside every
registered model, where ``ModelConfig`` rebuilds the network.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from vae.errors import UsageError

__all__ = [
    "MAX_IMAGE_PIXELS",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvaluateConfig",
    "ExportConfig",
    "GenerateConfig",
    "MlflowConfig",
    "ModelConfig",
    "ScheduleConfig",
    "TrainConfig",
]


class ConfigError(UsageError, ValueError):
    """A configuration problem, described in one line that names the key."""


def _range(
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> dict[str, float | None]:
    return {"ge": ge, "gt": gt, "le": le, "lt": lt}


# The most pixels an image a user hands in may declare (4096 x 4096): well above any image a
# model here takes, far below what exhausts memory. `data.max_image_pixels`, `--max-pixels`.
MAX_IMAGE_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["fashion_mnist", "mnist", "folder"] = "fashion_mnist"
    # The raw data, one folder: the four IDX files (fashion_mnist, mnist), or same-sized images
    # with one sub-folder per class (folder). DVC hashes it; `vae ingest` copies it to data/raw.
    source: str = "/usr/share/datasets/fashion-mnist"
    val_fraction: float = field(default=0.1, metadata=_range(gt=0.0, lt=1.0))
    # dynamic: resample x ~ Bernoulli(pixel) every time a batch is drawn; static: sample once in
    # `prepare`; none: keep grayscale intensities in [0, 1].
    binarize: Literal["dynamic", "static", "none"] = "dynamic"
    seed: int = field(default=0, metadata=_range(ge=0))
    # The most pixels (width x height) an image of a folder source may declare in its header;
    # a larger one is refused before it is decoded (a small file can decode to gigabytes).
    max_image_pixels: int = field(default=MAX_IMAGE_PIXELS, metadata=_range(ge=1))


# What a saved model meant by a key that did not exist when it was saved.
_BEFORE_THE_KEY = {
    "activation": "relu",
    "hidden_layers": 1,
    "prior": "standard",
    "latent_layers": 1,
    "lower_inference": "shared",
    "mean_bound": 0.0,
}


@dataclass(frozen=True)
class ModelConfig:
    # gated_mlp: each hidden layer is (W x) * sigmoid(V x), as in the VampPrior paper's MLPs;
    # resnet: residual conv encoder/decoder (vae/core/resnet.py), conv_channels wide, H, W % 4 == 0;
    # gated_conv: the gated convolutions of the paper's ConvHVAE (vae/core/gated_conv.py).
    arch: Literal["mlp", "gated_mlp", "conv", "resnet", "gated_conv"] = "gated_mlp"
    latent_dim: int = field(default=40, metadata=_range(ge=1, le=4096))
    hidden_dim: int = field(default=300, metadata=_range(ge=1, le=65536))
    hidden_layers: int = field(default=2, metadata=_range(ge=1, le=16))  # mlp and gated_mlp
    conv_channels: int = field(default=32, metadata=_range(ge=1, le=1024))
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"
    # Gaussian decoder only: one learned log-variance per pixel, or one shared by all pixels.
    gaussian_variance: Literal["per_pixel", "shared"] = "per_pixel"
    # The hidden layers' nonlinearity; leaky_relu has a negative slope of 0.1. With plain relu,
    # most encoder units stop firing for every image within a few epochs, and a dead unit never
    # learns again (benchmarks/README.md, "Figures behind the code's choices").
    activation: Literal["relu", "leaky_relu", "silu"] = "leaky_relu"
    # p(z): standard is N(0, I); vamp is the VampPrior, a mixture of the posteriors of
    # `pseudo_inputs` learned images (its KL is estimated by Monte Carlo).
    prior: Literal["standard", "vamp"] = "vamp"
    pseudo_inputs: int = field(default=100, metadata=_range(ge=1, le=100000))
    # 2: a second stochastic layer, top-down (vae/core/hierarchy.py); z is then [z1, z2], each
    # latent_dim wide.
    latent_layers: int = field(default=1, metadata=_range(ge=1, le=2))
    # Two layers: what q(z1 | x, z2) reads of x. branch: x through a hidden layer of its own, and
    # p(z1|z2) two hidden layers (the VampPrior paper's HVAE); shared: the encoder's last hidden
    # features, one hidden layer each (the first design, whose z1 collapsed; models saved before
    # the key).
    lower_inference: Literal["branch", "shared"] = "branch"
    # A soft bound B on the mean of every Gaussian of q(z|x) and p(z1|z2): B * tanh(mean / B),
    # near the identity well inside B (0 = off). In the hvae preset one image's q(z2|x) mean
    # reached 46 and the lower conditionals extrapolated to means of thousands (docs/models.md).
    mean_bound: float = field(default=0.0, metadata=_range(ge=0.0, le=1e6))

    @property
    def code_dim(self) -> int:
        """The width of a code z: ``latent_dim`` per stochastic layer."""
        return self.latent_dim * self.latent_layers

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> ModelConfig:
        """The config of a saved model; keys added since it was saved keep their old meaning
        (the model they describe), whatever the defaults of new models are now."""
        merged = {**_BEFORE_THE_KEY, **saved}
        if merged["latent_layers"] == 1:  # the key means nothing for one layer
            merged["lower_inference"] = "branch"
        return cls(**merged)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = field(default=70, metadata=_range(ge=1, le=100000))
    batch_size: int = field(default=256, metadata=_range(ge=1))
    lr: float = field(default=3e-3, metadata=_range(gt=0.0, le=10.0))
    # The fraction of the run's last steps over which the lr falls (half-cosine) from `lr` to 0;
    # 0 = constant lr, 1 = cosine over the whole run. Above 0, the schedule is laid out over
    # `epochs`, so a checkpoint is resumed only with the same `epochs`.
    lr_decay: float = field(default=0.2, metadata=_range(ge=0.0, le=1.0))
    beta: float = field(default=1.0, metadata=_range(ge=0.0))
    # The KL weight rises linearly from 0 to `beta` over this many optimiser steps (0 = off).
    # Units that the full KL switches off early rarely come back; the warm-up keeps more of them.
    kl_warmup_steps: int = field(default=4000, metadata=_range(ge=0))
    # Free bits, nats per latent dimension (0 = off): a number for every layer, or a list with
    # one per stochastic layer, bottom (z1) first. With N(0, I) and one layer each dimension's
    # batch-mean KL is floored; otherwise (VampPrior, two layers) each layer's batch-mean KL
    # is floored at its value times latent_dim.
    free_bits: float | tuple[float, ...] = field(default=0.0, metadata=_range(ge=0.0))
    # The max gradient norm (0 = off); typical norms are 20-80, so 200 only catches spikes.
    grad_clip: float = field(default=200.0, metadata=_range(ge=0.0))
    # Skip the step (the optimiser's and the EMA's) of a batch whose gradient norm before
    # clipping is above this, or not finite (0 = off), as VDVAE does: one training image that
    # q(z2|x) maps far outside the prior's reach gives p(z1|z2) nonsense there and a KL of 1e10
    # nats, and its clipped gradient still kicks Adam at every epoch (docs/models.md).
    skip_grad_norm: float = field(default=0.0, metadata=_range(ge=0.0))
    # elbo: minimise -ELBO; iwae: minimise -L_K, the importance-weighted bound with K = iw_k.
    objective: Literal["elbo", "iwae"] = "elbo"
    iw_k: int = field(default=5, metadata=_range(ge=1, le=10000))
    # An exponential moving average of the weights (0 = off), validated, kept and registered.
    ema_decay: float = field(default=0.999, metadata=_range(ge=0.0, lt=1.0))
    seed: int = field(default=0, metadata=_range(ge=0))
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    num_threads: int = field(default=0, metadata=_range(ge=0, le=1024))
    # Past one process (docs/gpu.md): above 1 x 1, `vae train` launches torchrun itself, with a
    # c10d rendezvous at rdzv_endpoint (HOST:PORT of the node that runs `vae train`; every other
    # node runs `vae train --join` in its own clone). They change how, not what, it trains.
    nnodes: int = field(default=1, metadata=_range(ge=1, le=4096))
    nproc_per_node: int = field(default=1, metadata=_range(ge=1, le=1024))
    rdzv_endpoint: str = "127.0.0.1:29400"

    def free_bits_per_layer(self, layers: int) -> tuple[float, ...]:
        """``free_bits`` as one value per stochastic layer, bottom first."""
        fb = self.free_bits
        return tuple(fb) if isinstance(fb, tuple) else (fb,) * layers


@dataclass(frozen=True)
class EvaluateConfig:
    iw_samples: int = field(default=500, metadata=_range(ge=1, le=1000000))
    # Images per chunk; each chunk holds batch_size * iw_samples latent samples at once.
    batch_size: int = field(default=100, metadata=_range(ge=1))
    active_unit_threshold: float = field(default=0.01, metadata=_range(gt=0.0))
    seed: int = field(default=0, metadata=_range(ge=0))
    # 0: the whole test split; N: its first N images, a fixed subset for a costly K (eval.json
    # says how many in n_images, and the registry compares only like with like).
    max_images: int = field(default=0, metadata=_range(ge=0))


@dataclass(frozen=True)
class ExportConfig:
    batch_size: int = field(default=1000, metadata=_range(ge=1))
    knn_k: int = field(default=5, metadata=_range(ge=1))
    probe_max_iter: int = field(default=1000, metadata=_range(ge=1))
    seed: int = field(default=0, metadata=_range(ge=0))  # the pixel baseline's binarization


@dataclass(frozen=True)
class GenerateConfig:
    n_samples: int = field(default=64, metadata=_range(ge=1, le=10000))
    nrow: int = field(default=8, metadata=_range(ge=1, le=1000))
    n_reconstructions: int = field(default=16, metadata=_range(ge=1, le=10000))
    n_interpolations: int = field(default=8, metadata=_range(ge=1, le=1000))
    interpolation_steps: int = field(default=10, metadata=_range(ge=2, le=1000))
    # Where new images start (the registered model samples the same): the prior p(z), or a
    # density fitted to the training set's posterior means after training (vae.core.sampler):
    # a mixture of gmm_components Gaussians, or a small diffusion model. Both are fitted.
    sampler: Literal["prior", "gmm", "diffusion"] = "diffusion"
    # gmm and diffusion draw at this temperature (the starting noise, or each component's std,
    # times t); below 1 trades diversity (recall) for fidelity (precision): `vae score` measures.
    temperature: float = field(default=1.2, metadata=_range(gt=0.0, le=10.0))
    gmm_components: int = field(default=10, metadata=_range(ge=1, le=1000))
    diffusion_hidden: int = field(default=256, metadata=_range(ge=8, le=8192))
    diffusion_blocks: int = field(default=3, metadata=_range(ge=1, le=64))  # residual MLP blocks
    diffusion_epochs: int = field(default=30, metadata=_range(ge=1, le=10000))
    diffusion_lr: float = field(default=1e-3, metadata=_range(gt=0.0, le=1.0))
    diffusion_steps: int = field(default=50, metadata=_range(ge=1, le=1000))  # DDIM steps a draw
    seed: int = field(default=0, metadata=_range(ge=0))


@dataclass(frozen=True)
class ScoreConfig:
    # Sample quality in the features of a small CNN classifier: Frechet distance and
    # precision/recall against the test images. auto: on fashion_mnist, the network shipped in
    # vae/evaluation/ (fixed, so distances compare across clones and machines); on other data,
    # one trained by `vae classify` with the classifier_* settings (train: always that).
    feature_net: Literal["auto", "train"] = "auto"
    n_samples: int = field(default=10000, metadata=_range(ge=10, le=1000000))  # per set
    neighbours: int = field(default=3, metadata=_range(ge=1, le=100))  # k of precision/recall
    # The chosen sampler (generate.sampler) and the prior are also scored at these.
    temperatures: tuple[float, ...] = field(
        default=(0.9, 1.1, 1.2), metadata=_range(gt=0.0, le=10.0)
    )
    classifier_epochs: int = field(default=5, metadata=_range(ge=1, le=1000))
    classifier_batch_size: int = field(default=128, metadata=_range(ge=1))
    classifier_lr: float = field(default=1e-3, metadata=_range(gt=0.0, le=10.0))
    classifier_features: int = field(default=128, metadata=_range(ge=2, le=65536))
    seed: int = field(default=0, metadata=_range(ge=0))


@dataclass(frozen=True)
class MlflowConfig:
    # Track every pipeline run (MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the project).
    enabled: bool = True
    experiment: str = "vae-fashion-mnist"
    registered_model: str = "vae-fashion-mnist"
    # A DVC experiment (`dvc exp run`, queued or --temp) logs its run and model but registers
    # no model version unless this is true; `dvc repro` always registers.
    register_experiments: bool = False
    # Every this many epochs, and at the last, training logs two small image grids with the
    # epoch as their step (the MLflow UI's slider): decoder means of fixed prior draws, and
    # reconstructions of fixed validation images. 0 = none.
    image_every: int = field(default=5, metadata=_range(ge=0, le=100000))


@dataclass(frozen=True)
class ScheduleConfig:
    # When the Prefect flow `vae-retrain` runs (pipelines/serve.py, prefect.yaml): a 5-field cron
    # expression (minute hour day-of-month month day-of-week) in an IANA time zone.
    cron: str = "0 3 * * 1"
    timezone: str = "UTC"
    # The longest any one flow task (a DVC stage, an experiment) may run; then its whole
    # process group is killed and the flow run fails. Also how long a flow run waits for
    # another one in the same workspace to finish.
    timeout_minutes: float = field(default=180.0, metadata=_range(gt=0.0, le=10080.0))

    @property
    def timeout_seconds(self) -> float:
        return self.timeout_minutes * 60.0


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"train.lr": 0.001, ...}``: the form MLflow logs as params."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}
