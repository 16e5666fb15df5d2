"""Accuracy of the randomized fit (the paper's Fig. 3, bottom right): the top-128
eigenvalues of ``LowRankNFK`` (randomized subspace iteration, ``strategy="blocked"``,
10 power iterations as in the paper) against the exact eigendecomposition of the Gram
matrix (``exact_nfk`` in float64), for LeNet-5 on N = 10,000 Fashion-MNIST images; the
randomized fit in float32 and in float64.

Errors are reported per eigen-mode on the explained-variance scale r_i = sigma_i^2 / tr K
(absolute) and relative to the exact eigenvalue, with the explained variance of each mode
on the same plot.

    python experiments/accuracy.py --data-dir /usr/share/datasets/fashion-mnist
    python experiments/accuracy.py --quick
"""

from __future__ import annotations

import gc
import time

import common
import torch

from lightning_nfk.kernel import LowRankNFK, exact_nfk


def main() -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    run = common.Run("accuracy", args)
    n, k, n_iter = run.pick(500, 10000), run.pick(32, 128), run.pick(4, 10)
    dm = common.data_for(run, "fmnist_lenet")
    assert dm is not None
    x, _ = common.tensors(dm, "train", n)
    energy = common.shared_model(run, "fmnist_lenet").nfk_energy()
    t = time.time()
    exact = exact_nfk(energy, x, dtype=torch.float64, memory_budget=16 * 2**30)
    exact_s = time.time() - t
    total = float(exact.total_variance)
    ref = exact.singular_values[:k].square()  # float64 Gram eigenvalues
    num_parameters = exact.fisher_vectors.shape[1]
    del exact
    gc.collect()
    run.log(f"exact float64: {exact_s:.0f} s")
    run.results["setting"] = {
        "n": n,
        "k": k,
        "oversample": 10,
        "n_iter": n_iter,
        "num_parameters": num_parameters,
        "epochs": common.model_spec(run, "fmnist_lenet")["epochs"],
    }
    run.results["exact"] = {"seconds": round(exact_s, 1), "explained": (ref / total).tolist()}
    fits = {}
    for dtype in (torch.float32, torch.float64):
        t = time.time()
        nfk = LowRankNFK(energy, k=k, n_iter=n_iter, strategy="blocked", dtype=dtype).fit(x)
        got = nfk.singular_values.double().square()
        abs_err = ((got - ref) / total).abs()
        rel_err = ((got - ref) / ref).abs()
        name = str(dtype).removeprefix("torch.")
        fits[name] = {
            "seconds": round(time.time() - t, 1),
            "abs_error": abs_err.tolist(),
            "rel_error": rel_err.tolist(),
            "max_rel_error_top10": float(rel_err[:10].max()),
            "max_abs_error_top10": float(abs_err[:10].max()),
            "max_rel_error_all": float(rel_err.max()),
            "residuals": nfk.residuals.tolist(),
            "total_variance_rel_error": abs(float(nfk.total_variance) - total) / total,
        }
        run.log(name, {k2: v for k2, v in fits[name].items() if not isinstance(v, list)})
    run.results["randomized"] = fits
    fig, axes = common.figure(1, 1, size=(6.0, 4.0))
    ax = axes[0][0]
    modes = range(1, k + 1)
    for name, f in fits.items():
        ax.semilogy(modes, f["rel_error"], label=f"relative error, {name}")
        ax.semilogy(modes, f["abs_error"], ls=":", label=f"absolute error (r scale), {name}")
    ax.set_xlabel("eigen-mode (descending)")
    ax.set_ylabel("error")
    ax2 = ax.twinx()
    ax2.plot(
        modes,
        (ref / total).cumsum(0).tolist(),
        color="tab:red",
        label="cumulative explained variance",
    )
    ax2.set_ylabel("cumulative explained variance", color="tab:red")
    ax.set_title(f"LeNet-5, Fashion-MNIST, N={n}: top-{k} vs exact float64", fontsize=9)
    ax.legend(fontsize=6, loc="upper left")
    common.save_figure(run, fig, "accuracy")
    run.save()


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
