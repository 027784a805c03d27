"""Solvers of the deterministic (ODE) steps of a flow rollout, one file each, swapped by ``decoder.ode_solver``
the way diffusers swaps schedulers.

A solver is a class with one method, registered under its config name::

    @ODE_SOLVERS.register("name")
    class MySolver(ODESolver):
        def step(self, v, x, sigma, sigma_next, state):
            return x_next, state

``step`` takes the model velocity v and latent x at σ (both (B, ...)), the floats σ > σ', and the solver's own
``state`` (None at the first step of a rollout; e.g. a multistep solver's history), and returns the float32
latent at σ' and the state for the next step. Convention as in ``policies.sde``: x_σ = (1 − σ)·x₀ + σ·ε,
v = ε − x₀, dt = σ' − σ < 0.

``FlowPolicy.rollout`` calls ``step`` on every step of the schedule. Inside the SDE window it keeps the
returned state but takes the SDE kernel's sample in place of ``x_next``, so a multistep solver's history runs
through the window (MixGRPO-Flash, Li et al. 2025, arXiv:2507.21802, §3.4, keeps its ``DPMState`` so).

Every module of this package is imported with it, so a new solver is one new file here that registers itself.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Tuple

import torch

from tandem.core.registry import Registry


class ODESolver:
    """One deterministic step rule of the flow ODE (module docstring)."""

    def step(self, velocity: torch.Tensor, x: torch.Tensor, sigma: float, sigma_next: float,
             state: Any) -> Tuple[torch.Tensor, Any]:
        raise NotImplementedError


ODE_SOLVERS: Registry[type] = Registry("ODE solver")

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
