"""Multiply-adds per image of each preset's model: one training step's forward pass (encode, the
prior's pseudo-inputs amortised over the batch, decode) and one decoder pass, counted by
``torch.utils.flop_counter`` on the meta device (shapes only, nothing computed). No data and no
training: it runs in seconds::

    python benchmarks/flops.py                 # every preset, and the default (params.yaml)
    python benchmarks/flops.py conv-hvae hvae  # some of them
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vae.core.model import VAE  # noqa: E402
from vae.params import parse_params  # noqa: E402
from vae.presets import apply_preset, load_presets  # noqa: E402

BATCH = 256


def _count(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def macs_per_image(overrides: dict) -> tuple[float, float, int]:
    """(forward MACs, decoder MACs, parameters) per image of the model ``overrides`` make."""
    raw = apply_preset(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides)
    with torch.device("meta"):  # shapes only: nothing is computed, so it takes no time
        model = VAE(parse_params(raw).model, (1, 28, 28)).eval()
        x, z = torch.empty(BATCH, 1, 28, 28), torch.empty(BATCH, model.code_dim)
        forward = _count(lambda: model(x, eps=z))
        decode = _count(lambda: model.decode(z))
    params = sum(p.numel() for p in model.parameters())
    return forward / 2 / BATCH, decode / 2 / BATCH, params  # FLOPs count a MAC as 2


def main(argv: list[str]) -> int:
    presets = load_presets(ROOT / "presets.yaml")
    names = argv or ["default", *presets]
    print("| preset | parameters | forward MACs / image | decoder MACs / image |")
    print("| --- | --- | --- | --- |")
    for name in names:
        fwd, dec, params = macs_per_image({} if name == "default" else presets[name])
        print(f"| {name} | {params / 1e6:.2f} M | {fwd / 1e6:,.1f} M | {dec / 1e6:,.1f} M |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
