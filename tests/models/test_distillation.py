"""NFKDistillationModule: the three modes, the teacher's targets against LowRankNFK, a frozen
teacher, checkpoints and resumption, and refusals before training.

Tiny WRNs on 8x8 synthetic images keep every fit to seconds. Tolerances: an embedding is a
sum over the teacher's P parameters in float32; computed in another order (other chunks,
the last pass's rows times the Ritz coefficients instead of V_x P directly) it moves by
about sqrt(P) eps |e|; ``_close`` allows 1e3 eps times the largest |e| (P is about 1e4).
"""

from __future__ import annotations

import csv
import functools
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import nn

from lightning_nfk.data import UNLABELED
from lightning_nfk.kernel import ClassifierEnergy, LowRankNFK
from lightning_nfk.models import ClassifierModule, NFKDistillationModule, WideResNet
from lightning_nfk.models.distillation import UNLABELED as MODULE_UNLABELED
from lightning_nfk.models.teacher_targets import TeacherTargets, trainable
from lightning_nfk.trainer_utils import stack_items
from tests.helpers.data import RandomImageDataModule

EPS32 = torch.finfo(torch.float32).eps


def _close(a: torch.Tensor, b: torch.Tensor, factor: float = 1e3) -> bool:
    return torch.allclose(a, b, rtol=0, atol=factor * EPS32 * float(b.abs().max()))


