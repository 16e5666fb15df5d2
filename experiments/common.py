"""Shared pieces of the representation experiments (``experiments/*.py``).

Everything here goes through the library's public API. The models, their data and their
training come from the recipes (``lightning_nfk.cli.load_recipe``: one source of truth;
what the experiments change is written beside each model as CLI overrides); the kernel,
the spectrum metrics and the probe from ``lightning_nfk.kernel``. What this module adds is
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

from lightning_nfk.callbacks import layer_outputs
from lightning_nfk.cli import Recipe, load_recipe
from lightning_nfk.data import EpochSeededSampler, ImageDataModule, balanced_label_indices
from lightning_nfk.kernel import LowRankNFK, select_and_fit
from lightning_nfk.models import VAEModule

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
        self.data_modules: dict[str, ImageDataModule] = {}  # set up once per run (data_for)
        print(
            f"[{name}] {'quick' if args.quick else 'full'} mode, results in {self.out}", flush=True
        )

    def pick(self, quick: Any, full: Any) -> Any:
        return quick if self.quick else full

    def log(self, *what: object) -> None:
        print(f"[{self.name} {time.time() - self.t0:7.1f}s]", *what, flush=True)

    def save(self) -> Path:
        meta = run_meta(self.name, self.quick, self.commit)
        meta["wall_time_s"] = round(time.time() - self.t0, 1)
        path = self.out / f"{self.name}.json"
        path.write_text(json.dumps({"meta": meta, **self.results}, indent=1, default=_plain) + "\n")
        self.log(f"wrote {path} ({meta['wall_time_s']} s)")
        return path


def run_meta(name: str, quick: bool, commit: str | None = None) -> dict[str, Any]:
    """What a result file says of its run: script, command, mode, commit, machine, torch,
    threads, date."""
    # the script that ran (a run's name may add to it: afv_trend_fashion_mnist)
    script = (
        f"experiments/{Path(sys.argv[0]).name}"
        if sys.argv[0].endswith(".py")
        else f"experiments/{name}.py"
    )
    return {
        "script": script,
        "command": "python " + " ".join([script, *sys.argv[1:]]),
        "mode": "quick" if quick else "full",
        "commit": commit or _commit(),
        "machine": machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


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


# -- the models every script shares, built from the recipes ------------------------------------
# name -> (recipe, what differs from it). Full mode trains as long as this CPU allows; quick
# mode 1 epoch on 1,000 images. Every model is the recipe's own (same classes, same seed,
# so the same initial weights); the differences are written here as CLI overrides.
_G, _D = "--model.init_args.generator.init_args", "--model.init_args.discriminator.init_args"
_SHARED: dict[str, tuple[str, tuple[str, ...]]] = {
    "fmnist_gan": ("fashion_mnist_gan", ()),
    "fmnist_gan_w32": ("fashion_mnist_gan", (f"{_G}.width=32", f"{_D}.width=32")),
    "fmnist_vae": ("fashion_mnist_vae", ()),
    "fmnist_lenet": ("quickstart", ()),
    "cifar_gan": ("cifar10_dcgan", ()),
    # the paper's GAN design (AFV residual GAN) at a CPU width
    "fmnist_afv": ("fashion_mnist_afv_gan", ()),
    "cifar_afv": ("cifar10_afv_gan_cpu", ()),
    "cifar_vae": ("cifar10_vae", ()),
    # a constant learning rate of 0.05 for the few CPU epochs, no augmentation
    "cifar_wrn": (
        "cifar10_wrn",
        (
            "--model.init_args.optimizer.init_args.lr=0.05",
            "--model.init_args.optimizer.init_args.nesterov=false",
            "--model.init_args.scheduler=null",
            "--data.init_args.augment=false",
        ),
    ),
}
_EPOCHS = {"fmnist_gan": 4, "fmnist_gan_w32": 4, "fmnist_vae": 8, "fmnist_lenet": 3}


def model_spec(run: Run, name: str) -> dict[str, Any]:
    """Recipe, overrides, training subset and epochs of a shared model: ``fmnist_gan``,
    ``fmnist_gan_w32``, ``fmnist_vae``, ``fmnist_lenet``, ``cifar_gan``, ``cifar_vae``,
    ``cifar_wrn``, ``fmnist_afv``, ``cifar_afv``."""
    recipe, overrides = _SHARED[name]
    cifar = recipe.startswith("cifar10")
    return {
        "recipe": recipe,
        "overrides": overrides,
        "data": "cifar" if cifar else "fmnist",
        "subset": run.pick(1000, 20000 if cifar else None),
        "epochs": run.pick(1, _EPOCHS.get(name, 4)),
    }


def shared_recipe(run: Run, name: str, *extra: str) -> Recipe | None:
    """The recipe of the shared model ``name`` as this CPU runs it: its model, its data
    module (validation split 0, the training subset, no worker processes) and a bare
    trainer (CPU, float32, no logger, callbacks or checkpoints); None for a CIFAR-10
    model without ``--cifar-dir``."""
    spec = model_spec(run, name)
    data_dir = run.args.cifar_dir if spec["data"] == "cifar" else run.args.data_dir
    if not data_dir:
        return None
    subset = spec["subset"]
    return load_recipe(
        spec["recipe"],
        *spec["overrides"],
        f"--data.init_args.data_dir={data_dir}",
        "--data.init_args.val_size=0",
        "--data.init_args.num_workers=0",
        f"--data.init_args.train_subset={'null' if subset is None else subset}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.precision=32-true",
        "--trainer.deterministic=false",  # process-wide once set: as the models trained before
        f"--trainer.max_epochs={spec['epochs']}",
        "--trainer.limit_val_batches=0",
        *extra,
        bare=True,
    )


def data_for(run: Run, name: str) -> ImageDataModule | None:
    """The shared model's data module, set up once per run (None: CIFAR-10 without
    ``--cifar-dir``)."""
    if name not in run.data_modules:
        with torch.random.fork_rng(devices=[]):  # building the model draws: restore the RNG
            recipe = shared_recipe(run, name, "--seed_everything=false")
        if recipe is None:
            return None
        dm = recipe.datamodule
        assert isinstance(dm, ImageDataModule)
        dm.setup()
        run.data_modules[name] = dm
    return run.data_modules[name]


def tensors(
    dm: ImageDataModule, split: str, n: int | None = None, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Images and labels of a split (a seeded subset of ``n`` when given), un-augmented."""
    ds = dm.dataset(split, augment=False, with_index=False)
    if n is None or n >= len(ds):
        return ds.tensors()
    g = torch.Generator().manual_seed(seed)
    return ds.tensors(torch.randperm(len(ds), generator=g)[:n].sort().values)


