"""The activation slot of a pair `hpml_ops.convert` fused (`Linear, act` or `BatchNorm, ReLU`).

The fused module applies the activation in its own kernel; the slot after it keeps the activation
module, now of a subclass of its class (``AbsorbedReLU`` is an ``nn.ReLU``, with the same
attributes and no state), that passes its input through *only when the input is the output the
fused module just produced with the activation applied*. On anything else it applies the
activation itself. So the pair stays correct when a torch helper rebuilds or replaces the fused
module from its class (``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, ``fuse_conv_bn_eval``
by hand, a forward hook that returns another tensor): the activation is then applied by the slot,
never lost and never applied twice. With a forward hook on the fused module, the module leaves the
activation to the slot, so the hook sees the pre-activation output, as on torch's modules; and
under torch.compile likewise (nothing handed over to trace; the compiler fuses the activation).

The hand-over is one attribute: the fused module stores its output in the slot's ``__dict__``
(``_fused_out``), the slot pops it and compares identities. Neither is state: not in the
``state_dict``, dropped when pickled or copied.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _global_forward_hooks


class _Absorbed:
    """Mixin over an activation module class (see the module docstring)."""

    def forward(self, input: Tensor) -> Tensor:
        # (Under torch.compile the fused module leaves the activation to this slot: no hand-over
        # to trace, and the compiler fuses the activation itself.)
        if not torch.compiler.is_compiling() and self.__dict__.pop("_fused_out", None) is input:
            return input  # the fused module applied this activation already
        return super().forward(input)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_fused_out", None)
        return state


class AbsorbedReLU(_Absorbed, nn.ReLU):
    """``nn.ReLU`` in the slot after a module that applies it (``hpml_ops.convert``)."""


class AbsorbedLeakyReLU(_Absorbed, nn.LeakyReLU):
    """``nn.LeakyReLU`` in the slot after a module that applies it (``hpml_ops.convert``)."""


class AbsorbedSigmoid(_Absorbed, nn.Sigmoid):
    """``nn.Sigmoid`` in the slot after a module that applies it (``hpml_ops.convert``)."""


class AbsorbedTanh(_Absorbed, nn.Tanh):
    """``nn.Tanh`` in the slot after a module that applies it (``hpml_ops.convert``)."""


_ABSORBED = {
    nn.ReLU: AbsorbedReLU,
    nn.LeakyReLU: AbsorbedLeakyReLU,
    nn.Sigmoid: AbsorbedSigmoid,
    nn.Tanh: AbsorbedTanh,
}


def absorb(fused: nn.Module, act: nn.Module) -> nn.Module:
    """The slot that replaces ``act`` after ``fused`` (which now applies ``act``): the same module
    state as ``act``, of its absorbed class, linked from ``fused``."""
    cls = _ABSORBED[type(act)]
    slot = cls.__new__(cls)
    slot.__dict__.update(act.__dict__)
    fused.__dict__["_hpml_absorbed"] = slot
    return slot


def defer_activation(module: nn.Module) -> bool:
    """Whether ``module`` (followed by its slot) leaves the activation to the slot: a forward
    hook must see its own (pre-activation) output, or torch.compile is tracing it."""
    return bool(module._forward_hooks or _global_forward_hooks) or torch.compiler.is_compiling()
