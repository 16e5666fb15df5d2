"""The options of an NFK fit, validated once: the sketch (:class:`SketchOptions`), the
operator (:class:`OperatorOptions`), and :class:`NFKConfig`, which holds both."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Literal

import torch

Strategy = Literal["auto", "dense", "blocked", "matrix_free"]
STRATEGIES = ("auto", "dense", "blocked", "matrix_free")
DEFAULT_MEMORY_BUDGET = 2**30
"""Bytes a fit uses when its device cannot say how much memory it has left (1 GiB)."""
COMPUTE_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class SketchOptions:
    """The random sketch of a randomized fit (docs/design.md, section 2).

    Args:
        k: number of components kept, >= 1.
        oversample: extra columns of the random sketch (``l = k + oversample``), >= 0;
            raise it first when the spectrum has a small gap.
        n_iter: power iterations, >= 0 (``n_iter + 1`` passes over the data).
        seed: seed of the random test matrix (the same on every process).
    """

    k: int = 16
    oversample: int = 10
    n_iter: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        for name, minimum in (("k", 1), ("oversample", 0), ("n_iter", 0), ("seed", None)):
            check_int(name, getattr(self, name), minimum)

    @property
    def columns(self) -> int:
        """``l = k + oversample``, the width of the random sketch."""
        return self.k + self.oversample

    def check_columns(
        self,
        limit: int,
        described: str,
        cure: str = "lower `k` or `oversample`, or fit on more examples",
    ) -> None:
        """Refuse a sketch wider than ``limit``, the examples (or parameters) it is taken
        from; ``described`` names that limit and its value in the message (e.g.
        ``"`probe_size` (10)"``).

        Raises:
            ValueError: ``k + oversample > limit``.
        """
        if self.columns > limit:
            raise ValueError(
                f"`k` + `oversample` ({self.k} + {self.oversample} = {self.columns}) must not "
                f"exceed {described}. Cure: {cure}."
            )


@dataclass(frozen=True)
class OperatorOptions:
    """How the Fisher-vector operator is built and run (docs/design.md, sections 1 and 3).

    Args:
        damping: absolute damping of the diagonal Fisher, finite and >= 0.
        strategy: ``"auto"``, ``"dense"``, ``"blocked"`` or ``"matrix_free"``.
        dtype: compute dtype, ``torch.float32`` or ``torch.float64`` (a copy of the model in
            that dtype); ``None`` follows the model (float32 for a float16/bfloat16 model:
            half-precision Fisher vectors overflow and their QR is not accurate enough).
        memory_budget: bytes allowed for a gradient block (its rows and the activations its
            backward pass keeps) or the dense :math:`V` and its Gram matrix, >= 1; ``None``
            (the default): half of what the device has available at the fit (CUDA: free
            memory plus PyTorch's unused cache; CPU: the host's available memory shared by
            the processes of the run), the smallest over the processes.
        chunk_size: examples per gradient block; ``None`` derives it from ``memory_budget``
            (at most 1024, 128 for ``matrix_free``).
    """

    damping: float = 1e-8
    strategy: Strategy = "auto"
    dtype: torch.dtype | None = None
    memory_budget: int | None = None
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("memory_budget", "chunk_size"):
            check_int(name, getattr(self, name), 1, optional=True)
        d = self.damping
        if isinstance(d, bool) or not isinstance(d, (int, float)):
            raise TypeError(f"`damping` must be a number, got {type(d).__name__} ({d!r}).")
        if not (math.isfinite(d) and d >= 0):
            raise ValueError(f"`damping` must be a finite number >= 0, got {d!r}.")
        object.__setattr__(self, "damping", float(d))
        if self.strategy not in STRATEGIES:
            raise ValueError(f"`strategy` must be one of {STRATEGIES}, got {self.strategy!r}.")
        if self.dtype is not None and not isinstance(self.dtype, torch.dtype):
            raise TypeError(f"`dtype` must be None or a torch.dtype, got {self.dtype!r}.")
        if self.dtype is not None and self.dtype not in COMPUTE_DTYPES:
            half = self.dtype in (torch.float16, torch.bfloat16)
            raise ValueError(
                f"`dtype` must be None, torch.float32 or torch.float64, got {self.dtype}"
                + (
                    ": half-precision Fisher vectors overflow (a half-precision model is fitted "
                    "in float32 with dtype=None)."
                    if half
                    else "."
                )
            )


@dataclass(frozen=True)
class NFKConfig:
    """How a :class:`~lightning_nfk.kernel.LowRankNFK` is fitted: the sketch options
    (``k``, ``oversample``, ``n_iter``, ``seed``; :class:`SketchOptions`) and the operator
    options (``damping``, ``strategy``, ``dtype``, ``memory_budget``, ``chunk_size``;
    :class:`OperatorOptions`), in one flat, frozen object (the short form of both).
    :attr:`sketch` and :attr:`operator` give the two parts; :meth:`compose` builds one
    from them.

    Validated at construction by the two parts: a wrong type raises ``TypeError``, a value
    out of range ``ValueError``, each naming the argument, the constraint and the value.
    The arguments are those of the two parts.
    """

    k: int = 16
    oversample: int = 10
    n_iter: int = 10
    damping: float = 1e-8
    strategy: Strategy = "auto"
    dtype: torch.dtype | None = None
    seed: int = 0
    memory_budget: int | None = None
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        self.sketch  # noqa: B018  (validates)
        object.__setattr__(self, "damping", self.operator.damping)

    @property
    def sketch(self) -> SketchOptions:
        """The sketch options."""
        return SketchOptions(**{f.name: getattr(self, f.name) for f in fields(SketchOptions)})

    @property
    def operator(self) -> OperatorOptions:
        """The operator options."""
        return OperatorOptions(**{f.name: getattr(self, f.name) for f in fields(OperatorOptions)})

    @classmethod
    def compose(cls, sketch: SketchOptions, operator: OperatorOptions) -> NFKConfig:
        """The config of these two parts."""
        values = {f.name: getattr(sketch, f.name) for f in fields(SketchOptions)}
        values.update({f.name: getattr(operator, f.name) for f in fields(OperatorOptions)})
        return cls(**values)

    @property
    def columns(self) -> int:
        """:attr:`SketchOptions.columns`."""
        return self.sketch.columns

    def check_columns(self, limit: int, described: str, cure: str | None = None) -> None:
        """:meth:`SketchOptions.check_columns`."""
        if cure is None:
            self.sketch.check_columns(limit, described)
        else:
            self.sketch.check_columns(limit, described, cure)

    def as_dict(self) -> dict[str, object]:
        """Plain Python values (the dtype as its name), for checkpoints."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["dtype"] = None if self.dtype is None else str(self.dtype).removeprefix("torch.")
        return out

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> NFKConfig:
        """Inverse of :meth:`as_dict`."""
        values = dict(values)
        dtype = values.pop("dtype", None)
        return cls(**values, dtype=None if dtype is None else getattr(torch, str(dtype)))


def check_int(name: str, value: object, minimum: int | None, optional: bool = False) -> None:
    """``TypeError`` unless ``value`` is an int (or None when ``optional``), ``ValueError``
    when below ``minimum``."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} ({value!r}).")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")


def check_tol(name: str, value: object) -> None:
    """``ValueError`` unless ``value`` is None or a finite real number > 0."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise ValueError(f"`{name}` must be a finite number > 0 or None, got {value!r}.")
