"""What LinearProbeCallback's layer and callable features are, and their checks.

A layer's features are its outputs during one forward (:func:`layer_outputs`, a hook); a
callable's are its return value. Each batch's raw output is checked where it is made
(:func:`checked_features`), the ranks agree on one verdict before gathering
(:func:`gather_features`), and the gathered splits are checked once more
(:func:`check_gathered`): every rank raises the same error, none is left waiting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from lightning_nfk.kernel import Reduce, gather_rows, kernel_mode
from lightning_nfk.kernel._data import parameter_dtype
from lightning_nfk.kernel.distributed import rank_and_world_size

FeatureFn = Callable[[pl.LightningModule, Tensor], Tensor]
# "nfk", a layer's name, or f(pl_module, x) -> (B, d)
Features = str | FeatureFn


def features_name(features: Features) -> str:
    """``features`` as messages show it: ``'net.4'`` or ``callable f``."""
    if isinstance(features, str):
        return repr(features)
    return f"callable {getattr(features, '__name__', type(features).__name__)}"


def checked_features(
    features: Features, pl_module: pl.LightningModule, raw: Any, rows: int, seen: str
) -> tuple[Tensor | None, TypeError | ValueError | None]:
    """The ``(rows, d)`` features of one batch's raw output (the hook's outputs for a
    layer), or what is wrong with it, as the error to raise (on every rank)."""
    name = features_name(features)
    layer = isinstance(features, str) and features != "nfk"
    if layer:
        fwd = forward_name(pl_module)
        if len(raw) != 1:
            cure = (
                f"pick a layer that {fwd} runs; if `forward` does not read data examples, "
                f"define `probe_forward(x)` on {type(pl_module).__name__} to run the part "
                "that does."
                if not raw
                else "pass a callable `features=f(pl_module, x) -> (B, d)` that returns the "
                "activations you mean."
            )
            return None, ValueError(
                f"`features` ({name}) must name a layer that {fwd} runs once; it ran "
                f"{len(raw)} times on {seen}. Cure: {cure}"
            )
        raw = raw[0]
    if not isinstance(raw, Tensor):
        got = type(raw).__name__
        if isinstance(raw, (tuple, list, dict)):
            got += f" of {len(raw)} items"
        cure = (
            "pass a callable `features=f(pl_module, x) -> (B, d)` that picks the tensor."
            if layer
            else "return a Tensor (B, d) (e.g. `torch.stack` or `torch.cat` the parts)."
        )
        return None, TypeError(f"`features` ({name}) must output a Tensor, got {got}. Cure: {cure}")
    if not raw.is_floating_point():
        return None, TypeError(
            f"`features` ({name}) must give floating-point values, got {raw.dtype} (shape "
            f"{tuple(raw.shape)}). Cure: "
            + (
                "pick a layer with floating-point output, or pass a callable."
                if layer
                else "return floating-point features (e.g. `.float()`)."
            )
        )
    if raw.ndim < 2 or raw.shape[0] != rows or raw[0].numel() == 0:
        if raw.ndim < 2:
            cure = "keep a feature dimension (one feature per example: `f[:, None]`)."
        elif raw.shape[0] != rows:
            cure = "keep the batch dimension: do not reduce, index or reshape across examples."
        else:
            cure = "give at least one feature per example."
        return None, ValueError(
            f"`features` ({name}) must give (B, d) or (B, ...) features, one row per "
            f"example; got shape {tuple(raw.shape)} for {rows} examples. Cure: {cure}"
        )
    return raw.detach().flatten(1), None


def check_features_before_training(
    features: Features, pl_module: pl.LightningModule, x: Tensor
) -> None:
    """Run a layer's or a callable's features once on the examples ``x`` and refuse what
    the probe could not use (the error names the value seen and the cure). Eval mode, no
    gradients; the RNG streams and the train/eval flags are restored (``kernel_mode``)."""
    fn = feature_fn(features, pl_module)
    seen = f"{len(x)} validation examples before training"
    with kernel_mode(pl_module):
        try:
            raw = fn(to_device(x, pl_module.device, parameter_dtype(pl_module)))
        except Exception as err:
            if hasattr(err, "add_note"):  # Python >= 3.11
                err.add_note(
                    f"LinearProbeCallback: raised while running `features` ({features_name(features)}) "
                    f"on {seen}. Layer features run {forward_name(pl_module)}(x) on data "
                    "examples; a module whose `forward` does not read them defines "
                    "`probe_forward(x)`."
                )
            raise
    f, problem = checked_features(features, pl_module, raw, len(x), seen)
    if problem is not None:
        raise problem
    assert f is not None
    message = non_finite({"": f.double()})
    if message:
        raise ValueError(
            f"`features` ({features_name(features)}) must give finite values; on {seen}: {message}. "
            f"Cure: {FINITE_CURE}"
        )


def extract_features(
    features: Features,
    pl_module: pl.LightningModule,
    fn: Callable[[Tensor], Any],
    epoch: int,
    batch_size: int,
    x: Tensor,
) -> tuple[Tensor, Exception | None]:
    """This rank's float64 features ``fn`` gives of ``x`` (in batches of ``batch_size``),
    or what is wrong with them (an error that :func:`gather_features` raises on every
    rank)."""
    # Forward-only features (a layer, a callable) see inputs in the module's dtype
    # (bfloat16 under `bf16-true`); the NFK casts to its own float32/64 working dtype.
    dtype = None if features == "nfk" else parameter_dtype(pl_module)
    empty = torch.zeros(0, 0, dtype=torch.float64, device=pl_module.device)
    parts: list[Tensor] = []
    for xb in x.split(batch_size):
        seen = f"a batch of {len(xb)} examples at epoch {epoch}"
        try:  # an error of this rank's shard: raised on every rank (gather_features)
            raw = fn(to_device(xb, pl_module.device, dtype))
        except Exception as err:
            return empty, err
        f, problem = checked_features(features, pl_module, raw, len(xb), seen)
        if problem is None and parts and f.shape[1] != parts[0].shape[1]:
            problem = ValueError(
                f"`features` ({features_name(features)}) must give the same number of features for "
                f"every example; got {parts[0].shape[1]} and then {f.shape[1]} at epoch "
                f"{epoch}. Cure: make the feature width independent of the batch."
            )
        if problem is not None:
            return empty, problem
        parts.append(f.double())
    return (torch.cat(parts) if parts else empty), None


def feature_fn(features: Features, pl_module: pl.LightningModule) -> Callable[[Tensor], Any]:
    """The raw features of a batch for layer or callable ``features``: the callable's
    output, or the list of the layer's outputs during one forward (checked by
    :func:`checked_features`)."""
    if callable(features):
        fn = features

        def user_features(xb: Tensor) -> Any:
            with torch.no_grad():  # kernel_mode turns gradients on for the NFK only
                return fn(pl_module, xb)

        return user_features
    layer = dict(pl_module.named_modules())[features]
    forward = probe_forward(pl_module)

    def activations(xb: Tensor) -> list[Any]:
        with torch.no_grad():
            return layer_outputs(layer, lambda: forward(xb))

    return activations


def to_device(x: Tensor, device: torch.device, dtype: torch.dtype | None) -> Tensor:
    """``x`` on ``device``; floating inputs cast to ``dtype`` when given."""
    if dtype is None or not x.is_floating_point():
        return x.to(device)
    return x.to(device=device, dtype=dtype)


FINITE_CURE = (
    "pick a layer or callable whose output is finite on these examples, and check the model: "
    "NaN or inf weights or activations mean the training has diverged (lower the learning "
    "rate; check the loss and the input normalisation)."
)


def layer_outputs(layer: torch.nn.Module, run: Callable[[], Any]) -> list[Any]:
    """Every output of ``layer`` while ``run()`` executes, in call order (a forward hook,
    removed afterwards); one item per call of the layer."""
    out: list[Any] = []
    handle = layer.register_forward_hook(lambda m, i, o: out.append(o))
    try:
        run()
    finally:
        handle.remove()
    return out


def probe_forward(pl_module: pl.LightningModule) -> Callable[[Tensor], Any]:
    """What layer features run on data examples: ``pl_module.probe_forward`` when the module
    defines it (its ``forward`` does not read data examples, e.g. a GAN's generator), else
    the module itself."""
    probe_forward = getattr(pl_module, "probe_forward", None)
    return probe_forward if callable(probe_forward) else pl_module


def forward_name(pl_module: pl.LightningModule) -> str:
    method = "probe_forward" if callable(getattr(pl_module, "probe_forward", None)) else "forward"
    return f"{type(pl_module).__name__}.{method}"


def non_finite(splits: dict[str, Tensor]) -> str:
    """What is non-finite in each (rows, d) split, as ``"<split> split: r of R rows and c of
    C columns (n NaN, m inf)"`` joined by ``"; "``; empty when all is finite."""
    parts = []
    for split, f in splits.items():
        bad = ~torch.isfinite(f)
        if not bool(bad.any()):
            continue
        nan = int(torch.isnan(f).sum())
        seen = (
            f"{int(bad.any(1).sum())} of {f.shape[0]} rows and {int(bad.any(0).sum())} of "
            f"{f.shape[1]} columns ({nan} NaN, {int(bad.sum()) - nan} inf)"
        )
        parts.append(f"{split} split: {seen}" if split else seen)
    return "; ".join(parts)


def check_gathered(name: str, epoch: int, splits: dict[str, tuple[Tensor, Tensor]]) -> None:
    """Refuse gathered features (``features`` shown as ``name``) the probe cannot fit: not
    (rows, d), not one row per label, different widths in the splits, non-finite values.
    Every rank holds the same gathered features, so every rank raises the same error."""
    for split, (f, y) in splits.items():
        if f.ndim != 2:
            raise ValueError(
                f"`features` ({name}) must give (B, d) features; the gathered {split} features "
                f"at epoch {epoch} have shape {tuple(f.shape)}. Cure: return one row of "
                "features per example."
            )
        if f.shape[0] != y.shape[0]:
            raise ValueError(
                f"`features` ({name}) must give one row per example; the gathered {split} "
                f"features at epoch {epoch} have {f.shape[0]} rows for {y.shape[0]} examples. "
                "Cure: return one row of features per example."
            )
    widths = {split: f.shape[1] for split, (f, _) in splits.items()}
    if len(set(widths.values())) > 1:
        raise ValueError(
            f"`features` ({name}) must give the same width in both splits; got "
            f"{' and '.join(str(w) for w in widths.values())} features per example "
            f"({', '.join(widths)}) at epoch {epoch}. Cure: make the feature width "
            "independent of the input (e.g. inputs of one size)."
        )
    message = non_finite({split: f for split, (f, _) in splits.items()})
    if message:
        raise ValueError(
            f"`features` ({name}) must give finite values; at epoch {epoch}: {message}. "
            f"Cure: {FINITE_CURE}"
        )


def gather_features(
    name: str,
    f: Tensor,
    problem: Exception | None,
    reduce: Reduce,
    device: torch.device | str,
) -> Tensor:
    """Every rank's feature rows, after one sum over the ranks of a table of each rank's
    (rows?, width, problem): a rank with no rows (fewer rows than processes) learns the
    feature width from the others; if any rank's features failed their checks, or the
    ranks' widths differ, every rank raises (no rank is left waiting in the gather)."""
    rank, world = rank_and_world_size()
    has_rows = problem is None and f.shape[0] > 0
    kinds = (TypeError, ValueError, Exception)  # what another rank raises, by code 1, 2, 3
    code = (
        0.0
        if problem is None
        else 1.0 + next(i for i, k in enumerate(kinds) if isinstance(problem, k))
    )
    table = torch.zeros(world, 3, dtype=torch.float64, device=device)
    table[rank] = torch.tensor(
        [float(has_rows), f.shape[1] if has_rows else 0.0, code], dtype=torch.float64, device=device
    )
    rows = reduce(table).tolist()
    if problem is not None:
        raise problem
    failed = next(((r, c) for r, (_, _, c) in enumerate(rows) if c), None)
    if failed is not None:  # another rank's check failed: that rank raised its own error
        if failed[1] == 3.0:  # the features raised on that rank's shard
            raise RuntimeError(
                f"`features` ({name}) raised an error on process {failed[0]}'s examples: see "
                "that process's error."
            )
        error = TypeError if failed[1] == 1.0 else ValueError
        raise error(
            f"`features` ({name}) failed its output check on process {failed[0]} "
            f"({error.__name__}): see that process's error for the value seen and the cure."
        )
    widths = [round(w) for held, w, _ in rows if held]
    if len(set(widths)) > 1:
        raise ValueError(
            f"`features` ({name}) must give the same number of features per example on every "
            f"process; the processes' widths differ: {widths}. Cure: make the feature width "
            "independent of the batch."
        )
    if not has_rows:
        f = f.new_zeros(0, widths[0])
    return gather_rows(f, reduce)


__all__ = [
    "FINITE_CURE",
    "FeatureFn",
    "Features",
    "check_features_before_training",
    "check_gathered",
    "checked_features",
    "extract_features",
    "feature_fn",
    "features_name",
    "forward_name",
    "gather_features",
    "layer_outputs",
    "non_finite",
    "probe_forward",
    "to_device",
]
