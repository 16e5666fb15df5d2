"""Components (the paper's Fig. 7): linear-probe accuracy of a trained classifier's NFK
embedding against the number of components k = 1, 2, 4, ..., 128.

LeNet-5 trained on Fashion-MNIST (the shared classifier), ``ClassifierEnergy`` NFK with
k = 128 fitted on the fitting set; the probe on the first k components of the same
embedding (the components are nested: the top-k of a rank-128 fit).

    python experiments/components.py --data-dir /usr/share/datasets/fashion-mnist
    python experiments/components.py --quick
"""

from __future__ import annotations

import common
import torch

from lightning_nfk.kernel import cumulative_explained_variance


def main() -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    run = common.Run("components", args)
    fit_n, test_n, n_iter = run.pick(400, 10000), run.pick(300, 10000), run.pick(2, 5)
    ks = [1, 2, 4, 8, 16, 32, 64, 128]
    dm = common.data_for(run, "fmnist_lenet")
    assert dm is not None
    (fit_x, y_fit), (test_x, y_test) = (
        common.tensors(dm, "train", fit_n),
        common.tensors(dm, "test", test_n),
    )
    module = common.shared_model(run, "fmnist_lenet")
    nfk, emb = common.nfk_features(
        run, module.nfk_energy(), fit_x, {"test": test_x}, k=128, n_iter=n_iter
    )
    with torch.no_grad():
        network = float((common.batched(module, test_x).argmax(1) == y_test).double().mean()) * 100
    table = {
        scaling: {
            str(k): common.probe((emb["fit"][:, :k], y_fit), (emb["test"][:, :k], y_test), scaling)
            for k in ks
        }
        for scaling in ("standardize", "global")
    }
    run.log(table)
    run.results.update(
        setting={
            "fit_n": fit_n,
            "test_n": test_n,
            "n_iter": n_iter,
            "epochs": common.model_spec(run, "fmnist_lenet")["epochs"],
        },
        table=table,
        network_test_acc=round(network, 2),
        explained=cumulative_explained_variance(nfk.singular_values, nfk.total_variance)[
            [k - 1 for k in ks]
        ],
    )
    fig, axes = common.figure(1, 1)
    ax = axes[0][0]
    for scaling, row in table.items():
        ax.plot(ks, [row[str(k)] for k in ks], marker="o", label=f"NFK embedding ({scaling})")
    ax.axhline(network, ls="--", color="k", lw=1, label=f"the network itself ({network:.1f})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k (components)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("LeNet-5 on Fashion-MNIST: NFK linear probe vs k", fontsize=9)
    ax.legend(fontsize=7)
    common.save_figure(run, fig, "components")
    run.save()


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
