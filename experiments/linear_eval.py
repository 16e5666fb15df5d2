"""Linear evaluation of NFK embeddings (the paper's Table 1), at CPU scale.

On Fashion-MNIST and, with ``--cifar-dir``, CIFAR-10 (JPEG copy): a linear probe on

* GAN-NFK-{32,64,128}d: the DCGAN discriminator's NFK fitted on the unlabelled fitting
  set (``GANEnergy``: centred and normalised with generator samples);
* GAN-Activations: the discriminator's last hidden layer;
* GAN-AFV: the full Fisher vector. A linear probe with an L2 penalty on the centred
  Fisher vectors V_x of n training images only ever uses their span, so it equals a
  probe on the exact embedding with all n components, e(x) = V_x P (P: the n right
  singular vectors of the training Fisher vectors; ``LowRankNFK(k=n, oversample=0,
  strategy="dense")``) under one global scale. That is how it is computed here, on the
  ``afv_n`` seeded fitting images (5,000 on Fashion-MNIST: V is then 2.8 GB in float32).
  The probe's L2 grid (1e-5..1e-1, chosen on held-out images) applies to the embedding's
  n columns; one global scale makes them sqrt(P / n) times larger than V's P columns, so
  on V the grid is 1e-5..1e-1 times P / n (28x on Fashion-MNIST);
* raw pixels;
* VAE-NFK-{128,256}d (``VAEEnergy`` with the library's defaults) against the VAE's
  encoder mean.

Then, on Fashion-MNIST, the conditions under which GAN-NFK beats the activations: how the
embedding is scaled before the probe (per-feature standardisation or one global scale),
k, the discriminator's training length and width, and the size of the fitting set.

    python experiments/linear_eval.py --data-dir /usr/share/datasets/fashion-mnist \\
        --cifar-dir /path/to/cifar10-tree            # full (about 35 min on 2 cores)
    python experiments/linear_eval.py --quick        # smoke run
"""

from __future__ import annotations

import json
import time
from typing import Any

import common
import torch

from lightning_nfk.kernel import LowRankNFK, VAEEnergy

SCALINGS = ("standardize", "global")


def nfk_rows(f: dict[str, Any], ks: tuple[int, ...], prefix: str) -> dict[str, float]:
    """Probes on the first k components for each k in ``ks`` (those the fit has; quick
    mode fits fewer)."""
    width = f["nfk_fit"].shape[1]
    rows = {}
    for k in [k for k in ks if k <= width] or [width]:
        for scaling in SCALINGS:
            rows[f"{prefix}-{k}d/{scaling}"] = common.probe(
                (f["nfk_fit"][:, :k], f["y_fit"]), (f["nfk_test"][:, :k], f["y_test"]), scaling
            )
    return rows


def gan_table(
    run: common.Run, name: str, fit_n: int, test_n: int, afv_n: int, n_iter: int
) -> dict[str, Any]:
    f = common.gan_features(run, name, fit_n, test_n, k=common.gan_k(run), n_iter=n_iter)
    rows = nfk_rows(f, (32, 64, 128), "GAN-NFK")
    rows["GAN-Activations/standardize"] = common.probe(
        (f["act_fit"], f["y_fit"]), (f["act_test"], f["y_test"])
    )
    rows["GAN-Activations/global"] = common.probe(
        (f["act_fit"], f["y_fit"]), (f["act_test"], f["y_test"]), "global"
    )
    rows["Pixels/standardize"] = common.probe(
        (f["pix_fit"], f["y_fit"]), (f["pix_test"], f["y_test"])
    )
    run.log(name, rows)

    afv, num_parameters, afv_s = afv_rows(run, name, f, fit_n, test_n, afv_n)
    rows.update(afv)
    run.log(name, "AFV", rows)
    return {
        "rows": rows,
        "fit_n": fit_n,
        "test_n": test_n,
        "afv_n": afv_n,
        "num_parameters": num_parameters,
        "nfk_fit_s": f["nfk_s"],
        "afv_s": round(afv_s, 1),
        "explained_128": float(f["explained"].sum()),
    }


