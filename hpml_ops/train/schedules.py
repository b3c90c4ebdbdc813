"""Learning-rate schedules of the lecture, built from ``torch.optim.lr_scheduler``.

Time ``t`` counts optimizer steps (not micro-batches, not epochs) from 0; ``T`` is the number of
steps the schedule runs (the total minus the warm-up). ``α0`` is the optimizer's learning rate.

=============  ==========================================  ==================================
schedule       learning rate at step t                     torch scheduler
=============  ==========================================  ==================================
constant       α0                                          ``ConstantLR(factor=1)``
inverse        α0 / (1 + γ t)                              ``LambdaLR`` (torch has no class)
exponential    α0 exp(-γ t)                                ``ExponentialLR(gamma=exp(-γ))``
polynomial     α0 (1 - t / T)^n   (n = 1: linear)          ``PolynomialLR(T, power=n)``
multistep      α0 / γ^k, k = milestones passed             ``MultiStepLR(gamma=1/γ)``
cosine         η + (α0 - η)(1 + cos(π t / T)) / 2          ``CosineAnnealingLR(T, eta_min=η)``
triangular     α0 + (α1 - α0) max(0, 1 - x)                ``CyclicLR(mode="triangular")``
triangular2    same, amplitude halved every cycle          ``CyclicLR(mode="triangular2")``
exp_range      same, amplitude times γ^t                   ``CyclicLR(mode="exp_range")``
=============  ==========================================  ==================================

For the cyclical policies (Smith, 2017) ``α1`` is ``max_lr``, ``s`` the half-cycle
(``step_size_up``), ``cycle = floor(1 + t / 2s)`` and ``x = |t / s - 2 cycle + 1|``.

Warm-up (optional): ``LinearLR`` from ``warmup_start_factor * α0`` up to α0 over ``warmup_steps``
steps, then the schedule above with ``t`` restarting at 0 (``SequentialLR``). The linear scaling
rule (:func:`scaled_lr`) multiplies α0 (and ``max_lr``) by ``effective batch / reference batch``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch.optim import Optimizer
from torch.optim import lr_scheduler as lrs

SCHEDULES = (
    "constant",
    "inverse",
    "exponential",
    "polynomial",
    "multistep",
    "cosine",
    "triangular",
    "triangular2",
    "exp_range",
)
CYCLIC = ("triangular", "triangular2", "exp_range")

__all__ = [
    "CYCLIC",
    "SCHEDULES",
    "ScheduleConfig",
    "build_scheduler",
    "current_lr",
    "lecture_lr",
    "scaled_lr",
]


@dataclass
class ScheduleConfig:
    """Parameters of a schedule; ``None`` means "the default for ``total_steps``" (see
    :meth:`resolved`)."""

    name: str = "constant"
    gamma: float | None = None  # inverse / exponential rate, multistep divisor, exp_range base
    power: float = 1.0  # polynomial exponent n
    milestones: Sequence[int] | None = None  # multistep: steps at which the lr is divided by γ
    min_lr: float = 0.0  # cosine η
    max_lr: float | None = None  # cyclical α1
    step_size_up: int | None = None  # cyclical half-cycle s, in steps
    cycle_momentum: bool = False  # cyclical: momentum cycles inversely, max_momentum..base
    base_momentum: float = 0.8
    max_momentum: float = 0.9
    warmup_steps: int = 0
    warmup_start_factor: float = 0.1

    def resolved(self, total_steps: int, lr: float) -> ScheduleConfig:
        """A copy with every ``None`` replaced by its default for a run of ``total_steps``
        optimizer steps (warm-up included) at learning rate ``lr``:

        inverse ``γ = 9 / T`` and exponential ``γ = ln(100) / T`` (the lr ends 10x and 100x
        lower), multistep ``γ = 10`` at 50% and 75% of ``T``, exp_range ``γ = 0.1^(1/T)``,
        cyclical ``max_lr = 10 α0`` and 4 cycles over ``T`` (``s = T / 8``)."""
        if self.name not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.name!r}")
        t = max(1, total_steps - self.warmup_steps)
        out = ScheduleConfig(**{**self.__dict__})
        if out.gamma is None:
            out.gamma = {
                "inverse": 9.0 / t,
                "exponential": math.log(100.0) / t,
                "multistep": 10.0,
                "exp_range": 0.1 ** (1.0 / t),
            }.get(self.name, 1.0)
        if out.milestones is None:
            out.milestones = [t // 2, (3 * t) // 4]
        if out.max_lr is None:
            out.max_lr = 10.0 * lr
        if out.step_size_up is None:
            out.step_size_up = max(1, t // 8)
        return out


def scaled_lr(lr: float, effective_batch: int, reference_batch: int | None) -> float:
    """The linear scaling rule: ``lr * effective_batch / reference_batch`` (``lr`` unchanged when
    ``reference_batch`` is None). ``effective_batch`` = batch x accumulation steps x processes."""
    if reference_batch is None:
        return lr
    if reference_batch <= 0:
        raise ValueError(f"reference batch size must be positive, got {reference_batch}")
    return lr * effective_batch / reference_batch


def _main_scheduler(opt: Optimizer, cfg: ScheduleConfig, t: int) -> lrs.LRScheduler:
    name, g = cfg.name, cfg.gamma
    if name == "constant":
        return lrs.ConstantLR(opt, factor=1.0, total_iters=0)
    if name == "inverse":
        return lrs.LambdaLR(opt, lambda step: 1.0 / (1.0 + g * step))
    if name == "exponential":
        return lrs.ExponentialLR(opt, gamma=math.exp(-g))
    if name == "polynomial":
        return lrs.PolynomialLR(opt, total_iters=t, power=cfg.power)
    if name == "multistep":
        if g <= 0:
            raise ValueError(f"multistep: the divisor gamma must be positive, got {g}")
        return lrs.MultiStepLR(opt, milestones=list(cfg.milestones), gamma=1.0 / g)
    if name == "cosine":
        return lrs.CosineAnnealingLR(opt, T_max=t, eta_min=cfg.min_lr)
    # Cyclical: the optimizer's lr is the base; CyclicLR sets it at construction.
    base = [group["lr"] for group in opt.param_groups]
    if cfg.cycle_momentum and not any(
        group.get("momentum", 0) > 0 or "betas" in group for group in opt.param_groups
    ):
        raise ValueError("cycle_momentum needs an optimizer with momentum (SGD momentum > 0, Adam)")
    return lrs.CyclicLR(
        opt,
        base_lr=base,
        max_lr=cfg.max_lr,
        step_size_up=cfg.step_size_up,
        mode=name,
        gamma=g,
        cycle_momentum=cfg.cycle_momentum,
        base_momentum=cfg.base_momentum,
        max_momentum=cfg.max_momentum,
    )


def build_scheduler(optimizer: Optimizer, cfg: ScheduleConfig, total_steps: int) -> lrs.LRScheduler:
    """The scheduler for ``cfg`` over ``total_steps`` optimizer steps; call its ``step()`` once
    after each ``optimizer.step()``. ``cfg`` should be :meth:`ScheduleConfig.resolved`."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if cfg.warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if cfg.warmup_steps >= total_steps:
        raise ValueError(
            f"warmup_steps ({cfg.warmup_steps}) must be fewer than the total steps ({total_steps})"
        )
    t = total_steps - cfg.warmup_steps
    if cfg.warmup_steps == 0:
        return _main_scheduler(optimizer, cfg, t)
    if not 0.0 < cfg.warmup_start_factor <= 1.0:
        raise ValueError(f"warmup_start_factor must be in (0, 1], got {cfg.warmup_start_factor}")
    main = _main_scheduler(optimizer, cfg, t)
    warm = lrs.LinearLR(
        optimizer,
        start_factor=cfg.warmup_start_factor,
        end_factor=1.0,
        total_iters=cfg.warmup_steps,
    )
    return lrs.SequentialLR(optimizer, [warm, main], milestones=[cfg.warmup_steps])


