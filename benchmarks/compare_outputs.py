"""Are two pipeline runs the same? Compare the outputs of two `dvc repro` folders.

    python benchmarks/compare_outputs.py CLONE_A CLONE_B

Tensors of ``models/model.pt``, ``models/classifier.pt`` and ``models/sampler.safetensors`` with
``torch.equal``; every leaf of ``metrics/*.json`` except timings (keys holding ``seconds`` or
``per_second``) and the registry's ids and versions; the rows of ``plots/train.csv``
without its ``seconds`` column; the md5 of every embedding table and PNG. Prints one line per
file and exits 1 if anything differs. Run both on the same machine: the last float digits differ
between CPU kinds.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

IDS = {"run_id", "model_uri", "version", "champion_version", "previous_champion_version"}


def _tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}")


def _leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{prefix}.{i}")
    else:
        yield prefix, obj


def _timing_or_id(key: str) -> bool:
    last = key.split(".")[-1]
    return "seconds" in last or "per_second" in last or last in IDS


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def compare(a: Path, b: Path) -> list[str]:
    """One line per compared file, each starting ``same`` or ``DIFFERS``."""
    lines = []
    for name in ("models/model.pt", "models/classifier.pt", "models/sampler.safetensors"):
        if name.endswith(".safetensors"):
            ta, tb = load_file(a / name), load_file(b / name)
        else:
            ta = dict(_tensors(torch.load(a / name, weights_only=True)))
            tb = dict(_tensors(torch.load(b / name, weights_only=True)))
        ok = ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
        lines.append(f"{'same' if ok else 'DIFFERS'} {name}: {len(ta)} tensors, torch.equal")
    for path in sorted((a / "metrics").glob("*.json")):
        la = dict(_leaves(json.loads(path.read_text())))
        lb = dict(_leaves(json.loads((b / "metrics" / path.name).read_text())))
        keys = sorted(k for k in la.keys() | lb.keys() if not _timing_or_id(k))
        diff = [k for k in keys if la.get(k) != lb.get(k)]
        ok = not diff
        lines.append(
            f"{'same' if ok else 'DIFFERS'} metrics/{path.name}: {len(keys)} of {len(la)} "
            f"leaves compared (timings and ids left out){'' if ok else f'; differ: {diff}'}"
        )
    rows = [list(csv.DictReader((d / "plots" / "train.csv").open())) for d in (a, b)]
    cols = [c for c in rows[0][0] if not _timing_or_id(c)]
    ok = [[{c: r[c] for c in cols} for r in side] for side in rows]
    lines.append(
        f"{'same' if ok[0] == ok[1] else 'DIFFERS'} plots/train.csv: {len(rows[0])} rows, "
        f"{len(cols)} of {len(rows[0][0])} columns (the seconds left out)"
    )
    for pattern in ("data/embeddings/*.parquet", "reports/*.png"):
        files = sorted(p.relative_to(a) for p in a.glob(pattern))
        bad = [str(p) for p in files if not (b / p).is_file() or _md5(a / p) != _md5(b / p)]
        state = "same" if files and not bad else "DIFFERS"
        lines.append(f"{state} {pattern}: {len(files)} files, md5{'' if not bad else f' {bad}'}")
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    lines = compare(Path(argv[0]), Path(argv[1]))
    print("\n".join(lines))
    return 0 if all(line.startswith("same") for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
