"""How far is a precomputed target (the clean image's NFK embedding) from the online one
(the augmented image's own embedding)? For the teacher of experiments/distillation.py.

    python experiments/augmentation_targets.py --out /work/exp/distill --data-dir /work/cifar10

Reads the teacher checkpoint and the NFK cache that experiments/distillation.py wrote in
OUT, embeds ``--examples`` training images clean and under the training augmentation
(random 4-pixel-padded crop and flip, ``--draws`` draws each), and prints, on the
standardised targets: the R^2 of the clean target as a prediction of the augmented one,
their mean cosine similarity, and the same two figures between two *different* images
(the scale of "unrelated"). Writes OUT/augmentation_targets.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lightning_nfk.data import CIFAR10DataModule
from lightning_nfk.models import NFKDistillationModule, WideResNet
from lightning_nfk.models.teacher_targets import TeacherTargets, data_fingerprint


def r2(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Variance-weighted R^2 (1 - SSE / SST over all components)."""
    sse = (target - pred).square().sum()
    sst = (target - target.mean(dim=0)).square().sum()
    return float(1 - sse / sst)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--examples", type=int, default=512)
    p.add_argument("--draws", type=int, default=2)
    p.add_argument("--train-subset", type=int, default=10000)
    p.add_argument("--val-size", type=int, default=2000)
    p.add_argument("--n-iter", type=int, default=3)
    p.add_argument("--teacher-depth", type=int, default=16)
    p.add_argument("--teacher-width", type=int, default=2)
    a = p.parse_args()
    out = Path(a.out)
    ckpt = out / "teacher/lightning_logs/cifar10_wrn40_2_teacher"  # its newest run's last.ckpt
    teacher = WideResNet(a.teacher_depth, a.teacher_width)
    module = NFKDistillationModule(
        WideResNet(16, 1), teacher, teacher_checkpoint=str(ckpt), n_iter=a.n_iter
    )
    dm = CIFAR10DataModule(
        a.data_dir, train_subset=a.train_subset, val_size=a.val_size, seed=0, with_index=True
    )
    dm.setup()
    targets: TeacherTargets = module.teacher_targets
    cache = out / f"nfk_cache_k20_n{a.n_iter}.pt"
    why = targets.load(cache, data_fingerprint(dm.dataset("train")))
    if why is not None:
        raise SystemExit(f"the NFK cache does not apply: {why}")
    assert targets.train is not None and targets.rms is not None
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(dm.dataset("train")), generator=g)[: a.examples]
    clean = targets.standardized(targets.train[idx])
    augmented_set = dm.dataset("train", augment=True)
    torch.manual_seed(0)
    rows = []
    for _ in range(a.draws):
        x = torch.stack([augmented_set[int(i)][0] for i in idx])
        rows.append(targets.standardized(targets.embed(x)))
    aug = torch.cat(rows)
    clean_rep = clean.repeat(a.draws, 1)
    other = clean_rep.roll(1, dims=0)  # another image's clean target
    cos = torch.nn.functional.cosine_similarity
    result = {
        "examples": a.examples,
        "draws": a.draws,
        "r2_clean_predicts_augmented": r2(clean_rep, aug),
        "cosine_clean_augmented": float(cos(clean_rep, aug, dim=1).mean()),
        "r2_other_image": r2(other, aug),
        "cosine_other_image": float(cos(other, aug, dim=1).mean()),
        "r2_per_component": [
            r2(clean_rep[:, j : j + 1], aug[:, j : j + 1]) for j in range(clean.shape[1])
        ],
    }
    (out / "augmentation_targets.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "r2_per_component"}, indent=1))
    print("R^2 per component:", " ".join(f"{v:.2f}" for v in result["r2_per_component"]))


if __name__ == "__main__":
    main()
