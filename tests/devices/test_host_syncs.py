"""Per-step paths without host syncs or host/device copies, checked on the CPU.

The emulation: the module sits on the ``meta`` device, which stands for the accelerator.
A host sync (``.item()``, ``.cpu()``, ``.tolist()``) then fails loudly ("cannot be called
on meta tensors", "cannot copy out of meta tensor"), and a spy at the dispatcher records
every copy between devices (a table or components left on the CPU and copied per step)
and every read of a value to the host. What runs on ``meta`` is the real code path: the
teacher's per-example gradients, the products, the table lookups, the scaling.

On a GPU, ``tests/cuda`` checks the same with ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_nfk.kernel import ClassifierEnergy, LowRankNFK, NonFiniteGradientError
from lightning_nfk.models import NFKDistillationModule, WideResNet
from lightning_nfk.models.teacher_targets import trainable
from tests.helpers.data import RandomImageDataModule
from tests.helpers.models import make_case

META = torch.device("meta")


class HostTraffic(TorchDispatchMode):
    """Records reads of a value to the host and copies between devices."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in args if isinstance(a, torch.Tensor)]
        if func is torch.ops.aten._local_scalar_dense.default:
            self.events.append("read to the host (.item())")
        elif func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            devices = {t.device for t in inputs} | {out.device}
            if len(devices) > 1:
                shapes = [tuple(t.shape) for t in inputs]
                self.events.append(f"copy {sorted(map(str, devices))} of {shapes}")
        return out


@contextmanager
def no_host_traffic() -> Iterator[HostTraffic]:
    with HostTraffic() as spy:
        yield spy
    assert not spy.events, spy.events


# -- LowRankNFK.transform ----------------------------------------------------------------------
def _saved_cnn_nfk(tmp_path):
    case = make_case("cnn", n=40)
    nfk = LowRankNFK(case.energy, k=3, oversample=3, n_iter=1).fit(case.x)
    nfk.save(tmp_path / "nfk.pt")
    return case, nfk


def test_transform_moves_the_components_once_at_load_and_never_syncs(tmp_path):
    case, _ = _saved_cnn_nfk(tmp_path)
    energy = ClassifierEnergy(case.energy.module.to(META))  # the module on the "accelerator"
    loaded = LowRankNFK.load(tmp_path / "nfk.pt", energy, map_location="cpu")
    assert loaded.components.device == META and loaded.components.dtype == torch.float64
    x = case.x_new.to(META)
    with no_host_traffic():
        for _ in range(2):  # per call: no copy of the components, no read of a value
            out = loaded.transform(x, check_finite=False)
    assert out.device == META and out.shape == (len(x), 3)
    # the default checks the rows: a read to the host, which the emulation refuses
    with pytest.raises(RuntimeError, match="meta"):
        loaded.transform(x)


def test_transform_without_the_finite_check_returns_the_bad_rows(tmp_path):
    case, nfk = _saved_cnn_nfk(tmp_path)
    x = case.x_new.clone()
    x[1] = float("nan")
    with pytest.raises(NonFiniteGradientError, match=r"1 of 8 inputs have non-finite"):
        nfk.transform(x)
    out = nfk.transform(x, check_finite=False)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, *range(2, 8)]]).all()
    # the flag skips the check only: on finite inputs the same computation, bit for bit
    clean = case.x_new
    assert torch.equal(nfk.transform(clean, check_finite=False), nfk.transform(clean))
    # and a NaN row leaves the others alone (other batch size: float64 round-off only)
    want = nfk.transform(clean[[0, 2]])
    eps = torch.finfo(want.dtype).eps
    torch.testing.assert_close(out[[0, 2]], want, rtol=0, atol=64 * eps * float(want.abs().max()))


# -- distillation targets ----------------------------------------------------------------------
def _data() -> RandomImageDataModule:
    return RandomImageDataModule(
        shape=(1, 8, 8), num_train=96, num_test=32, val_size=32, batch_size=32, with_index=True
    )