# a training resumes from its last checkpoint, taken every this many batches of an epoch: a
# run killed on the way (a stopped session, a reboot) loses fewer than twice as many
RESUME_EVERY = 100


def _save_atomic(save: Callable[[Path], None], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())  # on disk before it replaces the previous one (a reboot)
    tmp.replace(path)  # a kill while writing leaves no file, or the previous one, whole


def _resumable(run: Run, resume: Path, at: int) -> dict[str, Any] | None:
    """The checkpoint at ``resume`` if training can continue from it to epoch ``at``'s
    weights (it was taken before that epoch ended, by this code); else None, and it is
    deleted."""
    if not resume.exists():
        return None
    ckpt = torch.load(resume, map_location="cpu", weights_only=False)
    if ckpt["epoch"] < at and _Checkpoints.__qualname__ in ckpt.get("callbacks", {}):
        return ckpt
    run.log(f"not resuming from {resume} (epoch {ckpt['epoch']}, to reach {at}): removed")
    resume.unlink()
    return None


class _Checkpoints(pl.Callback):
    """Saves the weights after each epoch in ``epochs`` (the cache) and, every
    :data:`RESUME_EVERY` batches within an epoch, a full checkpoint that the next call
    resumes from: optimisers, loops, the global random state and the batches done, so that
    the resumed training continues the epoch's data order
    (:meth:`EpochSeededSampler.skip_once`) and random draws where they were and computes
    what the uninterrupted one would have, up to float rounding: on the CPU's global
    generator, with loaders that draw nothing at random and have no workers, as the shared
    models' (an augmenting one would draw its batches' crops anew).

    Within an epoch only: between two batches nothing else draws, so the random state
    saved is the one the next batch starts from. Around an epoch's end the loader starts
    a new pass, which draws its seed from the global state (one draw that a resume cannot
    place), and Lightning counts a resume from the last batch as the epoch done without
    its epoch-end hooks."""

    def __init__(self, epochs: Sequence[int], path: Callable[[int], Path], resume: Path) -> None:
        self.epochs, self.path, self.resume = set(epochs), path, resume
        self.batches_done, self.restored = 0, None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": torch.get_rng_state(), "batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.restored = state

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.restored is not None:  # before the loader's first batch: its order
            loader = trainer.train_dataloader
            if not isinstance(loader.sampler, EpochSeededSampler):
                raise RuntimeError(f"resuming needs an EpochSeededSampler, got {loader.sampler}")
            loader.sampler.skip_once(self.restored["batches_done"] * loader.batch_size)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.restored is not None:  # the loader has drawn its seed: the batch's draws
            torch.set_rng_state(self.restored["rng"])
            self.restored = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.batches_done = batch_idx + 1
        if (
            self.batches_done % RESUME_EVERY == 0
            and self.batches_done < trainer.num_training_batches
        ):
            _save_atomic(trainer.save_checkpoint, self.resume)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        e = trainer.current_epoch + 1
        if e in self.epochs:
            _save_atomic(lambda f: torch.save(pl_module.state_dict(), f), self.path(e))


