"""Wide residual networks, CIFAR variant (Zagoruyko and Komodakis, BMVC 2016, arXiv:1605.07146).

WRN-d-k has (d - 4) / 6 pre-activation basic blocks per group, widths 16k, 32k, 64k.
WRN-40-2 has about 2.2M parameters, WRN-16-1 about 0.18M.
"""

from __future__ import annotations

from torch import Tensor, nn


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = (
            None
            if c_in == c_out and stride == 1
            else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        o = self.bn1(x).relu()
        y = self.conv1(o)  # (B, c_out, H / stride, W / stride)
        y = self.conv2(self.dropout(self.bn2(y).relu()))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for 32x32 images.

    Args:
        depth: 6n + 4 (16, 22, 28, 40, ...).
        widen_factor: k.
        num_classes: outputs.
        in_channels: input channels.
        dropout: dropout between the convolutions of a block (off in eval mode).
    """

    def __init__(
        self,
        depth: int = 16,
        widen_factor: int = 1,
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(
                f"`depth` must be 6n + 4 with n >= 1 (16, 22, 28, 40...), got {depth}."
            )
        if widen_factor < 1:
            raise ValueError(f"`widen_factor` must be >= 1, got {widen_factor}.")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)  # (B, 16, 32, 32)
        blocks: list[nn.Module] = []
        for g, stride in enumerate((1, 2, 2)):
            for i in range(n):
                c_in = widths[g] if i == 0 else widths[g + 1]
                blocks.append(_BasicBlock(c_in, widths[g + 1], stride if i == 0 else 1, dropout))
        self.blocks = nn.Sequential(*blocks)  # (B, 64k, 8, 8)
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self.num_features = widths[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def features(self, x: Tensor) -> Tensor:
        """Pooled penultimate features, (B, 64k)."""
        y = self.bn(self.blocks(self.conv(x))).relu()
        return y.mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))
