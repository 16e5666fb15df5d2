"""Small pre-norm transformers in plain torch: a causal language model (:class:`GPT`) and
a vision transformer (:class:`ViT`), with ``scaled_dot_product_attention``, LayerNorm and
learned position embeddings, at sizes a CPU trains.

Both take the inputs the NFK engine hands them under ``vmap`` (one example at a time):
no data-dependent control flow, padding handled by masks alone. The kernel's passes run
attention through SDPA's math backend (see
``lightning_nfk.kernel.per_example.batched_attention``), which ``vmap`` batches; training uses whichever backend torch picks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_nfk.kernel.energies.sequence import causal_mask, positions


class Attention(nn.Module):
    """Multi-head self-attention by ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"`dim` ({dim}) must be a multiple of `heads` ({heads}).")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: attention and a GELU MLP, each with a residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(self, x: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        x = x + self.attn(self.norm1(x), mask, causal)
        return x + self.mlp(self.norm2(x))


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}.")


class GPT(nn.Module):
    """A GPT-style causal language model: ``forward(input_ids, attention_mask=None,
    position_ids=None) -> logits (B, T, vocab_size)``.

    Padding (``attention_mask`` 0) is exact: a real token attends to real tokens at or
    before it only, positions count real tokens (``position_ids`` default to the mask's
    running count, so left padding does not shift them), and a padded position attends to
    itself alone (a query with no key would give NaN). The logits of real tokens are
    therefore those of the unpadded sequence. ``attention_mask`` is (B, T) 0/1, or a
    (B, 1, T, T) mask used as given, boolean (True: attend) or additive (0: attend), as
    Hugging Face models take.

    Args:
        vocab_size: tokens (256: bytes).
        context: the longest sequence (position embeddings).
        dim, depth, heads, mlp_ratio: width, blocks, attention heads, MLP expansion.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        context: int = 128,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: int = 4,
    ) -> None:
        super().__init__()
        _check_sizes(
            vocab_size=vocab_size,
            context=context,
            dim=dim,
            depth=depth,
            heads=heads,
            mlp_ratio=mlp_ratio,
        )
        self.context = context
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.apply(_init)

    def forward(
        self,
        input_ids: Tensor,  # (B, T)
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        t = input_ids.shape[-1]
        if t > self.context:
            raise ValueError(f"Sequences of {t} tokens exceed `context` = {self.context}.")
        mask, causal = None, attention_mask is None
        if attention_mask is None:
            if position_ids is None:
                position_ids = torch.arange(t, device=input_ids.device)
        elif attention_mask.ndim == 4:  # (B, 1, T, T) as given: boolean or additive
            mask = attention_mask if attention_mask.is_floating_point() else attention_mask.bool()
            if position_ids is None:
                position_ids = torch.arange(t, device=input_ids.device)
        else:
            mask = causal_mask(attention_mask)
            if position_ids is None:
                position_ids = positions(attention_mask)
        x = self.tokens(input_ids) + self.positions(position_ids)
        for block in self.blocks:
            x = block(x, mask, causal)
        return self.head(self.norm(x))


class ViT(nn.Module):
    """A vision transformer classifier: patches by a strided convolution, a class token,
    learned positions, pre-norm blocks; ``forward(images) -> logits (B, num_classes)``.

    Args:
        image_size, patch_size, channels: the images and their patches.
        num_classes: outputs.
        dim, depth, heads, mlp_ratio: width, blocks, attention heads, MLP expansion.
    """

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        channels: int = 3,
        num_classes: int = 10,
        dim: int = 96,
        depth: int = 4,
        heads: int = 3,
        mlp_ratio: int = 4,
    ) -> None:
        super().__init__()
        _check_sizes(
            image_size=image_size,
            patch_size=patch_size,
            channels=channels,
            num_classes=num_classes,
            dim=dim,
            depth=depth,
            heads=heads,
            mlp_ratio=mlp_ratio,
        )
        if image_size % patch_size:
            raise ValueError(
                f"`image_size` ({image_size}) must be a multiple of `patch_size` ({patch_size})."
            )
        patches = (image_size // patch_size) ** 2
        self.patch = nn.Conv2d(channels, dim, patch_size, stride=patch_size)
        device = self.patch.weight.device  # where the module is built (the default device)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim, device=device))
        self.positions = nn.Parameter(torch.zeros(1, patches + 1, dim, device=device))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.apply(_init)
        nn.init.trunc_normal_(self.positions, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, patches, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.positions
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


def _init(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
