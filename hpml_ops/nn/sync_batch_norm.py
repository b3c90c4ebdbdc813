"""``SyncBatchNorm``: batch normalization over the batch of every process of a
``torch.distributed`` group, on hpml_ops' kernels (gloo on CPU, nccl on GPU).

Forward: each process computes its per-channel ``(count, mean, M2)`` with
``hpml::batch_norm_stats``, one ``all_gather`` brings every process's triple, and each process
merges them in rank order with the parallel-variance formula (Chan et al.), so processes may hold
different batch sizes (even none) and all get the same bits. The input is then normalised with
the merged statistics by the batch-norm kernel (with the ReLU fused). Backward: each process
reduces ``(sum dz, sum dz (x - mean))`` with ``hpml::batch_norm_backward_reduce``, one
``all_reduce`` sums them over the group, and ``hpml::batch_norm_backward_elemt`` forms the input
gradient from the group's sums. The weight and bias gradients stay per process, as torch's
``SyncBatchNorm`` leaves them: ``DistributedDataParallel`` all-reduces parameter gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from .. import _backend
from ..constants import BN_ACTIVATIONS, acc_dtype
from ..ops.batch_norm import OP
from .batch_norm import _FusedBatchNormMixin

_OP = "batch_norm"
# torch >= 2.12 names it all_gather_single (all_gather_into_tensor is deprecated there).
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _merge_stats(gathered: Tensor, c: int) -> tuple[Tensor, Tensor, Tensor]:
    """(count, mean, M2) of the union from the rows (count, mean[c], M2[c]) of each process,
    merged in rank order: mean += d n_b / n, M2 += M2_b + d^2 n_a n_b / n, d = mean_b - mean_a."""
    count = gathered.new_zeros(())
    mean = gathered.new_zeros(c)
    m2 = gathered.new_zeros(c)
    for row in gathered:
        n_b, mean_b, m2_b = row[0], row[1 : c + 1], row[c + 1 :]
        if n_b.item() == 0:
            continue
        n = count + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / n)
        m2 = m2 + m2_b + delta * delta * (count * n_b / n)
        count = n
    return count, mean, m2


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        input,
        weight,
        bias,
        running_mean,
        running_var,
        eps,
        momentum,
        activation,
        process_group,
        world_size,
        backend,
    ):
        ops = OP.ops[backend]
        fwd, stats_op = ops["batch_norm"], ops["batch_norm_stats"]
        c = input.shape[1]
        local_count = input.numel() // c if c else 0
        if local_count > 0:
            mean_l, var_l = stats_op(input)
        else:  # an empty batch on this process: it still takes part in the collectives
            dt = acc_dtype(input.dtype)
            mean_l = var_l = torch.zeros(c, dtype=dt, device=input.device)
        # fp64 on the wire: counts stay exact and the merge adds no rounding of its own.
        row = torch.cat(
            [
                torch.tensor([float(local_count)], dtype=torch.float64, device=input.device),
                mean_l.double(),
                var_l.double() * local_count,
            ]
        )
        gathered = row.new_empty(world_size * row.numel())  # flat: what gloo accepts
        _all_gather(gathered, row, process_group)
        count, mean, m2 = _merge_stats(gathered.view(world_size, -1), c)
        total = int(count.item())
        if total <= 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got input size "
                f"{input.size()} on this process and {total} value(s) per channel in the group"
            )
        var_b = m2 / total
        if running_mean is not None and running_var is not None:
            # As torch: running = (1 - momentum) running + momentum batch, the variance unbiased.
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            unbiased = var_b * total / (total - 1)
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        stat_dt = mean_l.dtype
        # Normalise with the group's statistics: the forward kernel in its "given statistics"
        # mode, which also returns the mean and invstd it used (in the statistics dtype).
        out, mean_used, invstd, _ = fwd(
            input, weight, bias, mean.to(stat_dt), var_b.to(stat_dt), False, eps, activation
        )
        ctx.save_for_backward(
            input, weight, out if activation == 1 else out.new_empty((0,)), mean_used, invstd
        )
        ctx.total = total
        ctx.activation = activation
        ctx.process_group = process_group
        ctx.backend = backend
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        input, weight, out, mean, invstd = ctx.saved_tensors
        ops = OP.ops[ctx.backend]
        reduce_op, elemt_op = ops["batch_norm_backward_reduce"], ops["batch_norm_backward_elemt"]
        sum_dz, sum_dz_xmu = reduce_op(grad, input, out, mean, ctx.activation)
        gw = gb = gx = None
        if weight is not None and ctx.needs_input_grad[1]:
            gw = (sum_dz_xmu * invstd).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = sum_dz.to(weight.dtype if weight is not None else input.dtype)
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dz, sum_dz_xmu])
            dist.all_reduce(sums, dist.ReduceOp.SUM, group=ctx.process_group)
            c = input.shape[1]
            gx = elemt_op(
                grad,
                input,
                weight,
                out,
                mean,
                invstd,
                sums[:c],
                sums[c:],
                ctx.total,
                ctx.activation,
            )
        return gx, gw, gb, None, None, None, None, None, None, None, None


class SyncBatchNorm(_FusedBatchNormMixin, _BatchNorm):
    """Drop-in for ``torch.nn.SyncBatchNorm``: same constructor (plus ``activation=None`` or
    ``"relu"``, fused, and ``backend=None`` or a backend name), buffers and ``state_dict``; input
    ``(N, C, *)``. In training, with a ``torch.distributed`` group of more than one process, the
    statistics are those of the whole group's batch (processes may hold different batch sizes),
    on CPU (gloo) and GPU (nccl); otherwise it is ``hpml_ops.nn.BatchNorm*d``. Use
    ``convert_sync_batchnorm`` on a model before wrapping it in ``DistributedDataParallel``.

    A subclass of torch's ``_BatchNorm``, not of ``torch.nn.SyncBatchNorm``: DDP refuses any
    ``torch.nn.SyncBatchNorm`` in a CPU module (torch's runs on GPUs only), ours runs on CPU."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        activation: str | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.process_group = process_group
        self._init_activation(activation, backend)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input: Tensor) -> None:
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        need_sync = bn_training and self.training and dist.is_available() and dist.is_initialized()
        world_size = 1
        if need_sync:
            process_group = self.process_group or dist.group.WORLD
            world_size = dist.get_world_size(process_group)
            need_sync = world_size > 1
        if not need_sync:
            return super().forward(input)  # the single-process batch norm
        # torch's bookkeeping, as _FusedBatchNormMixin.forward.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = (
                1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            )
        running_mean = self.running_mean if self.track_running_stats else None
        running_var = self.running_var if self.track_running_stats else None
        if not input.is_floating_point():
            raise RuntimeError(f"{_OP}: expected a floating-point input, got {input.dtype}")
        if self.backend is None:
            backend = _backend.resolve(input.device, _OP)
        else:
            with _backend.use_backend(self.backend):
                backend = _backend.resolve(input.device, _OP)
        if backend == "reference":
            raise _backend.BackendUnavailableError(
                "hpml_ops.nn.SyncBatchNorm runs on the cpp or triton backend; neither can run "
                f"on {input.device.type} tensors here (backend_status() says why)"
            )
        out = _SyncBatchNormFunction.apply(
            input,
            self.weight,
            self.bias,
            running_mean,
            running_var,
            self.eps,
            factor,
            BN_ACTIVATIONS[self.activation],
            process_group,
            world_size,
            backend,
        )
        slot = self.__dict__.get("_hpml_absorbed")  # convert's ReLU slot (nn/_absorbed.py)
        if slot is not None and self.activation is not None:
            slot.__dict__["_fused_out"] = out
        return out

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None):
        """``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` to this class: every
        ``torch.nn.modules.batchnorm._BatchNorm`` in ``module`` (torch's or ours, keeping our
        fused activation) becomes a ``SyncBatchNorm`` with the same parameters, buffers,
        ``training`` flag and ``requires_grad``; returns the converted module."""
        module_output = module
        if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
            module_output = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                process_group,
                activation=getattr(module, "activation", None),
                backend=getattr(module, "backend", None),
            )
            if module.affine:
                with torch.no_grad():
                    module_output.weight = module.weight
                    module_output.bias = module.bias
            module_output.running_mean = module.running_mean
            module_output.running_var = module.running_var
            module_output.num_batches_tracked = module.num_batches_tracked
            module_output.training = module.training
            if hasattr(module, "qconfig"):
                module_output.qconfig = module.qconfig
            if "_hpml_absorbed" in module.__dict__:  # convert's ReLU slot follows it
                module_output.__dict__["_hpml_absorbed"] = module.__dict__["_hpml_absorbed"]
        for name, child in module.named_children():
            module_output.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        del module
        return module_output


def convert_sync_batchnorm(module: torch.nn.Module, process_group=None) -> torch.nn.Module:
    """``SyncBatchNorm.convert_sync_batchnorm(module, process_group)``."""
    return SyncBatchNorm.convert_sync_batchnorm(module, process_group)


__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]