def lecture_lr(cfg: ScheduleConfig, lr: float, t: int, total_steps: int) -> float:
    """The learning rate at step ``t`` by the closed-form formulas of the table above (a check on
    :func:`build_scheduler`; ``cfg`` resolved)."""
    w = cfg.warmup_steps
    if t < w:
        f0 = cfg.warmup_start_factor
        return lr * (f0 + (1.0 - f0) * t / w)
    t -= w
    big_t = total_steps - w
    name, g = cfg.name, cfg.gamma
    if name == "constant":
        return lr
    if name == "inverse":
        return lr / (1.0 + g * t)
    if name == "exponential":
        return lr * math.exp(-g * t)
    if name == "polynomial":
        return lr * (1.0 - min(t, big_t) / big_t) ** cfg.power
    if name == "multistep":
        return lr / g ** sum(1 for m in cfg.milestones if t >= m)
    if name == "cosine":
        return cfg.min_lr + (lr - cfg.min_lr) * (1.0 + math.cos(math.pi * t / big_t)) / 2.0
    s = cfg.step_size_up
    cycle = math.floor(1 + t / (2 * s))
    x = abs(t / s - 2 * cycle + 1)
    amp = (cfg.max_lr - lr) * max(0.0, 1.0 - x)
    if name == "triangular":
        return lr + amp
    if name == "triangular2":
        return lr + amp / 2.0 ** (cycle - 1)
    return lr + amp * g**t  # exp_range


def current_lr(optimizer: Optimizer) -> float:
    """The learning rate of the first parameter group."""
    return float(optimizer.param_groups[0]["lr"])
