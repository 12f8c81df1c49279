from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import make_grid

from tests.conftest import mlp_config
from vae.config import GenerateConfig
from vae.core.model import VAE
from vae.data.splits import Split
from vae.evaluation.generate import generate, interleave_rows, interpolate, latent_coords, pca_2d

SHAPE = (1, 8, 8)
CFG = GenerateConfig(
    n_samples=12, nrow=4, n_reconstructions=6, n_interpolations=3, interpolation_steps=5, seed=7
)
NAMES = {"samples", "samples_stochastic", "reconstructions", "interpolations", "latent_2d"}


def _model(latent_dim: int = 3, likelihood: str = "bernoulli") -> VAE:
    torch.manual_seed(0)
    cfg = mlp_config(latent_dim=latent_dim, hidden_dim=16, likelihood=likelihood)
    return VAE(cfg, image_shape=SHAPE)


def _test_split(n: int = 40) -> Split:
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(n, *SHAPE, generator=g) * 255).to(torch.uint8)
    return Split(images, torch.randint(0, 3, (n,), generator=g))


def _pixels(path: str) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _grid_size(n: int, nrow: int, side: int = 8, pad: int = 2) -> tuple[int, int]:
    """(width, height) of a torchvision grid of n images."""
    cols, rows = min(n, nrow), -(-n // nrow)
    return cols * (side + pad) + pad, rows * (side + pad) + pad


def test_generate_writes_five_pngs_of_the_expected_sizes(tmp_path: Path) -> None:
    paths = generate(_model(), _test_split(), CFG, tmp_path)
    assert set(paths) == NAMES
    sizes = {}
    for name, path in paths.items():
        assert Path(path) == tmp_path / f"{name}.png"
        with Image.open(path) as im:
            assert im.format == "PNG"
            sizes[name] = im.size
    assert sizes["samples"] == sizes["samples_stochastic"] == _grid_size(12, 4)
    assert sizes["reconstructions"] == _grid_size(2 * 8, 4)  # 6 padded to 8, then 8 more
    assert sizes["interpolations"] == _grid_size(3 * 5, 5)
    assert min(sizes["latent_2d"]) > 100
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_rerun_is_byte_identical_and_seed_matters(tmp_path: Path) -> None:
    model, test = _model(), _test_split()
    a = generate(model, test, CFG, tmp_path / "a")
    b = generate(model, test, CFG, tmp_path / "b")
    for name in NAMES:
        assert Path(a[name]).read_bytes() == Path(b[name]).read_bytes(), name
    other = GenerateConfig(**{**CFG.__dict__, "seed": 8})
    c = generate(model, test, other, tmp_path / "c")
    assert Path(a["samples"]).read_bytes() != Path(c["samples"]).read_bytes()


def test_samples_are_the_decoder_mean_and_stochastic_ones_are_drawn(tmp_path: Path) -> None:
    model = _model()
    paths = generate(model, _test_split(), CFG, tmp_path)
    gen = torch.Generator().manual_seed(CFG.seed)
    mean = model.generate(CFG.n_samples, gen, mean=True)  # z ~ N(0, I) from the same seed
    grid = make_grid(mean, nrow=CFG.nrow, padding=2).mul(255).add(0.5).clamp(0, 255)
    expected = grid.to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(_pixels(paths["samples"]), expected)
    stochastic = _pixels(paths["samples_stochastic"])
    assert not np.array_equal(stochastic, expected)
    assert set(np.unique(stochastic)) <= {0, 255}  # Bernoulli draws, not probabilities


def test_reconstructions_alternate_originals_and_decoder_means(tmp_path: Path) -> None:
    model, test = _model(), _test_split()
    paths = generate(model, test, CFG, tmp_path)
    px = _pixels(paths["reconstructions"])[:, :, 0]  # (H, W), grey
    tiles = [
        px[2 + 10 * r : 10 + 10 * r, 2 + 10 * c : 10 + 10 * c] for r in range(4) for c in range(4)
    ]
    # Every original tile (rows 0 and 2) is one of the test images, and its partner below it
    # is that image's reconstruction: the decoder mean at the posterior mean.
    x = test.images.float() / 255.0
    x_hat = model.decode(model.encode(x).mean).mean
    quantised = (x_hat * 255 + 0.5).clamp(0, 255).to(torch.uint8)[:, 0].numpy()
    originals = test.images[:, 0].numpy()
    for k in range(6):
        r, c = divmod(k, 4)
        top, bottom = tiles[8 * r + c], tiles[8 * r + 4 + c]
        matches = [i for i in range(len(test)) if np.array_equal(originals[i], top)]
        assert len(matches) == 1
        assert np.abs(quantised[matches[0]].astype(int) - bottom.astype(int)).max() <= 1
    assert not tiles[8 + 2].any() and not tiles[8 + 4 + 3].any()  # padding past image 6


@pytest.mark.parametrize(("latent_dim", "likelihood"), [(1, "bernoulli"), (2, "gaussian")])
def test_small_latents_and_gaussian_decoder(
    tmp_path: Path, latent_dim: int, likelihood: str
) -> None:
    test = _test_split(5)  # fewer images than the reconstructions and interpolations want
    paths = generate(_model(latent_dim, likelihood), test, CFG, tmp_path)
    for path in paths.values():
        _pixels(path)


def test_interpolate_is_a_straight_line() -> None:
    za, zb = torch.randn(3, 4), torch.randn(3, 4)
    z = interpolate(za, zb, 5)
    assert z.shape == (3, 5, 4)
    assert torch.equal(z[:, 0], za) and torch.allclose(z[:, -1], zb)
    assert torch.allclose(z[:, 2], (za + zb) / 2)
    assert torch.allclose(z[:, 1:] - z[:, :-1], ((zb - za) / 4).unsqueeze(1).expand(3, 4, 4))


def test_pca_2d_finds_the_axes_of_largest_variance() -> None:
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([1.0, 5.0, 0.1, 3.0])
    z = torch.randn(2000, 4, generator=g) * scales + 10.0
    coords, explained = pca_2d(z)
    assert coords.shape == (2000, 2) and explained.shape == (2,)
    assert torch.allclose(coords.mean(0), torch.zeros(2), atol=1e-4)
    from sklearn.decomposition import PCA

    ref = PCA(n_components=2).fit(z.double().numpy())
    ref_coords = torch.from_numpy(ref.transform(z.double().numpy())).float()
    assert torch.allclose(coords.abs(), ref_coords.abs(), atol=1e-3)
    assert np.allclose(explained.numpy(), ref.explained_variance_ratio_, atol=1e-5)
    # PC 1 is dimension 1 (std 5), PC 2 dimension 3 (std 3); signs make those loadings positive.
    zc = z - z.mean(0)
    assert torch.corrcoef(torch.stack([coords[:, 0], zc[:, 1]]))[0, 1] > 0.99
    assert torch.corrcoef(torch.stack([coords[:, 1], zc[:, 3]]))[0, 1] > 0.99
    with pytest.raises(ValueError):
        pca_2d(torch.randn(10, 1))


def test_latent_coords_keeps_low_dimensional_latents() -> None:
    mu = torch.randn(10, 2)
    coords, axes = latent_coords(mu)
    assert torch.equal(coords, mu) and axes == ("z_0", "z_1")
    coords, _ = latent_coords(mu[:, :1])
    assert coords.shape == (10, 2) and not coords[:, 1].any()


def test_interleave_rows_layout() -> None:
    a = torch.arange(5).float().view(5, 1, 1, 1)
    b = -torch.arange(1, 6).float().view(5, 1, 1, 1)
    out = interleave_rows(a, b, nrow=3).flatten().tolist()
    assert out == [0, 1, 2, -1, -2, -3, 3, 4, 0, -4, -5, 0]
