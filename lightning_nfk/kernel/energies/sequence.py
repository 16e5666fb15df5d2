"""Sequence energy: the log-likelihood of an autoregressive model (the classical Fisher
kernel of a sequence model, Jaakkola and Haussler 1998)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_nfk.kernel._data import unpack_tokens
from lightning_nfk.kernel.energies.base import Energy


class SequenceEnergy(Energy):
    """NFK of a causal language model:
    :math:`s_\\theta(x) = \\sum_{t \\ge 1} m_{t-1} m_t \\log p_\\theta(x_t \\mid x_{<t})`,
    the log-likelihood of a sequence's tokens under the attention mask :math:`m`.

    A token is scored when it and the token before it are real (mask 1): the first real
    token has no context to be predicted from, and padding (mask 0) on the left or the
    right is excluded exactly, so padding a sequence does not change its score or its
    Fisher vector (given a model whose real positions ignore padded ones, as Hugging
    Face's causal LMs and :class:`~lightning_nfk.models.GPT` do with the mask). The real
    tokens must be one contiguous run: a pad inside a sequence breaks it in two.
    Centring and diagonal Fisher come from the fitting data.

    Inputs: token ids ``(B, T)`` (all real), or the packed ``(B, 2, T)`` integer tensor
    of ids over the attention mask, which is what the engine makes of dict batches
    ``{"input_ids": ..., "attention_mask": ...}`` (see :func:`~lightning_nfk.kernel.pack_tokens`).

    Args:
        model: a causal LM: ``model(input_ids, attention_mask=..., position_ids=...)``
            returns logits ``(B, T, V)`` or an object with ``.logits`` (Hugging Face).
        pass_mask: hand the model a 4-D additive attention mask ``(B, 1, T, T)`` in its
            dtype (0 where a query attends: causal, real keys only, and each position
            itself, so that no query row is empty; the dtype's most negative number
            elsewhere) and ``position_ids`` (the running count of real tokens, so that
            left padding does not shift the positions). Hugging Face's causal LMs add
            such a mask to their attention scores as given, eager and SDPA attention
            alike; their own path from a 2-D mask branches on its values, which ``vmap``
            cannot batch. With False the model gets the ids alone, which is exact for
            right padding only (a causal model's real tokens never see later pads).
        parameters: restrict :math:`\\theta` to these parameter-name prefixes (see
            :class:`Energy`).

    Example:
        >>> import torch
        >>> from lightning_nfk.kernel import LowRankNFK, SequenceEnergy
        >>> from lightning_nfk.models import GPT
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> lm = GPT(vocab_size=16, context=8, dim=16, depth=1, heads=2)
        >>> ids = torch.randint(0, 16, (24, 8))
        >>> LowRankNFK(SequenceEnergy(lm), k=3, oversample=3).fit(ids).singular_values.shape
        torch.Size([3])
    """

    centring = "data"
    fisher = "data"

    def __init__(
        self,
        model: nn.Module,
        *,
        pass_mask: bool = True,
        parameters: Sequence[str] | None = None,
    ) -> None:
        super().__init__(model, parameters=parameters)
        if not isinstance(pass_mask, bool):
            raise TypeError(f"`pass_mask` must be a bool, got {pass_mask!r}.")
        self.pass_mask = pass_mask

    def settings(self) -> dict[str, object]:
        return {**super().settings(), "pass_mask": self.pass_mask}

    def score(self, module: nn.Module, x: Tensor, *extras: Tensor) -> Tensor:
        ids, mask = unpack_tokens(x)
        if self.pass_mask:
            dtype = next(module.parameters()).dtype
            out = module(
                ids, attention_mask=additive_mask(mask, dtype), position_ids=positions(mask)
            )
        else:
            out = module(ids)
        logits = getattr(out, "logits", out)
        if logits.ndim != 3 or logits.shape[:2] != ids.shape:
            raise ValueError(
                f"SequenceEnergy expects the model to return logits of shape (B, T, V) = "
                f"({ids.shape[0]}, {ids.shape[1]}, V); got shape {tuple(logits.shape)}."
            )
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # log p(x_t | x_<t), t >= 1
        scored = (mask[:, 1:] * mask[:, :-1]).to(target.dtype)
        # where, not a product: unscored positions add exactly 0 (their logits are finite:
        # every query attends to itself at least)
        return torch.where(scored > 0, target, torch.zeros_like(target)).sum(dim=1)


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, 1, T, T) additive attention mask in ``dtype`` from a (B, T) 0/1 mask: 0 where
    :func:`causal_mask` attends, the dtype's most negative number elsewhere (as Hugging
    Face builds its own)."""
    keep = causal_mask(mask)
    # out of place (under vmap the mask is batched, a fresh zeros tensor is not)
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(keep, zero, torch.finfo(dtype).min)


def causal_mask(mask: Tensor) -> Tensor:
    """(B, 1, T, T) boolean attention mask from a (B, T) 0/1 mask: position i attends to
    real positions j <= i, and to itself (a padded query with no key would give NaN)."""
    t = mask.shape[-1]
    lower = torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()
    eye = torch.eye(t, dtype=torch.bool, device=mask.device)
    return ((lower & mask.bool()[..., None, :]) | eye)[..., None, :, :]


def positions(mask: Tensor) -> Tensor:
    """(B, T) position ids counting real tokens only (0 at and before the first)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)
