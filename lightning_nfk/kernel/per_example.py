"""Per-example gradients and Jacobian products of an energy's score, with torch.func.

The energy is evaluated through :func:`torch.func.functional_call` on a *snapshot* of the
kernel module's parameters and buffers, taken when the object is built: later training
of the module does not change a fitted kernel, and nothing here ever writes to the
module, its ``.grad`` or its buffers.

* :meth:`ScoreJacobian.gradients`: the block :math:`G_b` (B x P) of per-example
  gradients, ``vmap(grad(...))`` over the examples.
* :meth:`ScoreJacobian.jvp` / :meth:`ScoreJacobian.vjp`: :math:`G_b T` and
  :math:`G_b^T Y` without building :math:`G_b`, batched over columns with ``vmap``
  (the paper's matrix-free products; curvlinops ``jacobian.py`` does the same).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_nfk.kernel.energies.base import Energy


class _ScoreModule(nn.Module):
    """``forward(x, *extras) = energy.score(net, x, *extras)``, so that functional_call
    substitutes the parameters of every method the energy calls (``encode``, ``decode``).
    Its parameter names are the kernel module's under ``net.``: only :class:`ScoreJacobian`
    sees them (it keys everything by the module's own names)."""

    def __init__(self, energy: Energy) -> None:
        super().__init__()
        self.net = energy.module
        self._energy = energy

    def forward(self, x: Tensor, *extras: Tensor) -> Tensor:
        return self._energy.score(self.net, x, *extras)


class ScoreJacobian:
    """The Jacobian :math:`G` (N x P) of the per-example scores of ``energy``.

    Args:
        energy: the energy; its kernel module's trainable parameters are :math:`\\theta`.

    Attributes:
        names: parameter names (the kernel module's own, as in its ``state_dict``) in the
            order of the flattened :math:`\\theta`.
        theta, constants: the snapshot, by the module's names: the parameters that define
            the kernel, and the other parameters and buffers.
        num_parameters: :math:`P = |\\theta|`.
        dtype, device: those of the parameters.
    """

    def __init__(self, energy: Energy) -> None:
        self.energy = energy
        self._module = _ScoreModule(energy)
        self.theta: dict[str, Tensor] = {}
        self.constants: dict[str, Tensor] = {}
        for name, p in energy.module.named_parameters():
            in_theta = p.requires_grad and energy.defines_kernel(name)
            (self.theta if in_theta else self.constants)[name] = p.detach().clone()
        for name, b in energy.module.named_buffers():
            self.constants[name] = b.detach().clone()
        self.names = list(self.theta)
        self.shapes = [self.theta[n].shape for n in self.names]
        self.numels = [self.theta[n].numel() for n in self.names]
        self.num_parameters = sum(self.numels)
        starts = [0]
        for n in self.numels[:-1]:
            starts.append(starts[-1] + n)
        self.slices = [slice(a, a + n) for a, n in zip(starts, self.numels)]
        """Where each parameter's block sits in the flattened :math:`\\theta`."""
        first = next(iter(self.theta.values()))
        self.dtype, self.device = first.dtype, first.device

    # -- helpers ---------------------------------------------------------------------------
    def _call(self, theta: dict[str, Tensor], x: Tensor, extras: tuple[Tensor, ...]) -> Tensor:
        tensors = {f"net.{n}": t for n, t in (*theta.items(), *self.constants.items())}
        return functional_call(self._module, tensors, (x, *extras))

    def _split(self, flat: Tensor) -> dict[str, Tensor]:
        """(m, P) -> {name: (m, *shape)}."""
        parts = flat.split(self.numels, dim=1)
        return {
            n: part.reshape(flat.shape[0], *shape)
            for n, part, shape in zip(self.names, parts, self.shapes)
        }

    def _flatten(self, tree: dict[str, Tensor], m: int) -> Tensor:
        """{name: (m, *shape)} -> (m, P)."""
        return torch.cat([tree[n].reshape(m, -1) for n in self.names], dim=1)

    # -- products ----------------------------------------------------------------------------
    def scores(self, x: Tensor, extras: tuple[Tensor, ...] = ()) -> Tensor:
        """The scores :math:`s_\\theta(x)` of a batch, shape as the energy returns it."""
        with torch.no_grad():
            return self._call(self.theta, x, extras)

    def gradient_blocks(self, x: Tensor, extras: tuple[Tensor, ...] = ()) -> list[Tensor]:
        """Per-example gradients, one contiguous (B, numel) block per parameter (no copy)."""

        def single(theta: dict[str, Tensor], xi: Tensor, *ei: Tensor) -> Tensor:
            out = self._call(theta, xi.unsqueeze(0), tuple(e.unsqueeze(0) for e in ei))
            return out.reshape(())

        in_dims = (None, 0, *([0] * len(extras)))
        with batched_attention():
            per_example = vmap(grad(single), in_dims=in_dims)(self.theta, x, *extras)
        return [per_example[n].reshape(x.shape[0], -1) for n in self.names]

    def gradients(self, x: Tensor, extras: tuple[Tensor, ...] = ()) -> Tensor:
        """Per-example gradients :math:`G_b`, shape (B, P)."""
        return torch.cat(self.gradient_blocks(x, extras), dim=1)

    def jvp(self, x: Tensor, extras: tuple[Tensor, ...], tangents: Tensor) -> Tensor:
        """:math:`G_b T` for ``tangents`` T of shape (P, l), by forward mode; returns (B, l)."""

        def along(t: dict[str, Tensor]) -> Tensor:
            return jvp(lambda th: self._call(th, x, extras), (self.theta,), (t,))[1]

        with batched_attention():
            return vmap(along)(self._split(tangents.T.contiguous())).T

    def vjp(self, x: Tensor, extras: tuple[Tensor, ...], cotangents: Tensor) -> Tensor:
        """:math:`G_b^T Y` for ``cotangents`` Y of shape (B, l), by reverse mode; returns (P, l)."""
        with batched_attention():
            _, pullback = vjp(lambda th: self._call(th, x, extras), self.theta)
            l = cotangents.shape[1]
            (tree,) = vmap(pullback)(cotangents.T.contiguous())
        return self._flatten(tree, l).T


def batched_attention() -> contextlib.AbstractContextManager:
    """``scaled_dot_product_attention`` by its math backend: the fused kernels (flash,
    memory-efficient, cuDNN; on the CPU too) have no batching rule, so ``vmap`` would run
    them example by example (slow, with a "performance drop" warning); the math backend
    is matmuls and a softmax, which ``vmap`` batches. Its memory is the T x T attention
    matrix per head and example, which the activation measurement of the block sizing
    sees (it runs through here)."""
    return sdpa_kernel(SDPBackend.MATH)
