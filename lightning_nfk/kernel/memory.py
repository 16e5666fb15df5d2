"""How much memory a fit may use, and what one example of a gradient block costs.

The default budget comes from the device the kernel runs on: on CUDA, half of what the
allocator can still give (free device memory plus what PyTorch's cache holds unused);
on the CPU, half of the host's available memory, shared by the processes of the run.
Every process of a distributed fit takes the smallest budget of all, so that they all
resolve the same strategy.

A randomized fit holds a few P x l operands (:func:`sketch_bytes`) for its whole run;
what is left of the budget goes to gradient blocks. A gradient block of B examples holds, besides its B x P rows (the per-example gradients
``vmap`` returns, their concatenation into one block, and the backward's temporaries), the
activations that the backward pass of each example keeps: for a convolutional network
they can outweigh the rows, and for a VAE they grow with its noise samples (S decoder
passes per example). :func:`activation_bytes` measures them, as the bytes the autograd
graph saves per example (``torch.autograd.graph.saved_tensors_hooks``), on two small
batches, so that parameters saved by every batch cancel out.

A dense fit (``exact_nfk``, ``strategy="dense"``) holds V (N x P) for its whole run, so
its gradient blocks get what V leaves of the budget (at most :data:`DENSE_BLOCK_ROWS`
examples); at its peak it holds V and either a gradient block or the Gram matrix's
eigendecomposition (:func:`dense_peak_bytes`).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from lightning_nfk.kernel.config import DEFAULT_MEMORY_BUDGET
from lightning_nfk.kernel.per_example import ScoreJacobian, batched_attention

DEVICE_MEMORY_FRACTION = 0.5
"""Share of the device's available memory that a fit takes by default."""
ROW_COPIES = 4
"""Copies of a gradient row a block holds at its peak (vmap's output, the concatenated
block, the backward's per-example weight gradients, one spare)."""
ACTIVATION_COPIES = 2
"""Saved activations and their gradients during the backward pass."""
SKETCH_COPIES = 4
"""P x l operands a randomized fit holds at once: in a pass the current Z, the scaled Z
and the accumulator; in a QR the product, Householder QR's output and its workspace
(the previous basis and product are freed first); one spare."""
DENSE_BLOCK_ROWS = 256
"""Most examples in a gradient block of a dense fit: larger blocks are no faster
(per-example gradients of LeNet-5 or an MLP run as fast in blocks of 64-256 as of 1024)
and, beside V, would dominate the peak for small N."""
EIGH_COPIES = 5
"""m x m float64 matrices ``torch.linalg.eigh`` holds besides its input (m = min(N, P)):
the eigenvectors, ``syevd``'s workspace (measured 2.1-2.2 m^2 with MKL) and two spares
for other LAPACK builds (with one, the measured peaks of ``exact_nfk`` on LeNet-5 at
N = 2000 and 4096 came within 2-7% of the count)."""
HEAP_RETAINED = 64 * 2**20
"""Freed gradient-block memory the allocator may keep while the Gram matrix is formed
(glibc's malloc serves blocks under its mmap threshold, raised up to 32 MiB as larger
blocks are freed, from its heap and trims only beyond twice that; measured 70 MiB after
blocks of 36 MiB). At most this much, and at most one block."""


def available_memory(device: torch.device) -> int | None:
    """Bytes the device can still give this process (None when it cannot tell)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    if device.type == "cpu":
        return _host_available()
    return None


def _host_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def device_budget(device: torch.device, processes_per_host: int = 1) -> int:
    """The default budget: :data:`DEVICE_MEMORY_FRACTION` of :func:`available_memory`,
    divided among ``processes_per_host`` on the CPU (they share the host's memory), else
    :data:`DEFAULT_MEMORY_BUDGET`."""
    free = available_memory(device)
    if free is None:
        return DEFAULT_MEMORY_BUDGET
    share = processes_per_host if device.type == "cpu" else 1
    return max(1, int(DEVICE_MEMORY_FRACTION * free) // max(1, share))


def activation_bytes(jac: ScoreJacobian, x: Tensor, extras: tuple[Tensor, ...]) -> int:
    """Bytes the autograd graph of the score saves per example, measured on ``x[:1]`` and
    ``x[:2]`` (0 when ``x`` has fewer than two rows: nothing to compare)."""
    if x.shape[0] < 2:
        return 0
    theta = {n: t.detach().requires_grad_() for n, t in jac.theta.items()}
    x, extras = x[:2].clone(), tuple(e[:2].clone() for e in extras)  # no inference tensors

    def saved(b: int) -> int:
        total = 0

        def pack(t: Tensor) -> Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            torch.enable_grad(),
            batched_attention(),  # the attention the per-example passes run
        ):
            jac._call(theta, x[:b], tuple(e[:b] for e in extras))
        return total

    try:
        return max(0, saved(2) - saved(1))
    except RuntimeError:  # a score plain autograd cannot run: size by the rows alone
        return 0


def bytes_per_row(
    num_parameters: int, itemsize: int, activations: int, matrix_free_columns: int = 0
) -> int:
    """Peak bytes one example adds to a block: :data:`ROW_COPIES` gradient rows and
    :data:`ACTIVATION_COPIES` of its saved activations, or, for matrix-free products over
    ``matrix_free_columns`` tangents (``vmap`` over the columns holds a copy of the
    activations for each), that many copies more."""
    copies = ACTIVATION_COPIES * (1 + matrix_free_columns)
    return ROW_COPIES * num_parameters * itemsize + copies * activations


def sketch_bytes(num_parameters: int, columns: int, itemsize: int) -> int:
    """Bytes of the randomized fit's :data:`SKETCH_COPIES` P x l operands, which the
    gradient blocks share the budget with."""
    return SKETCH_COPIES * num_parameters * columns * itemsize


def dense_held_bytes(n: int, num_parameters: int, itemsize: int, world: int) -> int:
    """Bytes a dense fit holds throughout: V (under ``torch.distributed``, this process's
    rows beside the gathered V) and a few float64 vectors of N and of P entries."""
    v = n * num_parameters * itemsize * (1 if world == 1 else 2)
    return v + 16 * (n + num_parameters) * 8


def dense_block_rows(
    n: int, num_parameters: int, itemsize: int, row_bytes: int, budget: int, world: int
) -> int:
    """Examples per gradient block of a dense fit: what V leaves of ``budget``, in rows of
    ``row_bytes`` (:func:`bytes_per_row`), at most :data:`DENSE_BLOCK_ROWS` and N."""
    left = budget - dense_held_bytes(n, num_parameters, itemsize, world)
    return max(1, min(n, DENSE_BLOCK_ROWS, left // row_bytes))


def dense_peak_bytes(
    n: int, num_parameters: int, itemsize: int, block_bytes: int, world: int
) -> int:
    """Peak bytes of a dense fit: what it holds throughout (:func:`dense_held_bytes`) and
    the larger of a gradient block (``block_bytes``) and the Gram matrix (m = min(N, P);
    with its float64 copy when the working dtype is float32) with ``eigh``'s
    :data:`EIGH_COPIES`, beside what the allocator kept of the blocks
    (:data:`HEAP_RETAINED`). The block and the Gram matrix are never held at once."""
    m = min(n, num_parameters)
    gram = m * m * (itemsize + (8 if itemsize != 8 else 0) + 8 * EIGH_COPIES)
    kept = min(block_bytes, HEAP_RETAINED)
    return dense_held_bytes(n, num_parameters, itemsize, world) + max(block_bytes, gram + kept)
