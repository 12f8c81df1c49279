"""The residual encoder and decoder of ``model.arch: resnet``: shapes, init, per-sample
encoding, gradient flow and a few steps of overfitting. Tiny channels, so it runs in seconds."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from vae.core.resnet import ResNetDecoder, ResNetEncoder, _ResBlock

LATENT, CHANNELS, HIDDEN = 3, 4, 16


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tensors this small gain nothing from a second thread, and on a busy 2-core machine the
    threads' synchronisation made each training step ~100x slower (2 s instead of 15 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pair(
    shape: tuple[int, int, int], act: str = "leaky_relu"
) -> tuple[ResNetEncoder, ResNetDecoder]:
    torch.manual_seed(0)
    return (
        ResNetEncoder(shape, CHANNELS, HIDDEN, LATENT, act),
        ResNetDecoder(shape, CHANNELS, HIDDEN, LATENT, act),
    )


def _images(n: int, shape: tuple[int, int, int], seed: int = 1) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 16, 24)])
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "silu"])
def test_output_shapes(shape: tuple[int, int, int], act: str) -> None:
    enc, dec = _pair(shape, act)
    assert enc(_images(2, shape)).shape == (2, 2 * LATENT)
    assert dec(torch.randn(2, LATENT)).shape == (2, *shape)


@pytest.mark.parametrize(
    ("shape", "match"),
    [((1, 30, 28), "divisible by 4"), ((2, 28, 28), "1 or 3 image channels")],
)
def test_unsupported_shapes_name_the_arch(shape: tuple[int, int, int], match: str) -> None:
    for cls in (ResNetEncoder, ResNetDecoder):
        with pytest.raises(ValueError, match=rf"model\.arch: 'resnet' needs .*{match}"):
            cls(shape, CHANNELS, HIDDEN, LATENT, "leaky_relu")


def test_unknown_activation_names_the_key() -> None:
    with pytest.raises(ValueError, match=r"model\.activation"):
        ResNetEncoder((1, 8, 8), CHANNELS, HIDDEN, LATENT, "tanh")


def test_residual_blocks_are_the_identity_at_init() -> None:
    torch.manual_seed(0)
    block = _ResBlock(CHANNELS, "leaky_relu")
    x = torch.randn(2, CHANNELS, 5, 6)
    assert torch.equal(block(x), x)
    enc, dec = _pair((1, 8, 8))
    blocks = [m for net in (enc, dec) for m in net.modules() if isinstance(m, _ResBlock)]
    assert len(blocks) == 8  # 2 per stage, 2 stages, 2 halves
    assert all(not b.branch[-1].weight.any() and not b.branch[-1].bias.any() for b in blocks)


@pytest.mark.parametrize("train", [True, False])
def test_encoding_does_not_depend_on_the_rest_of_the_batch(train: bool) -> None:
    """The posterior mean is an embedding: one image, one code, whatever it is batched with."""
    enc, _ = _pair((3, 16, 16))
    enc.train(train)
    x = _images(4, (3, 16, 16))
    with torch.no_grad():
        together = enc(x)
        alone = torch.cat([enc(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0.0)


def test_gradients_reach_every_parameter() -> None:
    enc, dec = _pair((1, 8, 8))
    x = _images(4, (1, 8, 8))
    F.binary_cross_entropy_with_logits(dec(enc(x)[:, :LATENT]), x).backward()
    for name, p in [*enc.named_parameters(), *dec.named_parameters()]:
        assert p.grad is not None, name
    # A zero-initialised conv still learns: its gradient is act(conv(act(x))) times the
    # upstream gradient, not zero (the branch's first conv gets zero until it has grown).
    for net in (enc, dec):
        last = next(m for m in net.modules() if isinstance(m, _ResBlock)).branch[-1]
        assert last.weight.grad.abs().sum() > 0


def test_a_few_adam_steps_lower_the_reconstruction_loss() -> None:
    shape = (1, 8, 8)
    enc, dec = _pair(shape)
    x = torch.zeros(8, *shape)
    x[torch.arange(8), 0, torch.arange(8)] = 1.0  # image i lights row i: 8 distinct images
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=3e-3)
    losses = []
    for _ in range(20):
        # Reconstruct through the posterior mean: a deterministic autoencoder on 8 images.
        loss = F.binary_cross_entropy_with_logits(dec(enc(x)[:, :LATENT]), x, reduction="sum") / 8
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # ~45 -> ~27 nats (seeds 0-2); 20 steps reach about the pixel marginals (24 nats), not yet
    # one code per image, so this checks that training works, not how well.
    assert losses[-1] < 0.75 * losses[0]
