"""The model card: one self-contained HTML page per registered version, read in the MLflow UI.

MLflow's artifact view shows HTML in a sandboxed frame from a blob URL, so the page fetches
nothing: its styles are inline and every picture is a ``data:`` URI. Everything on it comes from
the pipeline's files (``metrics/*.json``, ``reports/*.png``, ``plots/train.csv``, the prepared
data's manifest) and the registry's tags of the versions it is compared with: no number is
written here by hand. :func:`card_facts` reads them; :func:`render_card` is pure.
"""

from __future__ import annotations

import base64
import csv
import html
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vae.atomic import load_json
from vae.core.model import VAE
from vae.evaluation.summary import headline_set

__all__ = ["CARD_METRICS", "CardFacts", "card_facts", "card_tags", "render_card"]

# (key, label, digits, lower is better): the table's rows, the tags every version carries.
CARD_METRICS = (
    ("nll_iw", "&minus;log p(x), importance-weighted (nats)", 2, True),
    ("elbo", "ELBO (nats)", 2, False),
    ("elbo_gap", "gap: &minus;ELBO &minus; (&minus;log p(x))", 2, True),
    ("kl", "KL(q || p) (nats)", 2, None),
    ("active_units", "active units", 0, False),
    ("fid", "Fréchet distance of samples", 1, True),
    ("precision", "precision of samples", 3, False),
    ("recall", "recall of samples", 3, False),
    ("knn_accuracy", "5-NN accuracy of the codes", 3, False),
    ("linear_probe_accuracy", "linear probe accuracy of the codes", 3, False),
)
PICTURES = (
    ("samples", "Samples: decoder means of draws from the sampler"),
    ("reconstructions", "Test images (odd rows) and their reconstructions (even rows)"),
    ("interpolations", "Interpolations between the codes of test images"),
    ("latent_2d", "The test codes, two principal directions, by class"),
)


@dataclass(frozen=True)
class CardFacts:
    """What the card shows, read from the pipeline's files and the registry."""

    name: str
    version: int
    run_id: str
    model: dict[str, Any]  # family, arch, code size, prior, decoder, parameters
    data: dict[str, Any]  # dataset, source, DVC hashes, image counts
    metrics: dict[str, float | None]  # CARD_METRICS of this version
    quality: dict[str, Any]  # the sets the blur is measured by (fid of samples, recon, real)
    decision: dict[str, Any]  # metrics/registry.json
    others: dict[str, dict[str, str]] = field(default_factory=dict)  # column -> version tags
    pictures: dict[str, bytes] = field(default_factory=dict)  # name -> PNG
    extra: dict[str, Any] = field(default_factory=dict)  # iw_samples, sampler, temperature


def card_tags(metrics_dir: Path) -> dict[str, str]:
    """The card's sample and embedding metrics as version tags (``fid``, ``precision``, ...), so a
    later card can compare with this version; the test metrics are tagged already."""
    tags: dict[str, str] = {}
    if (q := metrics_dir / "quality.json").is_file():
        quality = load_json(q)
        if head := quality.get("sets", {}).get(headline_set(quality)):
            tags |= {k: str(head[k]) for k in ("fid", "precision", "recall")}
    if (d := metrics_dir / "downstream.json").is_file():
        down = load_json(d)
        tags |= {k: str(down[k]) for k in ("knn_accuracy", "linear_probe_accuracy") if down.get(k)}
    return tags