def afv_rows(
    run: common.Run, name: str, f: dict[str, Any], fit_n: int, test_n: int, afv_n: int
) -> tuple[dict[str, float], int, float]:
    """GAN-AFV: the probe on the full Fisher vectors of ``afv_n`` seeded fitting images
    (see the module docstring), and GAN-NFK probed on the same images."""
    gan = common.shared_model(run, name)
    dm = common.data_for(run, name)
    assert dm is not None
    fit_x, _ = common.tensors(dm, "train", fit_n)
    test_x, _ = common.tensors(dm, "test", test_n)
    # a seeded random share: the fitting set is in dataset order, which for an image-folder
    # tree (CIFAR-10) is class by class, so its first rows are a few classes only
    sub = torch.randperm(fit_n, generator=torch.Generator().manual_seed(0))[:afv_n]
    t = time.time()
    afv = LowRankNFK(
        gan.nfk_energy(), k=afv_n, oversample=0, strategy="dense", memory_budget=12 * 2**30
    ).fit(fit_x[sub])
    afv_fit, afv_test = afv.transform(fit_x[sub]), afv.transform(test_x)
    seconds = time.time() - t
    y_sub = f["y_fit"][sub]
    rows = {
        f"GAN-AFV (n={afv_n})/global": common.probe(
            (afv_fit, y_sub), (afv_test, f["y_test"]), "global"
        )
    }
    for scaling in SCALINGS:  # the matched comparison: NFK-128d probed on the same images
        rows[f"GAN-NFK-{f['nfk_fit'].shape[1]}d (n={afv_n})/{scaling}"] = common.probe(
            (f["nfk_fit"][sub], y_sub), (f["nfk_test"], f["y_test"]), scaling
        )
    return rows, afv.num_parameters, round(seconds, 1)


def vae_table(run: common.Run, name: str, fit_n: int, test_n: int, n_iter: int) -> dict[str, Any]:
    module = common.shared_model(run, name)
    dm = common.data_for(run, name)
    assert dm is not None
    (fit_x, y_fit), (test_x, y_test) = (
        common.tensors(dm, "train", fit_n),
        common.tensors(dm, "test", test_n),
    )
    energy = module.nfk_energy()
    t = time.time()
    _, emb = common.nfk_features(
        run, energy, fit_x, {"test": test_x}, k=run.pick(32, 256), n_iter=n_iter
    )
    f = {"nfk_fit": emb["fit"], "nfk_test": emb["test"], "y_fit": y_fit, "y_test": y_test}
    rows = nfk_rows(f, (128, 256), "VAE-NFK")
    mu_fit = common.encoder_mean(module, fit_x)
    mu_test = common.encoder_mean(module, test_x)
    rows["VAE encoder mean/standardize"] = common.probe((mu_fit, y_fit), (mu_test, y_test))
    rows["Pixels/standardize"] = common.probe(
        (fit_x.flatten(1), y_fit), (test_x.flatten(1), y_test)
    )
    run.log(name, rows)
    return {
        "rows": rows,
        "fit_n": fit_n,
        "test_n": test_n,
        "energy": repr_energy(energy),
        "nfk_s": round(time.time() - t, 1),
    }


def repr_energy(e: VAEEnergy) -> dict[str, Any]:
    return {
        "num_samples": e.num_samples,
        "centring": e.centring,
        "fisher": e.fisher,
        "parameters": e.parameters,
    }


