"""Does the NFK overtake the activations as the paper's discriminator trains? The AFV
residual GAN (``recipes/fashion_mnist_afv_gan.yaml``: spectral norm, least squares, a
moving average of the generator, AFV's optimisers) trained on this CPU, and at several
checkpoints along training the library's linear probe on: GAN-NFK-k (the recipe's NFK:
D's sigmoid, statistics from the averaged generator with batch statistics), D's pooled
block features (AFV's baseline), D's final ReLU map (unpooled) and its spatial mean (the
input of the logit layer), and the pixels. On the last
checkpoint also: the logit instead of the sigmoid, the raw generator instead of its
average, and running statistics instead of batch statistics. Each checkpoint's probes and
each variant's are cached as they finish (``--cache``), so a run stopped after training
resumes at the first probe it had not finished.

    python experiments/afv_trend.py --data-dir /usr/share/datasets/fashion-mnist
    python experiments/afv_trend.py --cifar-dir /work/cifar10 --dataset cifar10
    python experiments/afv_trend.py --quick
"""

from __future__ import annotations

import time
from typing import Any

import common

from lightning_nfk.kernel import GANEnergy


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=("fashion_mnist", "cifar10"), default="fashion_mnist")
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="training epochs (full: 4; a Fashion-MNIST epoch took 17-41 minutes on 2 "
        "cores, so 68-164 minutes of training)",
    )
    p.add_argument(
        "--upto",
        type=int,
        default=None,
        help="probe only the checkpoints up to this epoch, cached by an earlier run stopped "
        "on the way (default: train to --epochs and probe all)",
    )
    p.add_argument(
        "--nfk-at",
        default=None,
        help="comma-separated checkpoint epochs to fit the NFK at (the expensive row; "
        "default: every probed checkpoint); the activation and pixel rows are probed at all",
    )
    args = p.parse_args()
    name = "fmnist_afv" if args.dataset == "fashion_mnist" else "cifar_afv"
    run = common.Run(f"afv_trend_{args.dataset}", args)
    epochs = args.epochs or run.pick(1, 4)
    # initialisation, one epoch, half-way, the end: 0, 1, 2, 4 for the full run
    checkpoints = sorted({0, 1, epochs // 2, epochs})
    if args.upto is not None and args.upto < 0:
        raise SystemExit(f"--upto must be >= 0, got {args.upto}")
    # the last checkpoint at or before --upto
    last = max(c for c in checkpoints if c <= (epochs if args.upto is None else args.upto))
    probed = [c for c in checkpoints if c <= last]
    nfk_at = probed if args.nfk_at is None else [int(e) for e in args.nfk_at.split(",")]
    if not set(nfk_at) <= set(probed):
        raise SystemExit(f"--nfk-at must name probed checkpoints {probed}, got {args.nfk_at}")
    if args.upto is not None and last > 0 and not common.cached(run, name, last, epochs):
        raise SystemExit(f"--upto: epoch {last} of {epochs} is not cached in {run.cache}")
    fit_n, test_n = run.pick(200, 5000), run.pick(200, 5000)
    k, n_iter = run.pick(8, 128), run.pick(1, 5)
    dm = common.data_for(run, name)
    if dm is None:
        raise SystemExit(f"{name} needs --cifar-dir")
    fit, test = common.tensors(dm, "train", fit_n), common.tensors(dm, "test", test_n)
    t0 = time.time()
    common.shared_model(run, name, last, epochs=epochs, keep=checkpoints)  # trains once, cached
    run.results["training_minutes"] = round((time.time() - t0) / 60, 1)
    run.results["setting"] = {
        "recipe": common.model_spec(run, name)["recipe"],
        "epochs": epochs,
        "checkpoints": probed,
        "trained_to": last,
        "fit_n": fit_n,
        "test_n": test_n,
        "nfk_at": nfk_at,
        "k": k,
        "n_iter": n_iter,
        "probe": "the library's multinomial logistic regression, standardised features",
    }
    trend: dict[str, dict[str, float]] = {}
    gan = None
    # each checkpoint's probes and each final variant's are kept in the cache as they
    # finish, so a run stopped on the way resumes where it was (the NFK fits take minutes)
    tag = f"{name}-of{epochs}-n{fit_n}-{test_n}-k{k}-it{n_iter}"
    for at in probed:
        gan = common.shared_model(run, name, at, epochs=epochs, keep=checkpoints)
        # quick mode: fewer generator samples for the statistics (the recipe's 1,024 would
        # cost five times the fitting set's 200 examples)
        gan.nfk_num_samples = run.pick(100, gan.nfk_num_samples)
        nfk = at in nfk_at
        trend[str(at)] = common.remembered(
            run,
            f"{tag}-rows-e{at}{'-nfk' if nfk else ''}",
            lambda gan=gan, nfk=nfk: rows(run, gan, fit, test, k, n_iter, nfk=nfk),
        )
        run.log(f"epoch {at}", trend[str(at)])
    run.results["trend"] = trend
    assert gan is not None
    d, g = gan.discriminator, gan.generator
    ema = gan.generator_ema if gan.generator_ema is not None else g
    # the recipe's energy with one setting changed (its samples drawn in the same batches)
    same = {"num_samples": gan.nfk_num_samples, "batch_size": gan.nfk_batch_size}
    variants = {
        "recipe (sigmoid, averaged G, batch statistics)": gan.nfk_energy(),
        "logit": GANEnergy(d, ema, gan.latent_dim, generator_mode="train", **same),
        "raw G": GANEnergy(d, g, gan.latent_dim, score="sigmoid", generator_mode="train", **same),
        "running statistics": GANEnergy(d, ema, gan.latent_dim, score="sigmoid", **same),
    }
    recipe_row = trend[str(last)].get(f"GAN-NFK-{k}d")  # the recipe's NFK, if fitted there
    run.results["final_variants"] = {
        label: recipe_row
        if i == 0 and recipe_row is not None
        else common.remembered(
            run,
            f"{tag}-e{last}-variant{i}",
            lambda energy=energy: nfk_probe(run, energy, fit, test, k, n_iter),
        )
        for i, (label, energy) in enumerate(variants.items())
    }
    run.log("final variants", run.results["final_variants"])
    plot(run, trend)
    run.save()


def nfk_probe(run: common.Run, energy: GANEnergy, fit, test, k: int, n_iter: int) -> float:
    _, emb = common.nfk_features(run, energy, fit[0], {"test": test[0]}, k=k, n_iter=n_iter)
    return common.probe((emb["fit"], fit[1]), (emb["test"], test[1]))


def rows(run: common.Run, gan: Any, fit, test, k: int, n_iter: int, *, nfk: bool) -> dict:
    d = gan.discriminator
    splits = {"fit": fit[0], "test": test[0]}
    pooled = {s: common.batched(d.pooled_features, x) for s, x in splits.items()}
    # the final ReLU's map (width x 7 x 7 on Fashion-MNIST) and its spatial mean, the
    # logit layer's input (width)
    relu = {s: common.activations(d, d.relu, x) for s, x in splits.items()}
    width = d.out.in_features
    features = {
        f"pooled blocks ({pooled['fit'].shape[1]}-d)": pooled,
        f"final ReLU map ({relu['fit'].shape[1]}-d)": relu,
        f"logit input ({width}-d)": {
            s: f.reshape(len(f), width, -1).mean(2) for s, f in relu.items()
        },
        "pixels": {s: x.flatten(1) for s, x in splits.items()},
    }
    out = {f"GAN-NFK-{k}d": nfk_probe(run, gan.nfk_energy(), fit, test, k, n_iter)} if nfk else {}
    return out | {
        name: common.probe((f["fit"], fit[1]), (f["test"], test[1])) for name, f in features.items()
    }


def plot(run: common.Run, trend: dict[str, dict[str, float]]) -> None:
    fig, axes = common.figure(1, 1)
    ax = axes[0][0]
    epochs = [int(e) for e in trend]
    for feature in dict.fromkeys(f for row in trend.values() for f in row):
        at = [e for e in epochs if feature in trend[str(e)]]
        ax.plot(at, [trend[str(e)][feature] for e in at], marker="o", label=feature)
    ax.set_xlabel("training epoch")
    ax.set_ylabel("linear probe test accuracy, %")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    common.save_figure(run, fig, run.name)


if __name__ == "__main__":
    main()
