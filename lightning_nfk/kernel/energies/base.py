"""The energy protocol: the only place that knows what kind of model defines the kernel.

The engine (:class:`~lightning_nfk.kernel.LowRankNFK`) sees an energy as

* a *kernel module* whose trainable parameters are :math:`\\theta`;
* a per-example scalar score :math:`s_\\theta(x)` (minus the energy of the paper's EBM
  view), computed batched by :meth:`Energy.score`;
* where the mean score :math:`z` (``centring``) and the diagonal Fisher :math:`I`
  (``fisher``) come from: the fitting data, samples of the model, or nowhere.

With :math:`g_x = \\nabla_\\theta s_\\theta(x)`, :math:`U_x = g_x - z` and
:math:`I = \\mathbb{E}[U \\odot U]`, the Fisher vector is

.. math::

    V_x = U_x / \\sqrt{I + \\text{damping}}.

Writing your own energy (here the classical Fisher kernel of a model with a tractable
``log p(x)``, such as a normalising flow or an autoregressive model)::

    class LogLikelihoodEnergy(Energy):
        centring = "data"   # z = mean score over the fitting data
        fisher = "data"     # I = mean of U * U over the fitting data

        def score(self, module, x):
            return module.log_prob(x)   # shape (B,): one scalar per example

    nfk = LowRankNFK(LogLikelihoodEnergy(flow), k=32).fit(loader)

``score`` must treat the examples of a batch independently (the engine evaluates it on
single examples and on batches and expects the same numbers) and must be deterministic:
the engine runs it in eval mode and checks that two evaluations agree.
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

Source = Literal["data", "samples"]


class Energy(abc.ABC):
    """Base class of the per-example energy scores that define a Neural Fisher Kernel.

    Subclasses set ``centring`` and ``fisher`` (class attributes, or per instance where
    they are options, as in :class:`VAEEnergy`) and implement
    :meth:`score`; energies with model samples (GANs) implement :meth:`sample_batches`;
    energies that need fixed per-example auxiliary inputs (the VAE's noise) implement
    :meth:`extras`.

    Attributes:
        centring: source of the mean score :math:`z`: ``"data"`` (the fitting data),
            ``"samples"`` (:meth:`sample_batches`) or ``None`` (:math:`z = 0`).
        fisher: source of the diagonal Fisher :math:`I`: ``"data"``, ``"samples"`` or
            ``None`` (no normalisation: :math:`V_x = U_x`, as for the NTK).

    Args:
        module: the kernel module; its parameters with ``requires_grad=True`` are
            :math:`\\theta`.
        parameters: restrict :math:`\\theta` to the trainable parameters whose names (as in
            ``module.named_parameters()``) equal one of these prefixes or start with it
            followed by a dot (whole submodules: ``"decoder.1"`` is not ``"decoder.10"``),
            e.g. ``("encoder", "head")``; ``None`` (the default) keeps all of them. The others
            are constants of the kernel.

    Raises:
        TypeError: if ``module`` is not an ``nn.Module`` or ``parameters`` is not a
            sequence of strings.
        ValueError: if ``module`` has no trainable parameter, or none that ``parameters``
            selects.
    """

    centring: Source | None = "data"
    fisher: Source | None = "data"

    def __init__(self, module: nn.Module, *, parameters: Sequence[str] | None = None) -> None:
        _check_module("module", module)
        module = uncompiled(module)
        if not any(p.requires_grad for p in module.parameters()):
            raise ValueError(
                "`module` has no parameter with requires_grad=True: the kernel is defined by "
                "the trainable parameters of the kernel module."
            )
        if parameters is not None:
            if isinstance(parameters, str) or not all(isinstance(q, str) for q in parameters):
                raise TypeError(
                    "`parameters` must be None or a sequence of parameter-name prefixes "
                    f"(strings), got {parameters!r}."
                )
            parameters = tuple(parameters)
            names = [n for n, p in module.named_parameters() if p.requires_grad]
            if not any(_selected(n, parameters) for n in names):
                raise ValueError(
                    f"`parameters` {list(parameters)} selects none of the module's trainable "
                    f"parameters (first names: {names[:6]})."
                )
        self.module = module
        self.parameters = parameters

    def settings(self) -> dict[str, object]:
        """The options that define the score function (plain Python values), saved with a
        fitted :class:`~lightning_nfk.kernel.LowRankNFK` and checked when it is loaded.
        Subclasses with such options extend it."""
        return {"parameters": None if self.parameters is None else list(self.parameters)}

    def defines_kernel(self, name: str) -> bool:
        """Whether the trainable parameter ``name`` of the kernel module is part of
        :math:`\\theta` (all of them unless ``parameters`` was given)."""
        return self.parameters is None or _selected(name, self.parameters)

    def kernel_layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of :math:`\\theta`, in the order of the flattened vector (the
        rows of a fit's ``components``); P is the sum of their sizes."""
        return [
            (n, tuple(p.shape))
            for n, p in self.module.named_parameters()
            if p.requires_grad and self.defines_kernel(n)
        ]

    @abc.abstractmethod
    def score(self, module: nn.Module, x: Tensor, *extras: Tensor) -> Tensor:
        """Per-example scores :math:`s_\\theta(x)` of a batch.

        Args:
            module: the kernel module (possibly with its parameters substituted by the
                engine: call it, never cache its parameters).
            x: a batch of inputs, shape ``(B, ...)``.
            *extras: the per-example tensors from :meth:`extras`, each ``(B, ...)``.

        Returns:
            A tensor of shape ``(B,)``.
        """

    def extras(self, x: Tensor) -> tuple[Tensor, ...]:
        """Fixed per-example auxiliary inputs of :meth:`score` (none by default).

        They must depend on the example only (not on its position in a batch, the batch
        size or the process), so that every pass of the algorithm sees the same function.
        """
        return ()

    def sample_batches(
        self, *, rank: int, world_size: int, device: torch.device, dtype: torch.dtype
    ) -> Iterator[Tensor]:
        """Batches of model samples for ``"samples"`` statistics; this rank's share only.

        The samples must be the same whatever the world size: draw them from a seeded
        ``torch.Generator`` and let rank ``r`` keep a disjoint share.
        """
        raise NotImplementedError(
            f"{type(self).__name__} uses 'samples' statistics but does not implement "
            "`sample_batches`."
        )

    def auxiliary_modules(self) -> list[nn.Module]:
        """Modules other than the kernel module that the energy runs (e.g. a generator).

        They are put in eval mode during kernel computations and copied with the energy by
        :meth:`to`.
        """
        return []

    def to(self, dtype: torch.dtype) -> Energy:
        """A copy of this energy whose modules are cast to ``dtype``; the original is untouched."""
        clone = copy.deepcopy(self)
        for m in [clone.module, *clone.auxiliary_modules()]:
            m.to(dtype)
        return clone

    def __repr__(self) -> str:
        return f"{type(self).__name__}(module={type(self.module).__name__})"


def _selected(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == q or name.startswith(q + ".") for q in prefixes)


def _check_module(name: str, module: object) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"`{name}` must be a torch.nn.Module, got {type(module).__name__}.")


def scalar_per_example(out: Tensor, what: str) -> Tensor:
    """``out`` of shape (B,) or (B, 1) as (B,); otherwise a ValueError naming ``what``."""
    if out.ndim == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.ndim != 1:
        raise ValueError(f"{what}, shape (B,) or (B, 1); got shape {tuple(out.shape)}.")
    return out


def uncompiled(module: nn.Module) -> nn.Module:
    """The module that ``torch.compile(module)`` wraps (the module itself otherwise).

    The engine differentiates the original module with ``torch.func``: its parameter
    names carry no ``_orig_mod.`` prefix, and per-example gradients need no graph capture.
    Training keeps the compiled forward; both share the same parameters.
    """
    original = getattr(module, "_orig_mod", None)
    return original if isinstance(original, nn.Module) else module