def conditions(run: common.Run, fit_n: int, test_n: int, n_iter: int) -> dict[str, Any]:
    """What makes GAN-NFK beat the activations (Fashion-MNIST)."""
    out: dict[str, Any] = {}
    variants = {
        "trained 1 epoch": ("fmnist_gan", 1, fit_n),
        "width 32": ("fmnist_gan_w32", None, fit_n),
        f"fitted on {fit_n // 5}": ("fmnist_gan", None, fit_n // 5),
    }
    epochs = common.model_spec(run, "fmnist_gan")["epochs"]
    for label, (name, at, n) in variants.items():
        if (at is not None and at >= epochs) or n < common.gan_k(run) + 10:  # (quick mode)
            continue
        f = common.gan_features(run, name, fit_n, test_n, k=common.gan_k(run), n_iter=n_iter, at=at)
        if n < fit_n:  # the NFK fitted on the first n fitting images, embedding all of them
            # (Fashion-MNIST only: its dataset order is not sorted by class)
            gan = common.shared_model(run, name, at=at)
            dm = common.data_for(run, name)
            assert dm is not None
            fit_x, _ = common.tensors(dm, "train", fit_n)
            test_x, _ = common.tensors(dm, "test", test_n)
            nfk = LowRankNFK(gan.nfk_energy(), k=common.gan_k(run), n_iter=n_iter).fit(fit_x[:n])
            f = {**f, "nfk_fit": nfk.transform(fit_x), "nfk_test": nfk.transform(test_x)}
        rows = nfk_rows(f, (32, 128), "GAN-NFK")
        rows["GAN-Activations/standardize"] = common.probe(
            (f["act_fit"], f["y_fit"]), (f["act_test"], f["y_test"])
        )
        out[label] = rows
        run.log(label, rows)
    return out


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--cifar-vae",
        action="store_true",
        help="also the CIFAR-10 VAE rows (3.4M parameters, k=256: more than 24 GB of memory)",
    )
    p.add_argument(
        "--afv-only",
        action="store_true",
        help="recompute only the GAN-AFV rows (and their matched NFK rows) of the JSON in --out",
    )
    args = p.parse_args()
    run = common.Run("linear_eval", args)
    if args.afv_only:
        redo_afv(run)
        return
    fit_n, test_n, afv_n = run.pick(400, 10000), run.pick(300, 10000), run.pick(200, 5000)
    n_iter = run.pick(2, 5)
    run.results["setting"] = {
        "fit_n": fit_n,
        "test_n": test_n,
        "afv_n": afv_n,
        "n_iter": n_iter,
        "oversample": 10,
        "probe": "multinomial logistic regression (L-BFGS, float64), L2 from 1e-5..1e-1 on a held-out 20% of the labelled fitting set",
        "epochs": {
            n: common.model_spec(run, n)["epochs"]
            for n in ("fmnist_gan", "fmnist_gan_w32", "fmnist_vae", "cifar_gan", "cifar_vae")
        },
    }
    tables: dict[str, Any] = {}
    tables["fashion_mnist_gan"] = gan_table(run, "fmnist_gan", fit_n, test_n, afv_n, n_iter)
    tables["fashion_mnist_vae"] = vae_table(run, "fmnist_vae", fit_n, test_n, n_iter)
    run.results["tables"] = tables
    run.results["gan_conditions"] = conditions(run, fit_n, test_n, n_iter)
    run.save()
    if args.cifar_dir:
        c_fit, c_test, c_afv = run.pick(400, 5000), run.pick(300, 5000), run.pick(200, 3000)
        run.results["setting"]["cifar"] = {"fit_n": c_fit, "test_n": c_test, "afv_n": c_afv}
        tables["cifar10_gan"] = gan_table(run, "cifar_gan", c_fit, c_test, c_afv, n_iter)
        if args.cifar_vae:  # the full run was killed for memory here on a 24 GB machine
            tables["cifar10_vae"] = vae_table(run, "cifar_vae", c_fit, c_test, n_iter)
    plot(run, tables)
    run.save()


def redo_afv(run: common.Run) -> None:
    """Recompute the AFV rows of an earlier run (same sizes), keeping everything else."""
    old = json.loads((run.out / "linear_eval.json").read_text())
    run.results.update({k: v for k, v in old.items() if k not in ("meta", "plots")})
    s = run.results["setting"]
    for table, name, sizes in (
        ("fashion_mnist_gan", "fmnist_gan", s),
        ("cifar10_gan", "cifar_gan", s.get("cifar")),
    ):
        if table not in run.results["tables"]:
            continue
        f = common.gan_features(
            run, name, sizes["fit_n"], sizes["test_n"], k=common.gan_k(run), n_iter=s["n_iter"]
        )
        rows, _, seconds = afv_rows(run, name, f, sizes["fit_n"], sizes["test_n"], sizes["afv_n"])
        t = run.results["tables"][table]
        t["rows"] = {k: v for k, v in t["rows"].items() if f"(n={sizes['afv_n']})" not in k}
        t["rows"].update(rows)
        t.update(afv_s=seconds, afv_commit=run.commit)
        run.log(table, rows)
    plot(run, run.results["tables"])
    run.save()


def plot(run: common.Run, tables: dict[str, Any]) -> None:
    fig, axes = common.figure(1, len(tables), size=(4.2, 4.0))
    for ax, (name, t) in zip(axes[0], tables.items()):
        rows = {k: v for k, v in t["rows"].items()}
        labels = list(rows)
        ax.barh(range(len(labels)), [rows[k] for k in labels], color="tab:blue")
        ax.set_yticks(
            range(len(labels)),
            [k.replace("/standardize", " (std)").replace("/global", " (global)") for k in labels],
            fontsize=7,
        )
        ax.invert_yaxis()
        for i, k in enumerate(labels):
            ax.text(rows[k], i, f" {rows[k]:.1f}", va="center", fontsize=7)
        title = name.replace("cifar10", "CIFAR-10 (JPEG copy)").replace(
            "fashion_mnist", "Fashion-MNIST"
        )
        ax.set_title(title.replace("_", " "), fontsize=9)
        ax.set_xlabel("test accuracy (%)")
        ax.set_xlim(0, 105)
    common.save_figure(run, fig, "linear_eval")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
