"""Why the VAE's NFK embedding is weak, measured: VAE-NFK-128d linear probes under each
candidate kernel definition, in one table.

The VAE is the shared Fashion-MNIST ConvVAE (latent 16, Bernoulli likelihood, trained
with ``VAEModule``). Every row fits ``LowRankNFK(VAEEnergy(vae, ...), k=128)`` on the same
unlabelled training images and probes the embeddings of labelled training and test
images; the encoder mean and the pixels are the references. Candidates:

* ``num_samples``: frozen noise samples per example (per-example randomness in the score);
* ``centring="data"``: subtract the mean score over the fitting data (a finite-trained
  VAE's is not zero, so without centring the top component may be that mean);
* ``fisher=None``: no diagonal-Fisher normalisation (with it, every parameter, e.g. each
  decoder output bias, gets unit variance);
* ``parameters``: the encoder's parameters only, or the decoder's only;
* training length: the VAE after 1 epoch against the fully trained one.

    python experiments/vae_kernel.py --data-dir /usr/share/datasets/fashion-mnist
    python experiments/vae_kernel.py --quick
"""

from __future__ import annotations

import json
import time
from typing import Any

import common
import torch

from lightning_nfk.kernel import LowRankNFK, VAEEnergy

ENCODER = ("encoder", "head")
DECODER = ("project", "decoder")

# Every option spelled out against BASE (the defaults before this study), so that a row
# means the same kernel whatever the library's defaults are.
BASE: dict[str, Any] = {
    "num_samples": 1,
    "antithetic": False,
    "centring": None,
    "fisher": "data",
    "parameters": None,
}
CANDIDATES: dict[str, dict[str, Any]] = {
    label: {**BASE, **change}
    for label, change in {
        "defaults before this study (S=1, z=0, data Fisher, all)": {},
        "S=8 noise samples": {"num_samples": 8},
        "S=4 noise samples": {"num_samples": 4},
        "centring=data": {"centring": "data"},
        "fisher=None": {"fisher": None},
        "encoder parameters only": {"parameters": ENCODER},
        "decoder parameters only": {"parameters": DECODER},
        "centring=data, S=8": {"centring": "data", "num_samples": 8},
        "S=2 antithetic": {"num_samples": 2, "antithetic": True},
        "S=8 antithetic": {"num_samples": 8, "antithetic": True},
        "S=32 antithetic": {"num_samples": 32, "antithetic": True},
    }.items()
}
QUICK = (
    "defaults before this study (S=1, z=0, data Fisher, all)",
    "S=2 antithetic",
    "centring=data",
)
AFTER_ONE_EPOCH = (
    "defaults before this study (S=1, z=0, data Fisher, all)",
    "S=8 noise samples",
    "S=8 antithetic",
)