def _cache_path(run: Run, name: str, at: int, epochs: int) -> Path:
    return run.cache / f"{name}-e{at}-of{epochs}.pt"


def cached(run: Run, name: str, at: int, epochs: int) -> bool:
    """Whether the shared model ``name`` after ``at`` of ``epochs`` epochs is on disk."""
    return _cache_path(run, name, at, epochs).exists()


def shared_model(
    run: Run,
    name: str,
    at: int | None = None,
    *,
    epochs: int | None = None,
    keep: Sequence[int] = (),
) -> pl.LightningModule:
    """The shared model ``name`` (see :func:`model_spec`), trained by its recipe's trainer
    for ``epochs`` (default: the spec's), after ``at`` epochs (default: all; 0: at
    initialisation), in eval mode. Epoch 1, the last and every epoch in ``keep`` are cached
    on the way, so later calls load instead of training; a training stopped on the way
    resumes from its last full checkpoint (fewer than 2 * :data:`RESUME_EVERY` batches
    back) and computes what the uninterrupted one would have (see :class:`_Checkpoints`)."""
    spec = model_spec(run, name)
    epochs = spec["epochs"] if epochs is None else epochs
    at = epochs if at is None else at

    def path(e: int) -> Path:
        return _cache_path(run, name, e, epochs)

    recipe = shared_recipe(run, name, f"--trainer.max_epochs={epochs}")  # seeds as `fit` does
    if recipe is None:
        raise RuntimeError(f"{name} needs --cifar-dir")
    module = recipe.model
    if at == 0:
        return module.eval()
    resume = run.cache / f"{name}-of{epochs}-resume.ckpt"
    if path(epochs).exists():
        resume.unlink(missing_ok=True)  # killed after the training ended: nothing to resume
    if not path(at).exists():
        ckpt = _resumable(run, resume, at)
        if ckpt is None:
            run.log(f"training {name} ({spec['recipe']}) for {epochs} epochs")
        else:
            step = ckpt["global_step"]
            run.log(f"resuming {name} ({spec['recipe']}) at optimiser step {step} of {resume}")
            run.results.setdefault("resumed_at_step", {})[name] = step
        t = time.time()
        recipe.trainer.callbacks.append(_Checkpoints({1, epochs, *keep}, path, resume))
        recipe.trainer.fit(
            module, datamodule=recipe.datamodule, ckpt_path=None if ckpt is None else resume
        )
        run.log(f"trained {name} in {time.time() - t:.0f} s")
        # with a resume: this process's part of the training
        run.results.setdefault("training_s", {})[name] = round(time.time() - t, 1)
        resume.unlink(missing_ok=True)
    module.load_state_dict(torch.load(path(at), weights_only=True))
    return module.eval()


def remembered(run: Run, key: str, compute: Callable[[], Any]) -> Any:
    """``compute()``'s JSON-able value, kept in ``run.cache`` under ``key``: a run stopped
    on the way and started again skips what it had finished (the cache knows nothing of
    code changes: clear it, or name another ``--cache``, after one)."""
    path = run.cache / f"{key}.json"
    if path.exists():
        run.log(f"cached: {path.name}")
        return json.loads(path.read_text())
    value = compute()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)
    return value


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
