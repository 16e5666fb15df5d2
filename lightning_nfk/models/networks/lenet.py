"""LeNet-5 (LeCun et al. 1998), ReLU and max-pooling variant, for 28x28 or 32x32 inputs."""

from __future__ import annotations

from torch import Tensor, nn


class LeNet5(nn.Module):
    """LeNet-5: two 5x5 convolutions (6 and 16 channels), then 120-84-``num_classes``.

    Args:
        in_channels: input channels (1 for MNIST-like, 3 for CIFAR-like).
        num_classes: outputs.
        image_size: 28 (first convolution padded by 2, as in the original 32x32 design)
            or 32.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        if image_size not in (28, 32):
            raise ValueError(f"`image_size` must be 28 or 32, got {image_size}.")
        pad = 2 if image_size == 28 else 0
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=pad),  # (B, 6, 28, 28)
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, 6, 14, 14)
            nn.Conv2d(6, 16, 5),  # (B, 16, 10, 10)
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, 16, 5, 5)
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),  # (B, 400)
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