def _align_signs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` with each column's sign chosen to match ``b`` (components are defined up to sign)."""
    return a * torch.sign((a * b).sum(dim=0, keepdim=True))


def data(**kwargs) -> RandomImageDataModule:
    kwargs = {
        "shape": (1, 8, 8),
        "num_train": 160,
        "num_test": 64,
        "val_size": 32,
        "batch_size": 32,
        "with_index": True,
        "augment": True,
        **kwargs,
    }
    return RandomImageDataModule(**kwargs)


def module(mode: str = "nfkd", teacher_classes: int = 10, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    teacher = WideResNet(10, 2, num_classes=teacher_classes, in_channels=1)
    student = WideResNet(10, 1, in_channels=1)
    kwargs = {
        "k": 4,
        "oversample": 4,
        "n_iter": 2,
        "optimizer": functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
        **kwargs,
    }
    return NFKDistillationModule(student, teacher, mode=mode, **kwargs)


def trainer(tmp_path: Path | None = None, **kwargs) -> pl.Trainer:
    kwargs = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        **kwargs,
    }
    return pl.Trainer(**kwargs)


def test_wrn_parameter_counts():
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(WideResNet(40, 2)) == 2_243_546
    assert count(WideResNet(16, 1)) == 175_066


@pytest.mark.parametrize(
    "mode, targets",
    [("nfkd", "precomputed"), ("nfkd", "online"), ("kd", "precomputed"), ("none", "precomputed")],
)
def test_each_mode_trains_the_student_and_leaves_the_teacher_alone(mode, targets):
    m = module(mode, targets=targets)
    teacher_before = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    student_before = [p.detach().clone() for p in m.student.parameters()]
    t = trainer(limit_train_batches=2, limit_val_batches=1)
    t.fit(m, data())
    # the teacher: bit-identical weights and BatchNorm statistics, eval mode, frozen
    after = m.teacher.state_dict()
    assert all(torch.equal(teacher_before[k], after[k]) for k in after)
    assert not m.teacher.training and m.student.training
    assert not any(p.requires_grad for p in m.teacher.parameters())
    in_optimizer = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in m.teacher.parameters()}
    assert {id(p) for p in m.student.parameters()} <= in_optimizer
    assert not t.optimizers[0].state.keys() & set(m.teacher.parameters())
    # the student learnt
    assert any(not torch.equal(a, b) for a, b in zip(student_before, m.student.parameters()))
    metrics = t.logged_metrics
    assert torch.isfinite(metrics["train/loss"]) and "val/acc" in metrics
    term = {"nfkd": "train/nfkd", "kd": "train/kd", "none": "train/ce"}[mode]
    assert term in metrics and "train/ce" in metrics
    if mode == "nfkd":
        assert "nfkd/target_r2" in metrics and "nfkd/target_cos" in metrics
        assert m.head is not None and m.head.out_features == 4
    t.test(m, data())
    assert 0 <= t.logged_metrics["test/acc"] <= 1


def test_the_head_metrics_are_the_whole_validation_epochs():
    """``nfkd/target_r2`` (variance-weighted) and ``nfkd/target_cos`` (the mean cosine) of
    the head's outputs against the validation targets, over the epoch's two batches,
    against a float64 computation of their definitions (float32 inputs: 1e-5)."""
    m, dm = module("nfkd"), data(val_size=64)
    t = trainer(limit_train_batches=2)
    t.fit(m, dm)
    m.eval()
    hs, qs = [], []
    with torch.no_grad():
        for batch in dm.val_dataloader():
            hs.append(m.head(m.student.features(batch[0])).double())
            qs.append(m.term.batch_targets(batch, "val").double())
    h, q = torch.cat(hs), torch.cat(qs)
    assert len(h) == 64
    r2 = 1 - ((q - h) ** 2).sum() / ((q - q.mean(0)) ** 2).sum()
    cos = ((h * q).sum(1) / (h.norm(dim=1) * q.norm(dim=1))).mean()
    logged = t.logged_metrics
    assert abs(float(logged["nfkd/target_r2"]) - float(r2)) <= 1e-5 * max(1.0, abs(float(r2)))
    assert abs(float(logged["nfkd/target_cos"]) - float(cos)) <= 1e-5


def test_kd_loss_is_hintons():
    m = module("kd", alpha=0.3, temperature=2.0)
    torch.manual_seed(1)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    m.log = lambda *a, **k: None
    loss = m.training_step((x, y), 0)
    s, t = m.student(x), m.teacher(x)
    p_t = torch.softmax(t / 2, dim=1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s / 2, dim=1))).sum(dim=1).mean()
    expected = 0.3 * nn.functional.cross_entropy(s, y) + 0.7 * 4 * kl
    assert torch.allclose(loss, expected, rtol=1e-5)


def _fitted(mode_targets: str = "precomputed", **kwargs):
    m, dm = module("nfkd", targets=mode_targets, **kwargs), data(augment=False)
    trainer(limit_train_batches=1, limit_val_batches=1).fit(m, dm)
    return m, dm


def test_precomputed_targets_are_the_teachers_embeddings():
    m, dm = _fitted()
    train = dm.dataset("train")
    x, _ = stack_items(train, torch.arange(len(train)))
    table = m.teacher_targets.train
    assert table.shape == (128, 4)  # 160 images, 32 held out for validation
    assert m.teacher_targets.nfk is None  # precomputed: the components are not kept
    # an independent fit of the same teacher on the stacked images, same settings; the
    # same algorithm with the rows chunked differently: n_iter = 2 leaves the Ritz vectors
    # sensitive to round-off, hence 1e4 eps (signs: components are defined up to sign)
    with trainable(m.teacher):
        nfk = LowRankNFK(ClassifierEnergy(m.teacher), m.term.config).fit(x)
    reference = nfk.transform(x)
    assert _close(_align_signs(table, reference), reference, factor=1e4)
    # validation targets: the same NFK on the validation split
    val = dm.dataset("val")
    xv, _ = stack_items(val, torch.arange(len(val)))
    reference_val = nfk.transform(xv)
    assert _close(_align_signs(m.teacher_targets.val, reference_val), reference_val, factor=1e4)
    # standardised targets have unit mean square per component over the fitting set
    rms = m.teacher_targets.rms
    assert torch.allclose((table / rms).square().mean(dim=0), torch.ones(4), rtol=1e-4)


def test_a_fit_made_elsewhere_is_used_with_its_scale():
    m = module("nfkd", targets="online")
    tt: TeacherTargets = m.teacher_targets
    x = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with trainable(m.teacher):
        nfk = LowRankNFK(ClassifierEnergy(m.teacher), m.term.config)
        with pytest.raises(ValueError, match=r"`nfk` must be fitted"):
            tt.use_fit(nfk, torch.zeros(40, 4))
        table = nfk.fit_transform(x)
    with pytest.raises(
        ValueError, match=r"`train` must be \(rows, k=4\) embeddings, got shape \(40, 3\)"
    ):
        tt.use_fit(nfk, table[:, :3])
    with pytest.raises(
        ValueError, match=r"`val` must be \(rows, k=4\) embeddings, got shape \(5,\)"
    ):
        tt.use_fit(nfk, table, torch.zeros(5))
    with trainable(m.teacher):
        other = LowRankNFK(ClassifierEnergy(m.teacher), m.term.config, k=3).fit(x)
    with pytest.raises(ValueError, match=r"`nfk` must have these targets' k=4 components, got 3"):
        tt.use_fit(other, table)
    assert tt.use_fit(nfk, table) is tt and tt.is_ready
    # the scale: sigma_i / sqrt(N), so the standardised table has unit mean square
    expected = nfk.singular_values.double() / 40**0.5
    torch.testing.assert_close(tt.rms.double(), expected, rtol=1e-6, atol=0)
    mean_square = tt.standardized(table).square().mean(dim=0)
    torch.testing.assert_close(mean_square, torch.ones(4), rtol=1e-4, atol=0)


def test_online_targets_equal_precomputed_on_clean_images():
    online, dm = _fitted("online")
    pre, _ = _fitted("precomputed")
    train = dm.dataset("train")
    idx = torch.arange(0, 128, 7)
    x, _ = stack_items(train, idx)
    batch = (x, torch.zeros(len(idx), dtype=torch.long), idx)
    q_online = online.term.batch_targets(batch[:2], "train")  # no index: computed from x
    q_pre = pre.term.batch_targets(batch, "train")  # looked up by index
    assert _close(q_online, q_pre)


def test_cache_is_reused_and_refused_for_another_teacher(tmp_path, monkeypatch):
    cache = tmp_path / "nfk.pt"
    first, _ = _fitted("online", nfk_cache=str(cache))
    assert cache.exists() and first.teacher_targets.nfk is not None

    def no_fit(*args, **kwargs):
        raise AssertionError("fitted again although the cache applies")

    with monkeypatch.context() as patch:
        patch.setattr("lightning_nfk.models.teacher_targets.TeacherTargets.fit", no_fit)
        second, _ = _fitted("online", nfk_cache=str(cache))
    assert torch.equal(second.teacher_targets.train, first.teacher_targets.train)
    x = torch.randn(5, 1, 8, 8)
    assert _close(second.teacher_targets.embed(x), first.teacher_targets.embed(x))
    with pytest.warns(UserWarning, match="another teacher"):
        third = module("nfkd", seed=3, nfk_cache=str(cache))
        trainer(limit_train_batches=1, limit_val_batches=1).fit(third, data(augment=False))
    assert not torch.equal(third.teacher_targets.train, first.teacher_targets.train)


def test_the_teacher_loader_reads_with_the_data_modules_workers():
    dataset = torch.utils.data.TensorDataset(torch.zeros(10, 2))

    def trainer(datamodule, device: str):
        strategy = SimpleNamespace(root_device=torch.device(device))
        return SimpleNamespace(
            datamodule=datamodule, strategy=strategy, global_rank=1, world_size=2
        )

    loader = TeacherTargets._shard_loader(
        trainer(SimpleNamespace(num_workers=1), "cpu"), dataset, 4
    )
    assert loader.num_workers == 1 and loader.persistent_workers and not loader.pin_memory
    assert list(loader.dataset.indices) == [5, 6, 7, 8, 9]  # this rank's shard, in order
    loader = TeacherTargets._shard_loader(trainer(None, "cuda"), dataset, 4)
    assert loader.num_workers == 0 and loader.pin_memory


def _losses(version_dir: Path) -> dict[int, float]:
    with open(version_dir / "metrics.csv") as f:
        return {
            int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r["train/loss"]
        }


def test_resume_gives_the_same_loss_curve_without_refitting(tmp_path):
    def run(name: str, epochs: int, ckpt_path: str | None = None):
        pl.seed_everything(0)
        m = module("nfkd")
        t = trainer(
            max_epochs=epochs,
            logger=CSVLogger(tmp_path, name=name),
            log_every_n_steps=1,
            enable_checkpointing=True,
            callbacks=[ModelCheckpoint(dirpath=tmp_path / name / "ckpt", save_last=True)],
        )
        t.fit(m, data(augment=False), ckpt_path=ckpt_path)
        return m, t

    _, whole = run("whole", 2)
    first, _ = run("part", 1)
    last = tmp_path / "part" / "ckpt" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    tables = checkpoint["nfk_distillation_targets"]
    assert tables["train"].shape == (128, 4)
    # small: no teacher NFK components in it, only the tables
    assert not any("components" in key for key in checkpoint["state_dict"])
    resumed, _ = run("part", 2, ckpt_path=str(last))
    assert resumed.teacher_targets.seconds == 0  # tables from the checkpoint, no refit
    assert torch.equal(resumed.teacher_targets.train, first.teacher_targets.train)
    a = _losses(Path(whole.logger.log_dir))
    b = {**_losses(tmp_path / "part" / "version_0"), **_losses(tmp_path / "part" / "version_1")}
    assert sorted(a) == sorted(b) and len(a) == 8
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-4 * abs(a[step]), (step, a[step], b[step])


# -- refusals before training -------------------------------------------------------------------
def _refused(m, dm, match, exc=ValueError):
    before = [p.detach().clone() for p in m.student.parameters()]
    with pytest.raises(exc, match=match):
        trainer(limit_train_batches=2).fit(m, dm)
    assert all(torch.equal(a, b) for a, b in zip(before, m.student.parameters()))


def test_refuses_a_teacher_with_other_classes():
    _refused(module("kd", teacher_classes=5), data(), "teacher has 5 outputs")


def test_refuses_k_beyond_the_fitting_set():
    _refused(module("nfkd", k=200), data(), r"`k` \+ `oversample` \(200 \+ 4 = 204\).*min\(128")


def test_refuses_precomputed_targets_without_indices():
    _refused(module("nfkd"), data(with_index=False), "with_index")
    # the other modes do not need them
    trainer(limit_train_batches=1, limit_val_batches=0).fit(module("kd"), data(with_index=False))


def test_refuses_bare_loaders_in_nfkd_mode():
    dm = data()
    dm.setup()
    loader = torch.utils.data.DataLoader(dm.dataset("train"), batch_size=32)
    m = module("nfkd")
    with pytest.raises(ValueError, match="data module with a `dataset"):
        trainer(limit_train_batches=1).fit(m, loader)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "fitnet"}, "`mode` must be one of"),
        ({"teacher_loss": "l1"}, "`teacher_loss`"),
        ({"targets": "cached"}, "`targets`"),
        ({"alpha": 1.5}, "`alpha` must be a number in"),
        ({"temperature": 0}, "`temperature`"),
        ({"k": 0}, "`k`"),
    ],
)
def test_bad_arguments(kwargs, match):
    mode = kwargs.pop("mode", "nfkd")
    with pytest.raises(ValueError, match=match):
        module(mode, **kwargs)