def card_facts(
    model: VAE,
    decision: dict[str, Any],
    folders: Mapping[str, Path],
    manifest: dict[str, Any],
    data_tags: dict[str, str],
    source: str,
    others: dict[str, dict[str, str]],
) -> CardFacts:
    """Read what the card shows from the pipeline's folders (``metrics``, ``reports``,
    ``plots``), the prepared data's manifest and DVC's hashes (``data_tags``)."""
    metrics_dir = folders["metrics"]
    ev = _json(metrics_dir / "eval.json")
    quality = _json(metrics_dir / "quality.json")
    tags = {**{k: str(v) for k, v in ev.items() if v is not None}, **card_tags(metrics_dir)}
    c = model.cfg
    sets = quality.get("sets", {})
    pictures = {
        n: p.read_bytes() for n, _ in PICTURES if (p := folders["reports"] / f"{n}.png").is_file()
    }
    if (history := folders["plots"] / "train.csv").is_file():
        pictures["curves"] = training_curves(history)
    return CardFacts(
        name=decision["name"],
        version=int(decision["version"]),
        run_id=decision["run_id"],
        model={
            "family": "variational autoencoder",
            "arch": c.arch,
            "code": f"{c.code_dim} ({c.latent_layers} stochastic layer(s) of {c.latent_dim})",
            "prior": c.prior + (f" ({c.pseudo_inputs} pseudo-inputs)" if c.prior == "vamp" else ""),
            "decoder": c.likelihood,
            "parameters": sum(p.numel() for p in model.parameters()),
            "image": " x ".join(map(str, model.image_shape)),
        },
        data={
            "dataset": manifest.get("dataset"),
            "source": source,
            "sha256": manifest.get("dataset_sha256"),
            "prepared (DVC md5)": data_tags.get("dvc.prepared.md5", "not run by DVC"),
            **{f"{s} images": v["count"] for s, v in manifest.get("splits", {}).items()},
        },
        metrics={k: _float(tags.get(k)) for k, *_ in CARD_METRICS},
        quality={
            "samples": sets.get(headline_set(quality), {}),
            "reconstruction": sets.get("reconstruction", {}),
            "real": sets.get("real_train", {}),
            "prior": sets.get("prior_mean", {}),
        },
        decision=decision,
        others=others,
        pictures=pictures,
        extra={
            "iw_samples": ev.get("iw_samples"),
            "per_layer": {k: ev.get(f"{k}_per_layer") for k in ("active_units", "kl")},
            "sampler": quality.get("sampler"),
            "temperature": quality.get("temperature"),
            "feature_net_sha256": quality.get("feature_net_sha256"),
        },
    )