def _module(targets: str) -> NFKDistillationModule:
    torch.manual_seed(0)
    return NFKDistillationModule(
        WideResNet(10, 1, in_channels=1),
        WideResNet(10, 2, in_channels=1),
        targets=targets,
        k=4,
        oversample=4,
        n_iter=1,
        optimizer=functools.partial(torch.optim.SGD, lr=0.05),
    )


def _fitted(targets: str):
    import pytorch_lightning as pl

    m, dm = _module(targets), _data()
    pl.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(m, dm)
    return m, dm


def _step_targets(m: NFKDistillationModule, batch: tuple) -> torch.Tensor:
    """What a training step computes from the targets: the scaled targets and the loss."""
    features = m.student.features(batch[0])
    return m.term.loss(batch, features, m.student.fc(features))[0]


def test_precomputed_targets_live_on_the_device_and_are_looked_up_there():
    m, dm = _fitted("precomputed")
    tables = m.teacher_targets.tables()
    assert all(t.device.type == "cpu" for t in (tables["train"], tables["rms"]))  # checkpoint
    # a resumed run: the checkpoint's tables (on the CPU) and the module on the device
    resumed = _module("precomputed")
    resumed.on_load_checkpoint({"nfk_distillation_targets": tables})
    resumed.to(META)
    resumed.trainer = SimpleNamespace(datamodule=dm)
    resumed.on_fit_start()  # no refit (the same split); the tables moved once
    tt = resumed.teacher_targets
    assert tt.train.device == META and tt.val.device == META and tt.rms.device == META
    index = torch.tensor([5, 0, 17, 3], device="cpu").to(META)
    batch = (torch.zeros(4, 1, 8, 8, device=META), torch.zeros(4, dtype=torch.long), index)
    with no_host_traffic():
        loss = _step_targets(resumed, batch)
    assert loss.device == META and loss.shape == ()
    # validation after a restore, without fit: `on_validation_start` moves them
    validating = _module("precomputed")
    validating.on_load_checkpoint({"nfk_distillation_targets": tables})
    validating.to(META).on_validation_start()
    assert validating.teacher_targets.val.device == META


def test_online_targets_have_no_host_sync():
    m, _ = _fitted("online")
    state = m.teacher_targets.nfk.state_dict()
    m.to(META)
    # the teacher's NFK read onto the device, as from an `nfk_cache` (map_location="cpu")
    with trainable(m.teacher):
        nfk = LowRankNFK(ClassifierEnergy(m.teacher), m.term.config)
        nfk.load_state_dict(state)
    m.teacher_targets.nfk = nfk
    m.teacher_targets.to(META)
    x = torch.zeros(4, 1, 8, 8, device=META)
    with no_host_traffic():
        loss = _step_targets(m, (x, torch.zeros(4, dtype=torch.long, device=META)))
    assert loss.device == META and loss.shape == ()
    assert not any(p.requires_grad for p in m.teacher.parameters())  # restored after