def main() -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    run = common.Run("vae_kernel", args)
    fit_n, test_n, k, n_iter = (
        run.pick(300, 3000),
        run.pick(300, 3000),
        run.pick(16, 128),
        run.pick(1, 3),
    )
    dm = common.data_for(run, "fmnist_vae")
    assert dm is not None
    (fit_x, y_fit), (test_x, y_test) = (
        common.tensors(dm, "train", fit_n),
        common.tensors(dm, "test", test_n),
    )
    epochs = common.model_spec(run, "fmnist_vae")["epochs"]
    run.results["setting"] = {
        "fit_n": fit_n,
        "test_n": test_n,
        "k": k,
        "n_iter": n_iter,
        "epochs": epochs,
    }

    def row(module: Any, options: dict[str, Any]) -> dict[str, Any]:
        t = time.time()
        nfk = LowRankNFK(VAEEnergy(module.vae, **options), k=k, n_iter=n_iter).fit(fit_x)
        e_fit, e_test = nfk.fit_embedding, nfk.transform(test_x)
        out = {
            scaling: common.probe((e_fit, y_fit), (e_test, y_test), scaling)
            for scaling in ("standardize", "global")
        }
        out["explained_top1"] = float(nfk.explained_variance_ratio[0])
        out[f"explained_top{k}"] = float(nfk.explained_variance_ratio.sum())
        if options.get("centring") != "data":  # how much of sigma_1 the mean score explains
            mean = nfk.fit_embedding.mean(0)
            out["top1_mean_share"] = float(
                mean[0].square() * fit_n / nfk.singular_values[0].square()
            )
        out["seconds"] = round(time.time() - t, 1)
        out["options"] = {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
        out["commit"] = run.commit
        return out

    table: dict[str, Any] = previous_rows(run)  # a rerun adds only the new candidates
    trained = common.shared_model(run, "fmnist_vae")
    candidates = {k: CANDIDATES[k] for k in QUICK} if run.quick else CANDIDATES
    for label, options in candidates.items():
        if reusable(table.get(f"{label} | {epochs} epochs"), options):
            continue
        table[f"{label} | {epochs} epochs"] = row(trained, options)
        run.log(label, table[f"{label} | {epochs} epochs"])
        run.results["table"] = table
        run.save()
    if epochs > 1:
        early = common.shared_model(run, "fmnist_vae", at=1)
        for label in AFTER_ONE_EPOCH:
            if reusable(table.get(f"{label} | 1 epoch"), CANDIDATES[label]):
                continue
            table[f"{label} | 1 epoch"] = row(early, CANDIDATES[label])
            run.log(label, "1 epoch", table[f"{label} | 1 epoch"])
    else:
        early = trained
    refs = {}
    for when, module in (("trained", trained), ("1 epoch", early)):
        mu_fit = common.encoder_mean(module, fit_x)
        mu_test = common.encoder_mean(module, test_x)
        refs[f"encoder mean ({when})"] = common.probe((mu_fit, y_fit), (mu_test, y_test))
    refs["pixels"] = common.probe((fit_x.flatten(1), y_fit), (test_x.flatten(1), y_test))
    run.results["references"] = refs
    run.results["table"] = table
    plot(run, table, refs)
    run.save()


def reusable(row: dict[str, Any] | None, options: dict[str, Any]) -> bool:
    """An earlier row computed with exactly these options."""
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
    return row is not None and row.get("options") == plain


def previous_rows(run: common.Run) -> dict[str, Any]:
    """The rows of an earlier run with the same sizes, in the same folder (each row records
    its options and commit; :func:`reusable` checks the options)."""
    path = run.out / "vae_kernel.json"
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    same = old.get("setting") == run.results["setting"] and old["meta"]["mode"] == (
        "quick" if run.quick else "full"
    )
    if same:
        run.log(f"reusing {len(old.get('table', {}))} rows of {path}")
    return dict(old.get("table", {})) if same else {}


def plot(run: common.Run, table: dict[str, Any], refs: dict[str, float]) -> None:
    fig, axes = common.figure(1, 1, size=(9.0, 6.0))
    ax = axes[0][0]
    labels = sorted(table, key=lambda r: ("1 epoch" in r, list(table).index(r)))
    short = [
        r.replace("defaults before this study (S=1, z=0, data Fisher, all)", "S=1 (old default)")
        for r in labels
    ]
    for j, (scaling, color) in enumerate((("standardize", "tab:blue"), ("global", "tab:orange"))):
        ax.barh(
            [i + 0.4 * j for i in range(len(labels))],
            [table[r][scaling] for r in labels],
            0.4,
            color=color,
            label=f"VAE-NFK-{run.results['setting']['k']}d, probe on {scaling} features",
        )
    styles = {
        "encoder mean (trained)": ("k", "--"),
        "encoder mean (1 epoch)": ("k", ":"),
        "pixels": ("gray", "-."),
    }
    for name, value in refs.items():
        color, ls = styles.get(name, ("gray", "--"))
        ax.axvline(value, ls=ls, lw=1.2, color=color, label=f"{name}: {value:.1f}")
    ax.set_yticks([i + 0.2 for i in range(len(labels))], short, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("test accuracy (%), Fashion-MNIST, linear probe")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    common.save_figure(run, fig, "vae_kernel")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
