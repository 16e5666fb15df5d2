"""NFKDistillationModule under bad input, round three: the cache never replaces a file it did
not write, fingerprints read every example, resumes with another teacher are refused, the
teacher keeps its dtype under ``bf16-true``, and bad arguments fail at construction."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_nfk.models import NFKDistillationModule, WideResNet
from lightning_nfk.models.teacher_targets import (
    TeacherTargets,
    data_fingerprint,
    is_cache_file,
)
from tests.models.test_distillation import EPS32, data, module, trainer


def _teacher_file(tmp_path, seed: int = 0, name: str = "teacher.pt"):
    torch.manual_seed(seed)
    path = tmp_path / name
    torch.save(WideResNet(10, 2, in_channels=1).state_dict(), path)
    return path


def _with_teacher(path, **kwargs) -> NFKDistillationModule:
    return module("nfkd", teacher_checkpoint=str(path), **kwargs)


# -- the cache ---------------------------------------------------------------------------------
def test_cache_path_that_is_the_teacher_checkpoint_is_refused_and_the_teacher_kept(tmp_path):
    path = _teacher_file(tmp_path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"`nfk_cache`.*is the `teacher_checkpoint` itself"):
        _with_teacher(path, nfk_cache=str(path))
    assert path.read_bytes() == before


@pytest.mark.parametrize("kind", ["state_dict", "text", "folder"])
def test_cache_path_holding_another_file_is_refused_and_left_alone(tmp_path, kind):
    teacher = _teacher_file(tmp_path)
    other = tmp_path / "other"
    if kind == "state_dict":
        torch.save({"w": torch.ones(3)}, other)
    elif kind == "text":
        other.write_text("my notes\n")
    else:
        other.mkdir()
    before = other.read_bytes() if other.is_file() else None
    match = "is a folder" if kind == "folder" else "exists and is not a lightning-nfk NFK cache"
    with pytest.raises(ValueError, match=match):
        _with_teacher(teacher, nfk_cache=str(other))
    if before is not None:
        assert other.read_bytes() == before


def test_own_cache_is_signed_and_replaced_when_stale(tmp_path):
    cache = tmp_path / "nfk.pt"
    m = _with_teacher(_teacher_file(tmp_path), nfk_cache=str(cache))
    trainer(limit_train_batches=1, limit_val_batches=1).fit(m, data(augment=False))
    assert is_cache_file(cache)
    # another teacher with the same cache path: accepted (a cache), refitted and replaced
    other = _teacher_file(tmp_path, seed=1, name="teacher1.pt")
    m2 = _with_teacher(other, nfk_cache=str(cache))
    with pytest.warns(UserWarning, match="another teacher"):
        trainer(limit_train_batches=1, limit_val_batches=1).fit(m2, data(augment=False))
    saved = torch.load(cache, weights_only=True)
    assert saved["format"] == "lightning-nfk teacher NFK cache"
    assert not torch.equal(saved["train"], m.teacher_targets.train.cpu())
    # a file put at the path between construction and the write is not replaced
    cache.unlink()
    cache.write_text("not mine")
    m3 = _with_teacher(other)
    m3.term.cache = str(cache)
    with pytest.warns(UserWarning, match="Could not write `nfk_cache`"):
        trainer(limit_train_batches=1, limit_val_batches=1).fit(m3, data(augment=False))
    assert cache.read_text() == "not mine"


# -- fingerprints ------------------------------------------------------------------------------
def test_fingerprint_reads_every_example_and_label():
    dm = data(augment=False)
    base = dm.dataset("train")
    reference = data_fingerprint(base)
    assert data_fingerprint(dm.dataset("train", augment=True)) == reference  # clean examples
    images, labels = base.images.clone(), base.labels.clone()
    images[5, 0, 3, 3] ^= 1  # one pixel of the 6th image, one grey level
    assert data_fingerprint(type(base)(images, base.labels, base.mean, base.std)) != reference
    labels[100] = (labels[100] + 1) % 10
    assert data_fingerprint(type(base)(base.images, labels, base.mean, base.std)) != reference
    # any other dataset: item by item, every one
    subset = torch.utils.data.Subset(base, range(len(base)))
    changed = torch.utils.data.Subset(
        type(base)(images, base.labels, base.mean, base.std), range(len(base))
    )
    assert data_fingerprint(subset) != data_fingerprint(changed)


def test_cache_is_refitted_when_one_training_image_changes(tmp_path):
    cache = tmp_path / "nfk.pt"
    teacher = _teacher_file(tmp_path)
    m = _with_teacher(teacher, nfk_cache=str(cache))
    dm = data(augment=False)
    trainer(limit_train_batches=1, limit_val_batches=1).fit(m, dm)
    dm2 = data(augment=False)
    dm2.setup()
    x, y, index = dm2._splits["train"]
    x = x.clone()
    x[5] = 255 - x[5]  # another 6th image, the same number of images
    dm2._splits["train"] = (x, y, index)
    m2 = _with_teacher(teacher, nfk_cache=str(cache))
    with pytest.warns(UserWarning, match="another fitting set"):
        trainer(limit_train_batches=1, limit_val_batches=1).fit(m2, dm2)
    assert m2.teacher_targets.seconds > 0  # fitted, not read
    a, b = m.teacher_targets.train[5], m2.teacher_targets.train[5]
    assert not torch.allclose(a.abs(), b.abs(), rtol=1e-3)  # row 5: the new image's target


# -- resuming ----------------------------------------------------------------------------------
def _fit_with_checkpoint(m, tmp_path, epochs: int, ckpt_path=None):
    t = trainer(
        tmp_path,
        max_epochs=epochs,
        limit_train_batches=2,
        limit_val_batches=1,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
    )
    t.fit(m, data(augment=False), ckpt_path=ckpt_path)
    return tmp_path / "ckpt" / "last.ckpt"


def test_resume_with_another_teacher_is_refused(tmp_path):
    last = _fit_with_checkpoint(_with_teacher(_teacher_file(tmp_path)), tmp_path, 1)
    other = _with_teacher(_teacher_file(tmp_path, seed=1, name="teacher1.pt"))
    before = copy.deepcopy(other.teacher.state_dict())
    with pytest.raises(ValueError, match="trained with another teacher than `teacher_checkpoint`"):
        _fit_with_checkpoint(other, tmp_path, 2, ckpt_path=str(last))
    after = other.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after)  # not silently reverted
    # the same teacher resumes
    same = _with_teacher(tmp_path / "teacher.pt")
    _fit_with_checkpoint(same, tmp_path, 2, ckpt_path=str(last))
    assert same.teacher_targets.seconds == 0  # the tables came with the checkpoint


# -- precision ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["nfkd", "kd"])
def test_bf16_true_keeps_the_teacher_in_float32_bit_identical(tmp_path, mode):
    path = _teacher_file(tmp_path)
    reference = torch.load(path, weights_only=True)

    def run(precision: str):
        pl.seed_everything(0)
        m = module(mode, teacher_checkpoint=str(path))
        trainer(limit_train_batches=2, limit_val_batches=1, precision=precision).fit(
            m, data(augment=False)
        )
        return m

    m = run("bf16-true")
    assert next(m.student.parameters()).dtype == torch.bfloat16  # the student converted
    state = m.teacher.state_dict()
    assert all(state[k].dtype == reference[k].dtype for k in reference)
    assert all(torch.equal(state[k].cpu(), reference[k]) for k in reference)
    assert torch.isfinite(m.trainer.logged_metrics["train/loss"])
    if mode == "nfkd":  # the targets: the float32 teacher's, as in a 32-true run
        fp32 = run("32-true").teacher_targets.train
        got = m.teacher_targets.train
        assert got.dtype == torch.float32
        assert torch.allclose(got, fp32, rtol=0, atol=1e3 * EPS32 * float(fp32.abs().max()))


# -- arguments ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": float("inf")}, "`temperature` must be a positive finite number"),
        ({"temperature": float("nan")}, "`temperature` must be a positive finite number"),
        ({"alpha": True}, r"`alpha` must be a number in \[0, 1\], got True"),
        ({"mode": "kd", "temperature": True}, "`temperature` must be a positive finite"),
    ],
)
def test_bad_arguments_round_three(kwargs, match):
    with pytest.raises(ValueError, match=match):
        module(**{"mode": "nfkd", **kwargs})


def test_three_channel_teacher_on_one_channel_data_is_named_at_setup():
    torch.manual_seed(0)
    m = NFKDistillationModule(
        WideResNet(10, 1, in_channels=1),
        WideResNet(10, 2, in_channels=3),
        mode="kd",
        k=4,
        oversample=4,
    )
    with pytest.raises(ValueError, match=r"The teacher \(WideResNet\) cannot read .*\(1, 8, 8\)"):
        trainer(limit_train_batches=1).fit(m, data())


def test_empty_teacher_checkpoint_says_so(tmp_path):
    path = tmp_path / "empty.ckpt"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"is empty \(0 bytes\)"):
        _with_teacher(path)


def test_corrupted_teacher_checkpoint_is_refused(tmp_path):
    path = _teacher_file(tmp_path)
    raw = bytearray(path.read_bytes())
    # flip bytes inside the weights (a record after data.pkl: the tensors' storage)
    start = raw.index(b"data/0") + 200
    for i in range(start, start + 16):
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="fails its CRC-32 check"):
        _with_teacher(path)


def test_non_finite_teacher_weights_are_refused(tmp_path):
    path = _teacher_file(tmp_path)
    state = torch.load(path, weights_only=True)
    state["fc.weight"][0, 0] = float("nan")
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"non-finite values in 1 tensors.*fc\.weight"):
        _with_teacher(path)


def test_teacher_checkpoint_may_name_a_recipes_run_folder(tmp_path):
    runs = tmp_path / "lightning_logs" / "teacher"
    for n, seed in ((0, 0), (1, 1)):
        (runs / f"version_{n}" / "checkpoints").mkdir(parents=True)
        _teacher_file(runs / f"version_{n}" / "checkpoints", seed=seed, name="last.ckpt")
    m = _with_teacher(runs)
    assert m.teacher_file.endswith("version_1/checkpoints/last.ckpt")  # the newest
    expected = torch.load(runs / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.equal(m.teacher.state_dict()[k], v) for k, v in expected.items())
    with pytest.raises(ValueError, match=r"folder without a run.s checkpoints/last\.ckpt"):
        _with_teacher(tmp_path / "lightning_logs")


def test_tables_of_the_old_16_item_fingerprint_never_match():
    targets = TeacherTargets(WideResNet(10, 2, in_channels=1), module().term.config)
    targets.fingerprint = torch.tensor([160.0, 1.0], dtype=torch.float64)  # a v1 checkpoint
    assert not targets.matches(data_fingerprint(data().dataset("train")))