def test_student_needs_features_and_fc():
    with pytest.raises(TypeError, match="features"):
        NFKDistillationModule(nn.Linear(4, 10), WideResNet(10, 1))


def test_teacher_checkpoint_from_a_classifier_module(tmp_path):
    torch.manual_seed(0)
    net = WideResNet(10, 2, in_channels=1)
    classifier = ClassifierModule(net)
    path = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": classifier.state_dict()}, path)
    m = module("kd", teacher_checkpoint=str(path))
    assert all(
        torch.equal(a, b)
        for a, b in zip(m.teacher.state_dict().values(), net.state_dict().values())
    )
    # another number of classes: refused at construction, naming the shapes
    torch.save(
        {
            "state_dict": ClassifierModule(
                WideResNet(10, 2, num_classes=5, in_channels=1)
            ).state_dict()
        },
        path,
    )
    with pytest.raises(ValueError, match="another number of classes"):
        module("kd", teacher_checkpoint=str(path))
    with pytest.raises(FileNotFoundError, match="teacher_checkpoint"):
        module("kd", teacher_checkpoint=str(tmp_path / "missing.ckpt"))


def test_low_label_split_trains_on_the_budget_with_train_indices():
    dm = data(num_labels=20, train_split="labeled", augment=False)
    dm.setup()
    loader = dm.train_dataloader()
    assert len(loader.dataset) == 20
    x, y, i = loader.dataset[3]
    x_train, y_train, i_train = dm.dataset("train")[int(i)]
    assert torch.equal(x, x_train) and int(y) == int(y_train) and int(i_train) == int(i)
    m = module("nfkd")
    trainer(limit_train_batches=1, limit_val_batches=1).fit(m, dm)
    assert m.teacher_targets.train.shape[0] == 128  # fitted on the whole (unlabelled) split