# -- the modules' training and validation steps, accuracy included ------------------------------
@pytest.mark.parametrize("which", ["classifier", "kd-semi", "vae", "lm"])
def test_training_and_validation_steps_have_no_host_sync(which):
    """The steps as Lightning calls them, the accuracy's update included (torchmetrics'
    ``MulticlassAccuracy`` fails the semi case here: under ``ignore_index`` a boolean
    selection reads the labels on the host; on CUDA its argument check's ``unique`` and
    its ``bincount`` read them too, which the emulation does not show)."""
    from lightning_nfk.models import GPT, CausalLMModule, ClassifierModule, ConvVAE, VAEModule

    torch.manual_seed(0)
    if which == "lm":  # the masked token mean: its count clamped, not tested on the host
        lm = CausalLMModule(GPT(vocab_size=16, context=8, dim=8, depth=1, heads=2)).to(META)
        ids = torch.zeros(2, 8, dtype=torch.long, device=META)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}  # padded batches
        with no_host_traffic():
            loss = lm.training_step(batch, 0)
            lm.validation_step(ids, 0)
        assert loss.device == META and loss.shape == ()
        return
    if which == "vae":  # the ELBO's noise drawn on the device, each rank's rows of one draw
        vae = VAEModule(ConvVAE(latent_dim=4, width=8)).to(META)
        x = torch.zeros(4, 1, 28, 28, device=META)
        with no_host_traffic():
            loss = vae.training_step((x,), 0)
            vae.validation_step((x,), 0)
        assert loss.device == META and loss.shape == ()
        return
    if which == "classifier":
        m = ClassifierModule(WideResNet(10, 1, in_channels=1), num_classes=10)
        y = torch.zeros(4, dtype=torch.long, device=META)
    else:  # the label budget with every image: -1 marks the unlabelled ones
        student, teacher = WideResNet(10, 1, in_channels=1), WideResNet(10, 2, in_channels=1)
        m = NFKDistillationModule(student, teacher, mode="kd")
        y = torch.full((4,), -1, dtype=torch.long, device=META)
    m.to(META)
    x = torch.zeros(4, 1, 8, 8, device=META)
    with no_host_traffic():
        loss = m.training_step((x, y, torch.arange(4, device=META)), 0)
        m.validation_step((x, y.clamp_min(0), torch.arange(4, device=META)), 0)
    assert loss.device == META and loss.shape == ()
    assert m.train_acc.total.device == META and m.val_acc.correct.device == META


def test_nfkd_training_and_validation_steps_have_no_host_sync():
    """NFKD's steps as Lightning calls them: the accuracy, the loss on the precomputed
    targets, and the validation metrics of the head's fit (R^2, cosine). Called, rather
    than updated, torchmetrics' ``R2Score`` computes the batch's value and reads its count
    on the host, which this test caught."""
    m, _ = _fitted("precomputed")
    m.trainer = None  # outside a loop: `log` is a no-op
    m.to(META).on_validation_start()
    x, y = torch.zeros(4, 1, 8, 8, device=META), torch.zeros(4, dtype=torch.long, device=META)
    index = torch.tensor([5, 0, 17, 3], device="cpu").to(META)
    with no_host_traffic():
        loss = m.training_step((x, y, index), 0)
        m.validation_step((x, y, index), 0)
    assert loss.device == META and loss.shape == ()
    assert m.term.val_r2.residual.device == META and m.term.val_cos.preds[0].device == META


@pytest.mark.parametrize("design", ["dcgan", "afv"])
def test_gan_training_and_validation_steps_have_no_host_sync(design):
    """The GAN's manual step (both losses, both backward passes, the zero-weight term that
    reaches every parameter, the moving average) on ``meta``. The optimizers' own steps are
    stand-ins: torch's Adam reads its step count on the host by design (a CPU tensor on a
    GPU too, so no sync there), which the spy would report on ``meta``."""
    from lightning_nfk.models import (
        DCGANDiscriminator,
        DCGANGenerator,
        GANModule,
        ResNetDiscriminator,
        ResNetGenerator,
    )

    torch.manual_seed(0)
    if design == "dcgan":
        g, d = DCGANGenerator(latent_dim=8, width=8), DCGANDiscriminator(width=8)
        m = GANModule(g, d, latent_dim=8)
    else:  # spectral norm, least squares, the generator's moving average
        g = ResNetGenerator(latent_dim=8, channels=1, width=8, image_size=28)
        d = ResNetDiscriminator(channels=1, width=8, image_size=28)
        m = GANModule(g, d, latent_dim=8, loss="lsgan", ema_decay=0.9)
    m.to(META)
    steps = []
    stand_in = SimpleNamespace(zero_grad=lambda: None, step=lambda: steps.append(1))
    m.optimizers = lambda: (stand_in, stand_in)
    m.manual_backward = lambda loss: loss.backward()
    m.trainer = SimpleNamespace(world_size=1, global_rank=0)
    m.log = m.log_dict = lambda *args, **kwargs: None
    x = torch.zeros(4, 1, 28, 28, device=META)
    with no_host_traffic():
        m.training_step((x,), 0)
        m.validation_step((x,), 0)
    assert len(steps) == 2
    assert all(p.grad is not None and p.grad.device == META for p in m.discriminator.parameters())
