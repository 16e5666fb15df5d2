"""The callbacks through the CLI on one GPU: the quickstart recipe (spectrum and probe
callbacks) with ``--trainer.accelerator=gpu --trainer.devices=1`` in each precision, on the
small slice of tests/helpers/processes.py, under its watchdog.

Fashion-MNIST comes from where the recipe finds it (the Debian package's folder); where it
is absent (a bare GPU machine) the same recipe reads synthetic images of its shape.

With ``lr = 0`` the weights stay as initialised (LeNet-5 has no BatchNorm statistics to
move), so under mixed precision, where the weights stay float32, the NFK figures must equal
the ``32-true`` run's: the kernel computes in float32 whatever the trainer's precision.
``bf16-true`` rounds the weights themselves to bfloat16: only finite figures are asked of it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from lightning_nfk.data import FashionMNISTDataModule
from tests.helpers.processes import QUICKSTART, REPO, SMALL, logged_metrics, run_cli

pytestmark = pytest.mark.cuda

FROZEN = ["--model.optimizer.init_args.lr=0", "--trainer.max_epochs=1"]
SYNTHETIC = """\
data:
  class_path: tests.helpers.data.RandomImageDataModule
  init_args: {shape: [1, 28, 28], num_train: 2500, num_test: 500, batch_size: 128, val_size: 500, seed: 0}
"""


def _has_fashion_mnist() -> bool:
    folder = FashionMNISTDataModule.debian_dir
    return folder is not None and (folder / "train-images-idx3-ubyte.gz").exists()


def _fit(tmp: Path, device_type: str, precision: str) -> dict[str, float]:
    accelerator = "gpu" if device_type == "cuda" else device_type
    data = []
    if not _has_fashion_mnist():
        (tmp / "data.yaml").write_text(SYNTHETIC)
        data = ["--config", "data.yaml"]
    args = [
        "fit",
        "--config",
        str(QUICKSTART),
        *data,
        *SMALL,
        *FROZEN,
        f"--trainer.accelerator={accelerator}",
        "--trainer.devices=1",
        f"--trainer.precision={precision}",
    ]
    # the run's folder is tmp: the package and tests.helpers come from the checkout
    path = os.environ.get("PYTHONPATH")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", str(REPO) + (os.pathsep + path if path else ""))
        run_cli(args, tmp, timeout=240)
    metrics = logged_metrics(tmp / "lightning_logs" / "quickstart" / "version_0")
    assert {"nfk/sigma_1@0", "nfk/explained_variance@0", "probe/acc@0"} <= set(metrics)
    bad = {key: value for key, value in metrics.items() if not math.isfinite(value)}
    assert not bad, f"non-finite figures under {precision}: {bad}"
    return metrics


@pytest.fixture(scope="module")
def full_precision(tmp_path_factory, device) -> dict[str, float]:
    return _fit(tmp_path_factory.mktemp("32-true"), device.type, "32-true")


def test_32_true(full_precision):
    assert full_precision["nfk/sigma_1@0"] > 0


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "bf16-true"])
def test_precision(precision, full_precision, device, tmp_path):
    metrics = _fit(tmp_path, device.type, precision)
    assert set(metrics) == set(full_precision)
    if precision == "bf16-true":
        return
    for key, value in full_precision.items():
        if key.startswith("nfk/"):
            # the same float32 fit of the same weights on the same device: round-off only
            assert metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
        elif not key.startswith("probe/l2"):
            # a probe on features equal to round-off: at most 2 of the 500 validation
            # images may sit on a decision boundary
            assert metrics[key] == pytest.approx(value, abs=2 / 500 + 1e-9), key