def training_curves(history: Path) -> bytes:
    """Train and validation -ELBO per epoch, as a PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(history) as f:
        rows = list(csv.DictReader(f))
    epochs = [int(r["epoch"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot(epochs, [-float(r["train_elbo"]) for r in rows], label="train -ELBO")
    ax.plot(epochs, [float(r["val_nelbo"]) for r in rows], label="validation -ELBO")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per image")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _json(path: Path) -> dict[str, Any]:
    return load_json(path) if path.is_file() else {}


def _float(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _rows(d: Mapping[str, Any]) -> str:
    return "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in d.items()
    )


STYLE = """body{font:15px/1.5 system-ui,sans-serif;max-width:60em;margin:1.5em auto;padding:0 1em;
color:#1a1a1a}h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em;
border-bottom:1px solid #ddd}table{border-collapse:collapse;margin:.5em 0}
th,td{padding:.25em .8em;border-bottom:1px solid #eee;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.better{color:#0a7a2f}.worse{color:#b3261e}figure{display:inline-block;margin:.5em 1em .5em 0;
vertical-align:top}figure img{image-rendering:pixelated;max-width:100%;border:1px solid #ddd}
figcaption{font-size:.85em;color:#555;max-width:30em}pre{background:#f6f6f6;padding:.6em;
overflow-x:auto}.tag{display:inline-block;padding:0 .5em;border-radius:.3em;background:#eee}"""


def _compare(facts: CardFacts) -> str:
    """The metrics table: this version beside the champion before it and the previous version."""
    cols = [(f"v{facts.version} (this)", {k: v for k, v in facts.metrics.items()})]
    cols += [
        (label, {k: _float(tags.get(k)) for k, *_ in CARD_METRICS})
        for label, tags in facts.others.items()
    ]
    head = "".join(f"<th>{html.escape(label)}</th>" for label, _ in cols)
    body = []
    for key, label, digits, lower in CARD_METRICS:
        if key == "nll_iw" and facts.extra.get("iw_samples"):
            label = f"{label}, K = {facts.extra['iw_samples']}"
        if layers := (facts.extra.get("per_layer") or {}).get(key):  # two layers: [z1, z2]
            label += " (z1, z2: " + ", ".join(_fmt(v, digits) for v in layers) + ")"
        mine = cols[0][1][key]
        cells = []
        for i, (_, values) in enumerate(cols):
            v, cls = values[key], ""
            if i and v is not None and mine is not None and lower is not None and v != mine:
                cls = " better" if (mine < v) == lower else " worse"  # this version vs that one
            cells.append(f'<td class="n{cls}">{_fmt(v, digits)}</td>')
        body.append(f"<tr><th>{label}</th>{''.join(cells)}</tr>")
    sha = html.escape(str(facts.extra.get("feature_net_sha256"))[:12])
    note = (
        "A column in green: this version is better than that one there; in red: worse. The "
        "test split; samples are "
        f"{html.escape(str(facts.extra.get('sampler')))} draws at temperature "
        f"{facts.extra.get('temperature')}, scored against the grey test images in the features "
        f"of the fixed network (sha256 {sha}&hellip;)."
    )
    return f"<table><tr><th>metric</th>{head}</tr>{''.join(body)}</table><p>{note}</p>"


def _limits(facts: CardFacts) -> str:
    m, q = facts.metrics, facts.quality
    gap = m.get("elbo_gap")
    items = [
        "<li><b>The ELBO is only a bound.</b> Training maximises it; the test ELBO is "
        f"{_fmt(m.get('elbo'), 2)} nats, and the importance-weighted estimate of log p(x) is "
        f"{_fmt(gap, 2)} nats tighter. Compare models by <code>nll_iw</code>, not by the "
        "ELBO.</li>",
    ]
    fid = lambda s: _fmt(_float(q.get(s, {}).get("fid")), 1)  # noqa: E731
    items.append(
        "<li><b>Samples are blurry.</b> Their Fréchet distance to the test images is "
        f"{fid('samples')} (the prior's own draws: {fid('prior')}); the model's reconstructions "
        f"of test images score {fid('reconstruction')}, and real training images "
        f"{fid('real')}. A sampler can approach the reconstructions' figure, not the real "
        "images': the decoder's means are the blur. Distances are in the features of a "
        "Fashion-MNIST classifier, not Inception: compare them only with each other.</li>"
    )
    items.append(
        "<li><b>Binary pixels.</b> The likelihood is of binarized images; a grey image is "
        "encoded as its pixel probabilities. Log-likelihoods are not comparable with models of "
        "grey levels.</li>"
    )
    return f"<ul>{''.join(items)}</ul>"


def _usage(facts: CardFacts) -> str:
    uri = f"models:/{facts.name}/{facts.version}"
    d = facts.model["image"]
    n = math.prod(int(x) for x in d.split(" x "))
    snippets = {
        "Python": (
            "import mlflow, numpy as np\n"
            f'model = mlflow.pyfunc.load_model("{uri}")\n'
            f"images = np.random.rand(2, {n}).astype(np.float32)  # yours: pixels in [0, 1]\n"
            "z = model.predict(images)  # their codes\n"
            'x = model.predict(images[:1], params={"mode": "generate", "n": 16})  # 16 samples'
        ),
        "REST": (
            f"mlflow models serve -m {uri} --env-manager local -h 127.0.0.1 -p 5001\n"
            "curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\\n"
            f'  -d \'{{"inputs": [[... {n} pixels in 0..255 ...]], '
            '"params": {"uint8": true}}\''
        ),
        "vae": (
            f"vae encode --model {uri} photos/ --out embeddings.parquet\n"
            f"vae sample --model {uri} -n 64 --out samples.png"
        ),
        "Spark": f"vae encode --engine spark --model {uri} images/ --out embeddings/",
    }
    return "".join(f"<h3>{k}</h3><pre>{html.escape(v)}</pre>" for k, v in snippets.items())


def render_card(facts: CardFacts) -> str:
    """The card as one HTML page (see the module docstring)."""
    d = facts.decision
    status = "champion" if d.get("promoted") else "challenger"
    gate = (
        f'<p><span class="tag">{"promoted to champion" if d.get("promoted") else "not promoted"}'
        f"</span> {html.escape(str(d.get('reason', '')))}. The gate: a version becomes champion "
        "only if its <code>nll_iw</code> on the same test data is lower than the champion's.</p>"
    )
    pictures = "".join(
        f"<figure>{_img(facts.pictures[n], cap)}<figcaption>{html.escape(cap)}</figcaption>"
        "</figure>"
        for n, cap in (*PICTURES, ("curves", "Training curves: -ELBO per epoch"))
        if n in facts.pictures
    )
    model = {**facts.model, "parameters": f"{facts.model['parameters']:,}"}
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>{html.escape(facts.name)} v{facts.version}: model card</title>
<style>{STYLE}</style></head><body>
<h1>{html.escape(facts.name)} v{facts.version} <span class="tag">{status}</span></h1>
<p>Model card of registered version {facts.version}, from MLflow run
<code>{html.escape(facts.run_id)}</code>. Every number here is read from the pipeline's metrics
files and the registry.</p>
<h2>What it is</h2><table>{_rows(model)}</table>
<h2>Data</h2><table>{_rows(facts.data)}</table>
<h2>Intended use</h2>
<p>Codes (embeddings) of {html.escape(str(facts.data.get("dataset")))} images for search,
clustering and downstream classifiers; reconstructions; samples and interpolations to show what
the model learned. Not a source of realistic images, and not an out-of-distribution detector
without its own calibration: a VAE can give unfamiliar images a high likelihood.</p>
<h2>Known limits</h2>{_limits(facts)}
<h2>Test metrics</h2>{_compare(facts)}
<h2>The gate</h2>{gate}
<h2>Pictures</h2>{pictures}
<h2>How to use it</h2>{_usage(facts)}
</body></html>
"""
