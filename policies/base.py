"""Shared pieces of the policies (the contract itself is ``tandem.core.protocols.Policy``)."""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch


class TrainedComponent:
    """Mixin: the trained parameters are those of ``self.trained_module`` (a pipeline component, with any LoRA
    layers injected in place) that require grad — one naming for the optimizer, checkpoints and sampling."""

    trained_module: torch.nn.Module

    def trainable_named_parameters(self) -> List[Tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.trained_module.named_parameters() if p.requires_grad]

    def trainable_parameters(self) -> List[torch.nn.Parameter]:
        return [p for _, p in self.trainable_named_parameters()]

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.trainable_named_parameters()}
