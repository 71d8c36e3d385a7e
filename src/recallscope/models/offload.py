"""Reading weights that accelerate keeps offloaded under a device map.

With ``device_map=...`` accelerate may keep a module's parameters on the meta device between
forwards and load them from an offload store (CPU memory or disk) around each call. Code that
reads weights directly (decompositions, projections, architecture discovery) reads them here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from recallscope.errors import SiteError

__all__ = ["OffloadedWeights", "accelerate_hooks"]


def accelerate_hooks(module: nn.Module) -> list[Any]:
    """The accelerate hooks on ``module`` (a ``SequentialHook`` holds several)."""
    hook = getattr(module, "_hf_hook", None)
    return list(getattr(hook, "hooks", None) or ([hook] if hook is not None else []))


class OffloadedWeights:
    """Values of a model's parameters and buffers, wherever accelerate keeps them."""

    def __init__(self, hf_model: nn.Module) -> None:
        self.hf_model = hf_model
        self._index: dict[int, tuple[Any, str, Any]] | None = None

    def read(self, module: nn.Module, name: str) -> torch.Tensor | None:
        """``module.<name>`` detached (on the device the module runs on), or None if it has none."""
        value = getattr(module, name, None)
        if not isinstance(value, torch.Tensor):
            return None
        if value.device.type != "meta":
            return value.detach()
        weights, prefix, device = self._entry(module, name)
        return weights[prefix + name].detach().to(device)

    def execution_device(self, module: nn.Module) -> Any:
        """The device an offloaded ``module`` runs on."""
        return self._entry(module, "weight")[2]

    def device_of(self, module: nn.Module) -> torch.device:
        """The device ``module`` runs on: its weight's, or where accelerate runs it when offloaded."""
        weight = module.weight
        return weight.device if weight.device.type != "meta" else torch.device(self.execution_device(module))

    def _entry(self, module: nn.Module, name: str) -> tuple[Any, str, Any]:
        if self._index is None:
            self._index = _offload_index(self.hf_model)
        if id(module) not in self._index:
            raise SiteError(
                f"{type(module).__name__}.{name} is on the meta device but no accelerate hook holds its "
                "value: load the model with load_model(..., device_map=...) (or dispatch it with "
                "accelerate.dispatch_model) rather than building it on the meta device"
            )
        return self._index[id(module)]


def _offload_index(hf_model: nn.Module) -> dict[int, tuple[Any, str, Any]]:
    """``{id(module): (offload store, key prefix, execution device)}`` for every module whose
    weights an accelerate ``AlignDevicesHook`` keeps offloaded (the hook may sit on the module or
    on a parent that places its submodules).
    """
    index: dict[int, tuple[Any, str, Any]] = {}
    for owner in hf_model.modules():
        for h in accelerate_hooks(owner):
            if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
                for sub_name, sub in owner.named_modules():
                    prefix = f"{sub_name}." if sub_name else ""
                    index.setdefault(id(sub), (h.weights_map, prefix, h.execution_device))
    return index
