"""Time of ``VAEEnergy.extras`` (the frozen noise of one chunk): the draw before
lightning-nfk's noise version 2 (a host copy, then a CPU generator per example seeded by a
BLAKE2b hash, in a Python loop) against the current one (Philox4x32-10 keyed by a
universal hash, batched on the chunk's device). Alternated in one process, so that both
see the same machine load; medians and minima in milliseconds, as a Markdown table.

    python benchmarks/bench_vae_noise.py                    # 1024 28x28 images, S=8, d=16
    python benchmarks/bench_vae_noise.py --device cuda --batch 4096
    python benchmarks/bench_vae_noise.py --pass-examples 256  # and one blocked NFK pass

``--pass-examples`` also times one blocked pass (``l = 20`` columns) of the
``fashion_mnist_vae`` recipe's ConvVAE over that many images with each draw: what the
noise costs in a fit.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time

import torch
from torch import Tensor, nn

from lightning_nfk.kernel import VAEEnergy, prepare_fisher_vectors
from lightning_nfk.models import ConvVAE


def legacy_extras(energy: VAEEnergy, x: Tensor) -> tuple[Tensor, ...]:
    """``VAEEnergy.extras`` as it was (noise version 1), for the comparison."""
    rows = x.detach().to("cpu", torch.float32).reshape(x.shape[0], -1).contiguous().numpy()
    key = energy.seed.to_bytes(8, "little", signed=True)
    eps = torch.empty(x.shape[0], energy.num_samples, energy.latent_dim, dtype=torch.float64)
    g = torch.Generator()
    for i, row in enumerate(rows):
        digest = hashlib.blake2b(row.tobytes(), digest_size=8, key=key).digest()
        g.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
        if energy.antithetic:
            half = torch.randn(
                energy.num_samples // 2, energy.latent_dim, generator=g, dtype=torch.float64
            )
            eps[i] = torch.cat([half, -half])
        else:
            eps[i] = torch.randn(
                energy.num_samples, energy.latent_dim, generator=g, dtype=torch.float64
            )
    return (eps.to(device=x.device, dtype=x.dtype),)


class _Shapes(nn.Module):
    """Only what VAEEnergy reads: encode/decode (never called here) and parameters."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.weight = nn.Parameter(torch.zeros(1))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def decode(self, z: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError


def pass_times(examples: int, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """ms of one blocked pass over ``examples`` images with each draw, alternated."""
    torch.manual_seed(0)
    vae = ConvVAE(channels=1, latent_dim=16, width=32, image_size=28).to(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.rand(examples, 1, 28, 28, generator=g, device="cpu").to(device)
    z = torch.randn(sum(p.numel() for p in vae.parameters()), 20, generator=g, device="cpu")
    ways = {"legacy (v1: host loop)": legacy_extras, "current (v2: Philox)": VAEEnergy.extras}
    ops = {}
    for name, extras in ways.items():
        energy = VAEEnergy(vae)
        energy.extras = extras.__get__(energy)  # type: ignore[method-assign]
        ops[name] = prepare_fisher_vectors(energy, x)
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repeats):
        for name, op in ops.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            op.normal_matmat(x, z.to(device, op.dtype))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(1e3 * (time.perf_counter() - start))
    return times


def _table(times: dict[str, list[float]]) -> None:
    print("| draw | median ms | min ms |")
    print("|---|---:|---:|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.1f} | {min(values):.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--side", type=int, default=28, help="images side x side, 1 channel")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--pass-examples", type=int, default=0, help="also time a pass")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    energy = VAEEnergy(_Shapes(args.latent), num_samples=args.samples)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.rand(args.batch, 1, args.side, args.side, generator=g, device="cpu").to(device)
    ways = {"legacy (v1: host loop)": legacy_extras, "current (v2: Philox)": VAEEnergy.extras}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: dict[str, list[float]] = {name: [] for name in ways}
    for fn in ways.values():  # warm-up (caches, kernels)
        fn(energy, x)
    for _ in range(args.repeats):
        for name, fn in ways.items():
            sync()
            start = time.perf_counter()
            fn(energy, x)
            sync()
            times[name].append(1e3 * (time.perf_counter() - start))
    shape = f"{args.batch} x 1 x {args.side} x {args.side}"
    print(
        f"`VAEEnergy.extras`, {shape} inputs, S = {args.samples}, latent {args.latent}, "
        f"{device}, {torch.get_num_threads()} threads, {args.repeats} alternated repeats\n"
    )
    _table(times)
    if args.pass_examples:
        print(
            f"\nOne blocked pass (l = 20) of the fashion_mnist_vae ConvVAE (S = 8, latent 16) "
            f"over {args.pass_examples} images\n"
        )
        _table(pass_times(args.pass_examples, max(3, args.repeats // 3), device))


if __name__ == "__main__":
    main()
