"""A shared model's training killed on the way (a stopped session, a reboot) resumes from
its last full checkpoint, in the first epoch or a later one, and ends with the weights of
the uninterrupted training: no batch repeated or skipped, the same data order and random
draws (``experiments/common.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
FASHION = Path("/usr/share/datasets/fashion-mnist")

# trains the quick DCGAN (1,000 images, 8 batches an epoch) for 2 epochs with a full
# checkpoint every 3 batches; with `die` "E:B", the process ends hard (no clean-up, as a
# kill does) after batch B (counted from 1) of epoch E
DRIVER = """
import json, os, sys
repo, out, data, die = sys.argv[1:]
sys.path.insert(0, os.path.join(repo, "experiments"))
import common

common.RESUME_EVERY = 3
on_batch_end = common._Checkpoints.on_train_batch_end
batches = []

def count_then_die(self, trainer, pl_module, outputs, batch, batch_idx):
    batches.append((trainer.current_epoch, batch_idx))
    on_batch_end(self, trainer, pl_module, outputs, batch, batch_idx)
    if die == f"{trainer.current_epoch}:{batch_idx + 1}":
        os._exit(3)

common._Checkpoints.on_train_batch_end = count_then_die
args = common.parser("resume").parse_args(["--quick", "--out", out, "--data-dir", data])
run = common.Run("resume", args)
module = common.shared_model(run, "fmnist_gan", epochs=2)
print("RESULT", json.dumps({
    "resumed_at_step": run.results.get("resumed_at_step", {}).get("fmnist_gan"),
    "batches": batches,
    "per_epoch": module._trainer.num_training_batches if module._trainer else None,
}))
"""


def drive(out: Path, die: str = "") -> dict:
    out.mkdir(exist_ok=True)
    args = [str(REPO), str(out), str(FASHION), str(die)]
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, *args],
        cwd=out,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == (3 if die else 0), proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line[0].removeprefix("RESULT ")) if line else {}


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "cache" / "fmnist_gan-e2-of2.pt", weights_only=True)


@pytest.mark.slow  # seven trainings of the quick GAN: about two minutes
@pytest.mark.skipif(not FASHION.exists(), reason="apt-get install dataset-fashion-mnist")
def test_a_killed_training_resumes_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    whole = drive(tmp_path / "whole")
    n = whole["per_epoch"]
    assert n > 3 and whole["batches"] == [[e, b] for e in (0, 1) for b in range(n)]
    assert whole["resumed_at_step"] is None
    reference = weights(tmp_path / "whole")

    # killed right after a checkpoint in the first epoch and in the second; and after 2
    # batches of the second, before its first checkpoint: resumed from the first epoch's
    # last one (after 6 batches), across the epoch's end, whose weights it writes again
    for epoch, batch, done in ((0, 3, 3), (1, 3, n + 3), (1, 2, 6)):
        out = tmp_path / f"killed{epoch}-{batch}"
        drive(out, die=f"{epoch}:{batch}")
        cache = out / "cache"
        assert (cache / "fmnist_gan-of2-resume.ckpt").is_file()
        assert (cache / "fmnist_gan-e1-of2.pt").exists() == (epoch == 1)
        leftover = (cache / "fmnist_gan-of2-resume.ckpt").read_bytes()
        rest = drive(out)
        # the rest of the batches, each once, in order; the steps before it: both
        # optimisers' per batch done
        assert rest["batches"] == [[e, b] for e in (0, 1) for b in range(n)][done:]
        assert rest["resumed_at_step"] == 2 * done
        assert not (cache / "fmnist_gan-of2-resume.ckpt").exists()
        final = weights(out)
        assert final.keys() == reference.keys()
        for key, w in reference.items():
            # the same data, draws and arithmetic as the uninterrupted run: equal up to
            # float32 rounding (a few ulps of the weights' scale; counters such as
            # BatchNorm's num_batches_tracked must match exactly, which these tolerances do)
            torch.testing.assert_close(final[key], w, rtol=1e-5, atol=1e-6, msg=key)

    # a checkpoint left beside the finished training (a kill after its last weights were
    # written): removed, nothing trained again
    whole_cache = tmp_path / "whole" / "cache"
    (whole_cache / "fmnist_gan-of2-resume.ckpt").write_bytes(leftover)
    again = drive(tmp_path / "whole")
    assert again["batches"] == [] and again["resumed_at_step"] is None
    assert not (whole_cache / "fmnist_gan-of2-resume.ckpt").exists()
