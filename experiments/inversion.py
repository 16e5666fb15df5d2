"""GAN inversion through the NFK (the paper's Fig. 4), at CPU scale: real test images
mapped to latents by a linear map from their NFK embeddings, and generated back, against
PCA reconstructions with as many components.

``lightning_nfk.models.invert_gan``: sample latents h, embed G(h) with a k-d NFK of the
discriminator (k = the latent size), fit the least-squares map from [e(G(h)), 1] to h;
then x -> e(x) -> h -> G(h). The model is the shared Fashion-MNIST DCGAN (latent 64).

    python experiments/inversion.py --data-dir /usr/share/datasets/fashion-mnist
    python experiments/inversion.py --quick
"""

from __future__ import annotations

import common
import torch
from torch import Tensor

from lightning_nfk.models import invert_gan


def pca_reconstruction(train: Tensor, x: Tensor, k: int) -> Tensor:
    """``x`` projected on the top-``k`` principal components of ``train`` (float64)."""
    a, b = train.flatten(1).double(), x.flatten(1).double()
    mean = a.mean(0)
    _, _, vh = torch.linalg.svd(a - mean, full_matrices=False)
    p = vh[:k].T
    return ((b - mean) @ p @ p.T + mean).reshape(x.shape)


def mse(a: Tensor, b: Tensor) -> float:
    """Mean squared error per pixel, on the [-1, 1] scale the GAN's images use."""
    return round(float((a.double() - b.double()).square().mean()), 5)


def main() -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    run = common.Run("inversion", args)
    name = "fmnist_gan"
    samples, n_iter = run.pick(400, 10000), run.pick(2, 5)
    pca_n, test_n = run.pick(1000, 20000), run.pick(200, 2000)
    gan = common.shared_model(run, name)
    dm = common.data_for(run, name)
    assert dm is not None
    x_test, _ = common.tensors(dm, "test", test_n)
    x_train, _ = common.tensors(dm, "train", pca_n)
    k = gan.latent_dim
    inv = invert_gan(gan.nfk_energy(), num_samples=samples, k=k, n_iter=n_iter)
    run.log(f"inversion fitted on {samples} samples, k={k}: train error {inv.train_error:.3f}")
    nfk_rec = inv.reconstruct(x_test)
    pca_rec = pca_reconstruction(x_train, x_test, k)
    # in distribution: held-out generated images, whose latents are known
    h = torch.randn(test_n, k, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        generated = gan.generator.eval()(h)
    gen_rec = inv.reconstruct(generated)
    latent_error = float((inv.latents(generated).double() - h.double()).square().mean())
    zero = torch.zeros_like(x_test)  # every pixel at the middle grey: a scale for the errors
    run.results["setting"] = {
        "model": name,
        "epochs": common.model_spec(run, name)["epochs"],
        "latent_dim": k,
        "nfk_k": k,
        "fitting_samples": samples,
        "n_iter": n_iter,
        "pca_fitted_on": pca_n,
        "test_images": test_n,
        "scale": "per-pixel mean squared error on [-1, 1] images",
    }
    run.results["table"] = {
        "test images: NFK inversion G(W e(x))": mse(nfk_rec, x_test),
        f"test images: PCA-{k}": mse(pca_rec, x_test),
        "test images: all pixels grey (0)": mse(zero, x_test),
        "generated images: NFK inversion": mse(gen_rec, generated),
        "generated images: latent error per coordinate (prior variance 1)": round(latent_error, 4),
        "fitting samples: latent error per coordinate": round(inv.train_error, 4),
    }
    for row, value in run.results["table"].items():
        run.log(row, value)
    grid(run, x_test[:10], nfk_rec[:10], pca_rec[:10], k)
    run.save()


def grid(run: common.Run, x: Tensor, nfk: Tensor, pca: Tensor, k: int) -> None:
    fig, axes = common.figure(3, len(x), size=(1.0, 1.1))
    rows = (("test image", x), ("NFK inversion", nfk), (f"PCA-{k}", pca))
    for r, (label, images) in enumerate(rows):
        for c, image in enumerate(images):
            ax = axes[r][c]
            ax.imshow(image[0].clamp(-1, 1).cpu(), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
    common.save_figure(run, fig, "inversion")


if __name__ == "__main__":
    main()
