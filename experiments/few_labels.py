"""Few labels (the paper's Table 2), at CPU scale: the GAN-NFK-128d probe with 500, 1000,
2000 and 4000 balanced labels (3 seeds each), against the same probe on the
discriminator's activations and on pixels.

The NFK is fitted once on the unlabelled fitting set (the same embeddings as
``linear_eval.py``, read from the shared cache); only the probe sees labels.

    python experiments/few_labels.py --data-dir /usr/share/datasets/fashion-mnist
    python experiments/few_labels.py --quick
"""

from __future__ import annotations

import statistics

import common
import torch


def main() -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    run = common.Run("few_labels", args)
    fit_n, test_n, n_iter = run.pick(400, 10000), run.pick(300, 10000), run.pick(2, 5)
    budgets = run.pick((50, 100), (500, 1000, 2000, 4000))
    seeds = (0, 1, 2)
    f = common.gan_features(run, "fmnist_gan", fit_n, test_n, k=common.gan_k(run), n_iter=n_iter)
    features = {
        f"GAN-NFK-{common.gan_k(run)}d (standardize)": ("nfk", "standardize"),
        f"GAN-NFK-{common.gan_k(run)}d (global)": ("nfk", "global"),
        "GAN-Activations": ("act", "standardize"),
        "Pixels": ("pix", "standardize"),
    }
    run.results["setting"] = {
        "dataset": "Fashion-MNIST",
        "fit_n": fit_n,
        "test_n": test_n,
        "n_iter": n_iter,
        "seeds": seeds,
        "epochs": common.model_spec(run, "fmnist_gan")["epochs"],
    }
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name, (key, scaling) in features.items():
        table[name] = {}
        for n in budgets:
            accs = []
            for seed in seeds:
                idx = common.balanced(f["y_fit"], n, seed)
                accs.append(
                    common.probe(
                        (f[f"{key}_fit"][idx], f["y_fit"][idx]),
                        (f[f"{key}_test"], f["y_test"]),
                        scaling,
                    )
                )
            table[name][str(n)] = {
                "mean": round(statistics.mean(accs), 2),
                "sd": round(statistics.stdev(accs), 2),
                "runs": accs,
            }
            run.log(name, n, table[name][str(n)])
    run.results["table"] = table
    fig, axes = common.figure(1, 1)
    ax = axes[0][0]
    for name, row in table.items():
        means = [row[str(n)]["mean"] for n in budgets]
        sds = [row[str(n)]["sd"] for n in budgets]
        ax.errorbar(budgets, means, yerr=sds, marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xticks(budgets, [str(n) for n in budgets])
    ax.set_xlabel("labels (balanced)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Fashion-MNIST, linear probe, mean +- sd of 3 seeds", fontsize=9)
    ax.legend(fontsize=7)
    common.save_figure(run, fig, "few_labels")
    run.save()


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
