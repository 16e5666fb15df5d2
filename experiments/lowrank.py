"""Low-rankness of the NFK (the paper's Fig. 2, Q1): cumulative explained variance
against k = 1..256 for a classifier (LeNet-5 on Fashion-MNIST; WRN-16-1 on CIFAR-10 with
``--cifar-dir``), the GAN discriminator and the VAE (Fashion-MNIST), each at
initialisation and after training, with k90 (components for 90% of the variance), the
effective rank of the top 256 and the stable rank (and after the first epoch, to see the
trend).

The explained variance is exact: ``LowRankNFK`` computes ||V||_F^2 = tr K from the
per-example gradients, so c_k = sum_{i<=k} sigma_i^2 / tr K.

    python experiments/lowrank.py --data-dir /usr/share/datasets/fashion-mnist --cifar-dir DIR
    python experiments/lowrank.py --quick
"""

from __future__ import annotations

import time

import common
import torch

from lightning_nfk.kernel import (
    LowRankNFK,
    components_for,
    cumulative_explained_variance,
    effective_rank,
    stable_rank,
)

MODELS = {
    "fmnist_lenet": "LeNet-5 classifier, Fashion-MNIST",
    "cifar_wrn": "WRN-16-1 classifier, CIFAR-10 (JPEG copy)",
    "fmnist_gan": "DCGAN discriminator, Fashion-MNIST",
    "fmnist_vae": "ConvVAE, Fashion-MNIST",
}


def main() -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    run = common.Run("lowrank", args)
    n, k, n_iter = run.pick(200, 2000), run.pick(64, 256), run.pick(1, 3)
    run.results["setting"] = {"fit_n": n, "k": k, "oversample": 10, "n_iter": n_iter}
    curves: dict[str, dict[str, list[float]]] = {}
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for name in MODELS:
        dm = common.data_for(run, name)
        if dm is None:
            continue
        x, _ = common.tensors(dm, "train", n)
        epochs = common.model_spec(run, name)["epochs"]
        states = [("initialisation", 0), ("after 1 epoch", 1), (f"trained {epochs} epochs", None)]
        for when, at in states if epochs > 1 else [states[0], states[2]]:
            module = common.shared_model(run, name, at=at)
            t = time.time()
            nfk = LowRankNFK(module.nfk_energy(), k=k, n_iter=n_iter).fit(x)
            s, total = nfk.singular_values, nfk.total_variance
            c = cumulative_explained_variance(s, total)
            curves.setdefault(name, {})[when] = c.tolist()
            summary.setdefault(name, {})[when] = {
                "k90": components_for(s, total, 0.9),
                "k99": components_for(s, total, 0.99),
                f"explained_top{k}": round(float(c[-1]), 4),
                "explained_top10": round(float(c[9]), 4),
                "effective_rank": round(effective_rank(s), 1),
                "stable_rank": round(stable_rank(s, total), 2),
                "num_parameters": nfk.num_parameters,
                "seconds": round(time.time() - t, 1),
            }
            run.log(name, when, summary[name][when])
        run.results.update(curves=curves, summary=summary, titles=MODELS)
        run.save()
    fig, axes = common.figure(1, len(curves), size=(3.6, 3.4))
    for ax, (name, per) in zip(axes[0], curves.items()):
        for when, c in per.items():
            s = summary[name][when]
            ax.plot(
                range(1, len(c) + 1),
                c,
                ls={"initialisation": "--", "after 1 epoch": ":"}.get(when, "-"),
                label=f"{when} (k90 {'= ' + str(s['k90']) if s['k90'] > 0 else '> ' + str(len(c))})",
            )
        ax.set_xscale("log")
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("k")
        ax.set_title(MODELS[name], fontsize=8)
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("cumulative explained variance")
    common.save_figure(run, fig, "lowrank")
    run.save()


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