def test_semi_split_hides_the_labels_outside_the_budget():
    dm = data(num_labels=20, train_split="semi", augment=False)
    dm.setup()
    semi, train, labeled = dm.dataset("semi"), dm.dataset("train"), dm.dataset("labeled")
    assert len(dm.train_dataloader().dataset) == len(train) == 128
    torch.testing.assert_close(semi.images, train.images, rtol=0, atol=0)
    known = semi.labels != UNLABELED
    assert int(known.sum()) == 20 and set(semi.labels[~known].tolist()) == {UNLABELED}
    # the labelled ones are the budget's, at their positions in the training split
    assert semi.labels[labeled.indices].tolist() == labeled.labels.tolist()
    assert semi.indices.tolist() == train.indices.tolist()
    assert UNLABELED == MODULE_UNLABELED  # the models' copy of the data room's constant


def test_the_cross_entropy_counts_labelled_images_only():
    m = module("none")
    m.log = lambda *a, **k: None  # no trainer: logging is not what is tested
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([3, UNLABELED, 1, UNLABELED, UNLABELED, 7])
    loss = m.training_step((x, y, torch.arange(6)), 0)
    keep = y != UNLABELED
    expected = torch.nn.functional.cross_entropy(m.student(x)[keep], y[keep])
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    none = m.training_step((x, torch.full((6,), UNLABELED), torch.arange(6)), 0)
    assert float(none.detach()) == 0.0  # no label in the batch: no cross-entropy, not NaN


def test_nfkd_trains_on_every_image_with_a_label_budget():
    dm = data(num_labels=20, train_split="semi")
    m = module("nfkd")
    t = trainer(limit_train_batches=2, limit_val_batches=1)
    t.fit(m, dm)
    assert torch.isfinite(t.callback_metrics["train/loss"])
    assert m.teacher_targets.train.shape[0] == 128


def test_the_classifier_refuses_the_semi_split(tmp_path):
    with pytest.raises(ValueError, match=r"ClassifierModule trains on labels only"):
        trainer(tmp_path, limit_train_batches=1).fit(
            ClassifierModule(WideResNet(10, 1, in_channels=1)),
            data(num_labels=20, train_split="semi"),
        )
