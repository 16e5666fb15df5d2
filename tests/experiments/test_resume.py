"""A shared model's training killed on the way (a stopped session, a reboot) resumes from
its last full checkpoint: the optimisers and loops continue, no step is done twice or
skipped, and the epoch's weights land in the cache as an uninterrupted run's would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FASHION = Path("/usr/share/datasets/fashion-mnist")

# trains the quick DCGAN (one epoch on 1,000 images) with a full checkpoint every 3 batches;
# with DIE set, the process ends hard (no clean-up, as a kill) right after the first one
DRIVER = """
import json, os, sys
sys.path.insert(0, os.path.join(sys.argv[1], "experiments"))
import common

common.RESUME_EVERY = 3
save = common._Checkpoints._save_resume

def save_then_die(self, trainer):
    save(self, trainer)
    if os.environ.get("DIE"):
        os._exit(3)

common._Checkpoints._save_resume = save_then_die
args = common.parser("resume").parse_args(["--quick", "--out", sys.argv[2], "--data-dir", sys.argv[3]])
run = common.Run("resume", args)
module = common.shared_model(run, "fmnist_gan")
trainer = module.trainer
print("RESULT", json.dumps({
    "global_step": trainer.global_step,
    "batches": trainer.num_training_batches,
    "resumed_at_step": run.results.get("resumed_at_step", {}).get("fmnist_gan"),
}))
"""


def drive(out: Path, die: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("DIE", None)
    if die:
        env["DIE"] = "1"
    return subprocess.run(
        [sys.executable, "-c", DRIVER, str(REPO), str(out), str(FASHION)],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.exists(), reason="apt-get install dataset-fashion-mnist")
def test_a_killed_training_resumes_where_it_was(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    killed = drive(tmp_path, die=True)
    assert killed.returncode == 3, killed.stdout[-3000:] + killed.stderr[-3000:]
    resume = cache / "fmnist_gan-of1-resume.ckpt"
    assert resume.is_file() and not (cache / "fmnist_gan-e1-of1.pt").exists()

    done = drive(tmp_path, die=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resuming fmnist_gan" in done.stdout
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    r = json.loads(line.removeprefix("RESULT "))
    # resumed after 3 of the epoch's batches, then the rest of them once each: the steps
    # per batch (the GAN steps both optimisers) times every batch of the epoch
    assert r["resumed_at_step"] > 0 and r["batches"] > 3
    assert r["global_step"] * 3 == r["resumed_at_step"] * r["batches"]
    assert (cache / "fmnist_gan-e1-of1.pt").is_file() and not resume.exists()
