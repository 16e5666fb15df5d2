"""A frozen teacher's weights: read from a checkpoint file, and compared with a
checkpoint's copy when a distillation run resumes."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_nfk._io import check_torch_file, describe_error


def load_teacher_weights(teacher: nn.Module, path: str | Path) -> None:
    """Load ``path`` into ``teacher``: a Lightning checkpoint (its ``state_dict``) whose keys
    are the teacher's under a prefix (``net.`` for ClassifierModule), or a plain state dict.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an empty, corrupted or unreadable file; keys that do not match the
            teacher, or other shapes (e.g. another number of classes), naming them;
            non-finite weights.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"`teacher_checkpoint` {str(path)!r} does not exist.")
    check_torch_file(path, "`teacher_checkpoint`")  # empty, or records failing their CRC
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or pickled objects beyond weights
        raise ValueError(
            f"`teacher_checkpoint` {str(path)!r} cannot be read as a torch checkpoint "
            f"({describe_error(e)})."
        ) from e
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(f"`teacher_checkpoint` {str(path)!r} holds no state dict.")
    candidate = _teachers_part(teacher, state, path)
    wanted = teacher.state_dict()
    shapes = [
        f"{k}: {tuple(v.shape)} in the file, {tuple(wanted[k].shape)} in the teacher"
        for k, v in candidate.items()
        if v.shape != wanted[k].shape
    ]
    if shapes:
        raise ValueError(
            f"`teacher_checkpoint` {str(path)!r} does not fit the teacher (another number of "
            f"classes or another architecture?): {'; '.join(shapes[:3])}."
        )
    bad = [k for k, v in candidate.items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise ValueError(
            f"`teacher_checkpoint` {str(path)!r} holds non-finite values in {len(bad)} "
            f"tensors (e.g. {bad[0]!r}): a diverged teacher cannot give targets."
        )
    teacher.load_state_dict(candidate)


def _teachers_part(teacher: nn.Module, state: dict[str, Tensor], path: object) -> dict:
    """The entries of ``state`` that are exactly the teacher's keys under one prefix."""
    wanted = teacher.state_dict()
    prefixes = sorted(
        {key[: len(key) - len(w)] for key in state for w in wanted if key.endswith(w)}
    )
    exact = []
    for prefix in [""] + [p for p in prefixes if p]:
        candidate = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if set(candidate) == set(wanted):
            exact.append((prefix, candidate))
    if len(exact) > 1:
        raise ValueError(
            f"`teacher_checkpoint` {str(path)!r} holds several networks with the teacher's "
            f"keys (prefixes {[p for p, _ in exact]}); save the teacher alone (its "
            "`state_dict()`) and pass that file."
        )
    if not exact:
        raise ValueError(
            f"`teacher_checkpoint` {str(path)!r} does not hold the teacher's weights: none of "
            f"its key prefixes {prefixes or ['']} gives exactly the keys of "
            f"{type(teacher).__name__} (e.g. {next(iter(wanted))!r})."
        )
    return exact[0][1]


def check_same_teacher(
    teacher: nn.Module, saved: dict[str, Tensor], prefix: str, teacher_file: object
) -> None:
    """Refuse a checkpoint (``saved``: its ``state_dict``, the teacher's tensors under
    ``prefix``) whose teacher differs from ``teacher``, loaded from ``teacher_file``: the
    checkpoint's weights would silently replace it, and the student was trained against
    the other teacher.

    Raises:
        ValueError: naming how many tensors differ, one of them, and the cure.
    """
    differ = [
        name
        for name, t in teacher.state_dict().items()
        if f"{prefix}{name}" in saved
        and not (
            saved[f"{prefix}{name}"].shape == t.shape
            and torch.equal(saved[f"{prefix}{name}"].to(t.device, t.dtype), t)
        )
    ]
    if differ:
        raise ValueError(
            f"The checkpoint was trained with another teacher than `teacher_checkpoint` "
            f"({teacher_file!r}): {len(differ)} of its tensors differ (e.g. "
            f"{differ[0]!r}). Resume with the teacher_checkpoint of the run that wrote it, "
            "or start a new run (without --ckpt_path) to distil from this teacher."
        )


__all__ = ["check_same_teacher", "load_teacher_weights"]
