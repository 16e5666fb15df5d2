"""Shared pieces of the representation experiments (``experiments/*.py``).

Everything here goes through the library's public API: the data modules, the
LightningModules and networks of ``lightning_nfk.models``, ``LowRankNFK``, ``exact_nfk``,
the spectrum metrics and the probe of ``lightning_nfk.kernel``. What this module adds is
bookkeeping: command-line options, trained models cached on disk (so that the scripts
share one GAN, one VAE and one classifier), feature extraction, JSON and plots.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from lightning_nfk.callbacks.linear_probe import layer_outputs
from lightning_nfk.data import CIFAR10DataModule, FashionMNISTDataModule
from lightning_nfk.data.image_datamodule import ImageDataModule
from lightning_nfk.kernel import LowRankNFK, select_and_fit
from lightning_nfk.models import (
    ClassifierModule,
    ConvVAE,
    DCGANDiscriminator,
    DCGANGenerator,
    GANModule,
    LeNet5,
    VAEModule,
    WideResNet,
)

REPO = Path(__file__).resolve().parent.parent


# -- command line and results -----------------------------------------------------------------
def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="minutes-long smoke run (tiny sizes)")
    p.add_argument("--out", default=None, help="results folder (default experiments/results)")
    p.add_argument(
        "--cache", default=None, help="trained models and features (default: <out>/cache)"
    )
    p.add_argument(
        "--data-dir", default="data", help="Fashion-MNIST (IDX files, or the Debian package)"
    )
    p.add_argument(
        "--cifar-dir",
        default=None,
        help="CIFAR-10 image-folder tree {train,test}/<class>/*.jpg; omitted: the CIFAR-10 rows are skipped",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p


class Run:
    """One script's run: options, timing, the results dict and where its files go."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name, self.args, self.quick = name, args, args.quick
        if args.threads:
            torch.set_num_threads(args.threads)
        default = REPO / "experiments" / "results" / ("quick" if args.quick else "")
        self.out = Path(args.out) if args.out else default
        self.out.mkdir(parents=True, exist_ok=True)
        self.cache = Path(args.cache) if args.cache else self.out / "cache"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self.commit = _commit()  # the code this run imported
        self.results: dict[str, Any] = {}
        print(
            f"[{name}] {'quick' if args.quick else 'full'} mode, results in {self.out}", flush=True
        )

    def pick(self, quick: Any, full: Any) -> Any:
        return quick if self.quick else full

    def log(self, *what: object) -> None:
        print(f"[{self.name} {time.time() - self.t0:7.1f}s]", *what, flush=True)

    def save(self) -> Path:
        meta = {
            "script": f"experiments/{self.name}.py",
            "command": "python " + " ".join([f"experiments/{self.name}.py", *sys.argv[1:]]),
            "mode": "quick" if self.quick else "full",
            "commit": self.commit,
            "wall_time_s": round(time.time() - self.t0, 1),
            "machine": machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
        path = self.out / f"{self.name}.json"
        path.write_text(json.dumps({"meta": meta, **self.results}, indent=1, default=_plain) + "\n")
        self.log(f"wrote {path} ({meta['wall_time_s']} s)")
        return path


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, no GPU used"


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _plain(o: object) -> object:
    if isinstance(o, Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


# -- data -------------------------------------------------------------------------------------
def fashion_mnist(run: Run, normalization: str, **kw: Any) -> ImageDataModule:
    dm = FashionMNISTDataModule(
        data_dir=run.args.data_dir, val_size=0, normalization=normalization, seed=0, **kw
    )
    dm.setup()
    return dm


def cifar10(run: Run, normalization: str, **kw: Any) -> ImageDataModule | None:
    if not run.args.cifar_dir:
        return None
    dm = CIFAR10DataModule(
        data_dir=run.args.cifar_dir, val_size=0, normalization=normalization, seed=0, **kw
    )
    dm.setup()
    return dm


def tensors(
    dm: ImageDataModule, split: str, n: int | None = None, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Images and labels of a split (a seeded subset of ``n`` when given), un-augmented."""
    ds = dm.dataset(split, augment=False, with_index=False)
    idx = torch.arange(len(ds))
    if n is not None and n < len(ds):
        idx = (
            torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        )
    xs, ys = zip(*(ds[int(i)] for i in idx))
    return torch.stack(xs), torch.as_tensor(ys)


# -- trained models, cached -------------------------------------------------------------------
class _SaveAt(pl.Callback):
    def __init__(self, epochs: Sequence[int], path: Callable[[int], Path]) -> None:
        self.epochs, self.path = set(epochs), path

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        e = trainer.current_epoch + 1
        if e in self.epochs:
            torch.save(pl_module.state_dict(), self.path(e))


def trained(
    run: Run,
    name: str,
    make: Callable[[], pl.LightningModule],
    dm: ImageDataModule,
    epochs: int,
    *,
    at: int | None = None,
    keep: Sequence[int] = (),
) -> pl.LightningModule:
    """``make()`` trained ``epochs`` epochs on ``dm`` (seed 0), in eval mode; with ``at``, the
    state after epoch ``at`` (0: the initialisation). Every epoch in ``keep`` is saved on the
    way, so later calls load instead of training."""
    at = epochs if at is None else at

    def path(e: int) -> Path:
        return run.cache / f"{name}-e{e}-of{epochs}.pt"

    pl.seed_everything(0, verbose=False)
    module = make()
    if at == 0:
        return module.eval()
    if not path(at).exists():
        run.log(f"training {name} for {epochs} epochs")
        t = time.time()
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[_SaveAt({*keep, epochs}, path)],
        )
        trainer.fit(module, train_dataloaders=dm.train_dataloader())
        run.log(f"trained {name} in {time.time() - t:.0f} s")
        run.results.setdefault("training_s", {})[name] = round(time.time() - t, 1)
    module.load_state_dict(torch.load(path(at), weights_only=True))
    return module.eval()


def lenet_classifier() -> ClassifierModule:
    return ClassifierModule(LeNet5(in_channels=1, num_classes=10, image_size=28))


def wrn16_1_classifier() -> ClassifierModule:
    return ClassifierModule(
        WideResNet(depth=16, widen_factor=1, num_classes=10),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
    )


def dcgan(
    channels: int, image_size: int, width: int = 64, latent_dim: int = 64
) -> Callable[[], GANModule]:
    def make() -> GANModule:
        return GANModule(
            DCGANGenerator(
                latent_dim=latent_dim, channels=channels, width=width, image_size=image_size
            ),
            DCGANDiscriminator(channels=channels, width=width, image_size=image_size),
            latent_dim=latent_dim,
            nfk_num_samples=2048,
        )

    return make


def conv_vae(
    channels: int, image_size: int, latent_dim: int, width: int, **kw: Any
) -> Callable[[], VAEModule]:
    def make() -> VAEModule:
        return VAEModule(
            ConvVAE(channels=channels, latent_dim=latent_dim, width=width, image_size=image_size),
            optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
            **kw,
        )

    return make


# -- the models every script shares (full mode: as long as this CPU allows; quick: 1 epoch
# on 1,000 images) --------------------------------------------------------------------------
def model_spec(run: Run, name: str) -> dict[str, Any]:
    """Data, factory and epochs of a shared model: ``fmnist_gan``, ``fmnist_gan_w32``,
    ``fmnist_vae``, ``fmnist_lenet``, ``cifar_gan``, ``cifar_vae``, ``cifar_wrn``."""
    subset = run.pick(1000, None)
    fm = {"data": "fmnist", "subset": subset}
    cf = {"data": "cifar", "subset": run.pick(1000, 20000)}
    specs = {
        "fmnist_gan": {**fm, "norm": "symmetric", "make": dcgan(1, 28), "epochs": run.pick(1, 4)},
        "fmnist_gan_w32": {
            **fm,
            "norm": "symmetric",
            "make": dcgan(1, 28, width=32),
            "epochs": run.pick(1, 4),
        },
        "fmnist_vae": {
            **fm,
            "norm": "none",
            "make": conv_vae(1, 28, 16, 32),
            "epochs": run.pick(1, 8),
        },
        "fmnist_lenet": {
            **fm,
            "norm": "standard",
            "make": lenet_classifier,
            "epochs": run.pick(1, 3),
        },
        "cifar_gan": {**cf, "norm": "symmetric", "make": dcgan(3, 32), "epochs": run.pick(1, 4)},
        "cifar_vae": {
            **cf,
            "norm": "none",
            "make": conv_vae(3, 32, 128, 64, likelihood="gaussian", gaussian_std=0.1),
            "epochs": run.pick(1, 4),
        },
        "cifar_wrn": {
            **cf,
            "norm": "standard",
            "make": wrn16_1_classifier,
            "epochs": run.pick(1, 4),
        },
    }
    return specs[name]


def data_for(run: Run, name: str) -> ImageDataModule | None:
    spec = model_spec(run, name)
    load = fashion_mnist if spec["data"] == "fmnist" else cifar10
    return load(run, spec["norm"], train_subset=spec["subset"])


def shared_model(run: Run, name: str, at: int | None = None) -> pl.LightningModule:
    """The shared model ``name`` (see :func:`model_spec`) after ``at`` epochs (default: all;
    0: at initialisation); epoch 1 is kept for the training-length comparisons."""
    spec = model_spec(run, name)
    dm = data_for(run, name)
    if dm is None:
        raise RuntimeError(f"{name} needs --cifar-dir")
    return trained(run, name, spec["make"], dm, spec["epochs"], at=at, keep=(1,))


# -- features and probes ----------------------------------------------------------------------
@torch.no_grad()
def batched(fn: Callable[[Tensor], Tensor], x: Tensor, batch: int = 500) -> Tensor:
    return torch.cat(
        [fn(x[i : i + batch]).reshape(len(x[i : i + batch]), -1) for i in range(0, len(x), batch)]
    )


def activations(module: nn.Module, layer: nn.Module, x: Tensor) -> Tensor:
    """Flattened outputs of ``layer`` while ``module`` runs on ``x`` (eval mode)."""
    out = layer_outputs(layer, lambda: batched(module, x))
    return torch.cat([o.detach().flatten(1) for o in out])


def nfk_features(
    run: Run, energy: Any, fit_x: Tensor, others: dict[str, Tensor], **options: Any
) -> tuple[LowRankNFK, dict[str, Tensor]]:
    """Fit ``LowRankNFK(energy, **options)`` on ``fit_x``; embeddings of ``fit_x`` ("fit") and
    of every tensor in ``others``."""
    t = time.time()
    nfk = LowRankNFK(energy, **options)
    feats = {"fit": nfk.fit_transform(fit_x)}
    for name, x in others.items():
        feats[name] = nfk.transform(x)
    run.log(
        f"NFK fit k={nfk.config.k} on {len(fit_x)} + {sum(map(len, others.values()))} embedded: {time.time() - t:.0f} s"
    )
    return nfk, feats


def probe(
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    scaling: str = "standardize",
) -> float:
    """Test accuracy (%) of the library's linear probe (L2 chosen on a held-out 20%)."""
    (xtr, ytr), (xte, yte) = train, test
    model = select_and_fit(xtr.double(), ytr, 10, scaling=scaling)
    return round(100 * model.accuracy(xte.double(), yte), 2)


def balanced(y: Tensor, n: int, seed: int) -> Tensor:
    """``n`` indices of ``y``, ``n / 10`` per class, seeded."""
    from lightning_nfk.data.image_datamodule import balanced_label_indices

    return balanced_label_indices(y, n, seed)


# -- plots ------------------------------------------------------------------------------------
def figure(*shape: int, size: tuple[float, float] = (5.0, 3.6)) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = shape or (1, 1)
    return plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)


def save_figure(run: Run, fig: Any, name: str) -> Path:
    path = run.out / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    run.results.setdefault("plots", []).append(path.name)
    run.log(f"plot {path}")
    return path


def gan_k(run: Run) -> int:
    """Components of the GAN-NFK fits: 128 (the paper's GAN-NFK-128d); 32 in quick mode."""
    return run.pick(32, 128)


def gan_features(
    run: Run, name: str, fit_n: int, test_n: int, k: int, n_iter: int, at: int | None = None
) -> dict[str, Any]:
    """GAN-NFK-k embeddings (fitted on ``fit_n`` unlabelled training images), the
    discriminator's activations and the pixels, of the fitting images and of ``test_n``
    test images; cached in ``run.cache``."""
    path = run.cache / f"{name}-feats-at{at}-n{fit_n}-{test_n}-k{k}-it{n_iter}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    gan = shared_model(run, name, at=at)
    dm = data_for(run, name)
    assert dm is not None
    fit, test = tensors(dm, "train", fit_n), tensors(dm, "test", test_n)
    t = time.time()
    nfk, emb = nfk_features(run, gan.nfk_energy(), fit[0], {"test": test[0]}, k=k, n_iter=n_iter)
    d = gan.discriminator
    out = {
        "y_fit": fit[1],
        "y_test": test[1],
        "nfk_fit": emb["fit"],
        "nfk_test": emb["test"],
        "nfk_s": round(time.time() - t, 1),
        "singular_values": nfk.singular_values,
        "explained": nfk.explained_variance_ratio,
        # the discriminator's last hidden layer (input of its linear output layer)
        "act_fit": activations(d, d.net[-2], fit[0]),
        "act_test": activations(d, d.net[-2], test[0]),
        "pix_fit": fit[0].flatten(1),
        "pix_test": test[0].flatten(1),
    }
    torch.save(out, path)
    return out


def encoder_mean(vae_module: VAEModule, x: Tensor) -> Tensor:
    """The VAE's posterior mean mu(x), the paper's VAE-feature baseline."""
    return batched(lambda xb: vae_module.vae.encode(xb)[0], x)
