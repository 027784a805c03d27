"""Euler, the first-order solver: x' = x + v·dt (``policies.sde.ode_step``, bit-identical to diffusers'
``FlowMatchEulerDiscreteScheduler.step``). Keeps no state."""

from __future__ import annotations

from tandem.policies.ode_solvers import ODE_SOLVERS, ODESolver
from tandem.policies.sde import ode_step


@ODE_SOLVERS.register("euler")
class Euler(ODESolver):
    def step(self, velocity, x, sigma, sigma_next, state):
        return ode_step(velocity, x, sigma, sigma_next), state
