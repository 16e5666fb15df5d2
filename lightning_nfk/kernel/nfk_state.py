"""What a :class:`~lightning_nfk.kernel.LowRankNFK` fit holds and how it is saved: the
frozen result (:class:`NFKFit`) and the checks of a saved state against the energy that
loads it (format version, energy type and settings, parameter names, shapes, dtypes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lightning_nfk.kernel.energies.base import Energy

STATE_VERSION = 4  # 3: the snapshot keyed by the module's own parameter names; 4: `products`
READABLE = (2, 3, 4)


@dataclass(frozen=True)
class NFKFit:
    """What :meth:`LowRankNFK.fit` computed; each field and property is also an attribute of
    the :class:`LowRankNFK`.

    Attributes:
        singular_values: (k,) singular values :math:`\\sigma_i` of :math:`V`, descending.
        components: (P, k) right singular vectors :math:`P` (orthonormal columns), on the
            kernel module's device in the compute dtype (also after ``load``).
        residuals: (k,) relative residuals :math:`\\|V^\\top V p_i - \\sigma_i^2 p_i\\| /
            \\sigma_i^2`, a computable bound on each eigenvalue's relative error (zeros for
            ``dense``, NaN for ``n_iter = 0``).
        total_variance: :math:`\\|V\\|_F^2 = \\operatorname{tr} K` (0-dim float64 tensor).
        total_variance_is_exact: False when :math:`\\|V\\|_F^2` is Hutchinson's estimate
            from the sketch (``matrix_free`` with an energy whose statistics do not cover the
            fitting data).
        num_examples: N, the number of fitting examples over all processes.
        num_parameters: P = |theta|.
        strategy: the strategy ``fit`` ran (``auto`` resolved); ``strategy_used`` on
            :class:`LowRankNFK`.
        mean_score: (P,) mean score :math:`z`, or None when the energy does not centre.
        fisher_diagonal: (P,) diagonal Fisher :math:`I` (float64), or None when the energy
            does not normalise.
        products: products :math:`V^\\top V Z` the subspace iteration took (passes over
            the fitting data besides the statistics; ``n_iter + 1`` unless ``tol`` stopped
            it early), 0 for ``dense`` and for states saved before it was recorded.
    """

    singular_values: Tensor
    components: Tensor
    residuals: Tensor
    total_variance: Tensor
    total_variance_is_exact: bool
    num_examples: int
    num_parameters: int
    strategy: str
    mean_score: Tensor | None
    fisher_diagonal: Tensor | None
    products: int = 0

    @property
    def eigenvalues(self) -> Tensor:
        """(k,) kernel operator eigenvalues :math:`\\lambda_i = \\sigma_i^2 / N` (Eq. 5)."""
        return self.singular_values.square() / self.num_examples

    @property
    def gram_eigenvalues(self) -> Tensor:
        """(k,) eigenvalues :math:`\\Lambda_i = \\sigma_i^2` of the Gram matrix :math:`V V^\\top`."""
        return self.singular_values.square()

    @property
    def explained_variance_ratio(self) -> Tensor:
        """(k,) :math:`\\sigma_i^2 / \\|V\\|_F^2` per component (sklearn's convention)."""
        return self.gram_eigenvalues / self.total_variance


def migrate(state: dict[str, Any]) -> dict[str, Any]:
    """A state of an earlier format in the current one. Version 2 keyed the snapshot by
    the names of an internal wrapper (``net.`` before the module's names); versions 2 and 3
    did not record ``products`` (0: unknown)."""
    if state["version"] == 2:
        state = {**state, "version": 3}
        for part in ("theta", "constants"):
            state[part] = {n.removeprefix("net."): t for n, t in state[part].items()}
    if state["version"] == 3:
        state = {**state, "version": STATE_VERSION}
        state["result"] = {**state["result"], "products": 0}
    return state


def check_state(state: object, energy: Energy, path: object = "the state") -> None:
    keys = {"version", "energy", "config", "theta", "constants", "result"}
    if isinstance(state, dict) and state.get("version", STATE_VERSION) not in READABLE:
        raise ValueError(
            f"{path} has format version {state['version']}; this lightning-nfk reads versions "
            f"{' and '.join(map(str, READABLE))}: fit again and save."
        )
    if not isinstance(state, dict) or not keys <= set(state):
        found = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"{path} is not a saved LowRankNFK (expected keys {sorted(keys)}, found {found}); "
            "a model's state_dict is loaded with module.load_state_dict, not LowRankNFK.load."
        )
    if state["energy"] != type(energy).__name__:
        raise ValueError(
            f"{path} was saved for a {state['energy']}, not a {type(energy).__name__}: its "
            "centring and Fisher would not be this energy's."
        )
    saved, current = state.get("energy_settings"), energy.settings()
    if saved is None and current != Energy.settings(energy):
        raise ValueError(
            f"{path} does not record the {type(energy).__name__} settings it was fitted with "
            f"(saved by an older lightning-nfk), so it cannot be checked against {current}: "
            "fit again and save."
        )
    if saved is not None and saved != current:
        diff = [k for k in dict.fromkeys([*saved, *current]) if saved.get(k) != current.get(k)]
        said = ", ".join(f"{k}={saved.get(k)!r} (the energy has {current.get(k)!r})" for k in diff)
        # a `*_version` setting is how the score is computed, not an option one can pass
        cure = (
            "it was fitted by an older lightning-nfk: fit again and save"
            if any(k.endswith("_version") for k in diff)
            else "build the energy with the saved settings"
        )
        raise ValueError(
            f"{path} was fitted with another {type(energy).__name__}: {said}. Its components "
            f"would embed another score function; {cure}."
        )


def check_tensors(what: str, saved: dict[str, Tensor], current: dict[str, Tensor]) -> None:
    if list(saved) != list(current):
        raise ValueError(
            f"The saved {what}s do not match the energy's module: saved {list(saved)[:4]}..., "
            f"the module has {list(current)[:4]}...."
        )
    for name, t in saved.items():
        if t.shape != current[name].shape or t.dtype != current[name].dtype:
            raise ValueError(
                f"The saved {what} {name!r} has shape "
                f"{tuple(t.shape)} and dtype {t.dtype}; the energy's module has "
                f"{tuple(current[name].shape)} and {current[name].dtype} (another architecture "
                "or number of classes?)."
            )


__all__ = ["READABLE", "STATE_VERSION", "NFKFit", "check_state", "check_tensors", "migrate"]
