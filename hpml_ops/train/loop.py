"""The training loop: mini-batch SGD with momentum (or Adam), a learning-rate schedule, gradient
accumulation, input normalisation, optional autocast, checkpoints that resume to the identical
loss curve, optional DistributedDataParallel.

One optimizer *step* consumes a *group* of up to ``accum_steps`` micro-batches of ``batch_size``
samples. Each micro-batch's mean loss is weighted by ``its samples / the group's samples`` before
``backward`` (``1 / accum_steps`` for full groups), so the accumulated gradient is the gradient of
the group's mean loss, also for the last, partial group of an epoch. The recorded loss of a step
is that mean. The schedule advances once per optimizer step.

Data order: epoch ``e`` visits the training samples in the order of
``DistributedSampler(shuffle=True, seed=seed)`` after ``set_epoch(e)`` — a permutation drawn from
a generator seeded with ``seed + e`` — with one replica in a single process, so a run with the
same seed sees the same batches whatever the model, and a checkpoint only needs the position
(epoch, step within the epoch) to resume. With ``--ddp`` each of ``W`` processes takes every
``W``-th sample of that permutation: with a per-process batch ``B / W`` the union of the
processes' micro-batches is the single-process micro-batch of ``B`` samples (when ``W`` divides
the training set; otherwise the sampler pads it by repeating the first samples).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from .. import _backend
from .. import nn as hnn
from ..models import ACTIVATIONS, INITS, MLP
from .data import DATASETS, Dataset, accuracy, load_dataset
from .normalize import NORMALIZATIONS, Normalizer
from .schedules import SCHEDULES, ScheduleConfig, build_scheduler, current_lr, scaled_lr

OPTIMIZERS = ("sgd", "adam")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CHECKPOINT = "checkpoint.pt"

__all__ = ["ConfigError", "TrainConfig", "TrainResult", "train"]


class ConfigError(ValueError):
    """A setting that cannot work (bad value, unavailable backend or device); the message is one
    line that names the setting."""


@dataclass
class TrainConfig:
    """Every setting of a run (the CLI's flags, one to one)."""

    # data
    dataset: str = "breast_cancer"
    n_samples: int = 10_000  # synthetic only
    n_features: int = 32  # synthetic only
    test_fraction: float = 0.2
    normalize: str = "standard"
    # model
    hidden: tuple[int, ...] = (64, 32)
    activation: str = "relu"
    batch_norm: bool = True
    init: str = "he"
    # optimisation
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 32  # per process
    accum_steps: int = 1
    epochs: int = 30
    lr_reference_batch: int | None = None  # linear scaling rule: lr *= effective batch / this
    # schedule (see schedules.py; None = default for the run's length)
    schedule: str = "cosine"
    lr_gamma: float | None = None
    power: float = 1.0
    milestones: tuple[int, ...] | None = None
    min_lr: float = 0.0
    max_lr: float | None = None
    cycle_steps: int | None = None
    cycle_momentum: bool = False
    warmup_steps: int = 0
    warmup_start_factor: float = 0.1
    # execution
    backend: str = "auto"
    device: str = "auto"
    dtype: str = "fp32"
    seed: int = 0
    ddp: bool = False
    # output
    out_dir: str | None = None
    checkpoint_every: int = 0  # optimizer steps; 0: only at the end
    resume: str | None = None
    stop_at_step: int | None = None  # stop (and checkpoint) after this optimizer step
    progress: bool = True
    log_every: int = 1  # epochs between printed lines; 0: none

    # Settings that define the trajectory: a checkpoint resumes only with the same values.
    TRAJECTORY = (
        "dataset", "n_samples", "n_features", "test_fraction", "normalize", "hidden",
        "activation", "batch_norm", "init", "optimizer", "lr", "momentum", "weight_decay",
        "batch_size", "accum_steps", "epochs", "lr_reference_batch", "schedule", "lr_gamma",
        "power", "milestones", "min_lr", "max_lr", "cycle_steps", "cycle_momentum",
        "warmup_steps", "warmup_start_factor", "dtype", "seed",
    )  # fmt: skip

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def schedule_config(self) -> ScheduleConfig:
        return ScheduleConfig(
            name=self.schedule,
            gamma=self.lr_gamma,
            power=self.power,
            milestones=self.milestones,
            min_lr=self.min_lr,
            max_lr=self.max_lr,
            step_size_up=self.cycle_steps,
            cycle_momentum=self.cycle_momentum,
            warmup_steps=self.warmup_steps,
            warmup_start_factor=self.warmup_start_factor,
        )

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def validate(self) -> TrainConfig:
        """Raise ``ConfigError`` (one line, naming the setting) for anything that cannot run;
        return ``self``."""

        def bad(msg: str) -> None:
            raise ConfigError(msg)

        def choice(name: str, allowed) -> None:
            v = getattr(self, name)
            if v not in allowed:
                bad(f"{name} must be one of {', '.join(map(str, allowed))}, got {v!r}")

        choice("dataset", DATASETS)
        choice("normalize", NORMALIZATIONS)
        choice("activation", ACTIVATIONS)
        choice("init", INITS)
        choice("optimizer", OPTIMIZERS)
        choice("schedule", SCHEDULES)
        choice("dtype", tuple(DTYPES))
        choice("backend", _backend.CHOICES)
        for name in ("batch_size", "accum_steps", "epochs"):
            if getattr(self, name) < 1:
                bad(f"{name} must be a positive integer, got {getattr(self, name)}")
        if any(h < 1 for h in self.hidden):
            bad(f"hidden sizes must be positive, got {list(self.hidden)}")
        if self.dataset == "synthetic" and (self.n_samples < 4 or self.n_features < 1):
            bad("synthetic data needs n_samples >= 4 and n_features >= 1")
        if not 0.0 < self.test_fraction < 1.0:
            bad(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad(f"lr must be positive, got {self.lr}")
        if self.momentum < 0 or self.weight_decay < 0:
            bad("momentum and weight_decay must be >= 0")
        if self.lr_reference_batch is not None and self.lr_reference_batch < 1:
            bad(f"lr_reference_batch must be positive, got {self.lr_reference_batch}")
        if self.warmup_steps < 0 or self.checkpoint_every < 0 or self.log_every < 0:
            bad("warmup_steps, checkpoint_every and log_every must be >= 0")
        if self.stop_at_step is not None and self.stop_at_step < 1:
            bad(f"stop_at_step must be positive, got {self.stop_at_step}")
        if self.resume is not None and not os.path.isfile(self.resume):
            bad(f"resume: no checkpoint file at {self.resume}")
        if self.device != "auto":
            try:
                dev = torch.device(self.device)
            except RuntimeError:
                bad(f"device {self.device!r} is not a device torch knows")
            if dev.type not in ("cpu", "cuda"):
                bad(f"device must be cpu or cuda, got {self.device!r}")
            if dev.type == "cuda" and not torch.cuda.is_available():
                bad("device cuda asked for, but no CUDA device is available here")
        dev = self.resolved_device()
        if self.dtype == "fp16" and dev.type != "cuda":
            bad("dtype fp16 (autocast with a grad scaler) needs a CUDA device; use bf16 on CPU")
        if self.backend != "auto":
            reason = _backend.unavailable_reason(self.backend, dev.type)
            if reason is not None:
                bad(f"backend {self.backend!r} is not available on {dev.type}: {reason}")
        return self


@dataclass
class TrainResult:
    """What a run returns: the trained model (unwrapped from DDP), the fitted normaliser, the
    history and the config."""

    model: nn.Module
    normalizer: Normalizer
    history: dict
    config: TrainConfig
    data: Dataset | None = None
    backend: str = ""
    stopped_early: bool = False
    extra: dict = field(default_factory=dict)


# Devices with torch's fused optimizer kernels (one call updates every parameter).
_FUSED_OPTIMIZER_DEVICES = ("cpu", "cuda")


def _make_optimizer(cfg: TrainConfig, params, lr: float) -> torch.optim.Optimizer:
    """The run's optimizer, torch's fused implementation (``fused=True``: one kernel call for all
    parameters) where torch has it for these parameters (floating point, on CPU or CUDA): on a
    small net the for-loop implementation's ten per-parameter updates in Python cost more than
    the whole network's forward (~63 us against ~27 us fused, 1 thread). The same update rule; the
    values may differ from the for-loop's in the last bit (it forms the weight-decay term its own
    way). The fused and the PyTorch run of ``--compare-reference`` both get it."""
    params = list(params)
    fused = bool(params) and all(
        p.dtype.is_floating_point and p.device.type in _FUSED_OPTIMIZER_DEVICES for p in params
    )
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused
        )
    return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay, fused=fused)


def _micro_batches(indices: Tensor, batch_size: int, drop_single: bool) -> list[Tensor]:
    mbs = list(torch.split(indices, batch_size))
    # Batch norm cannot normalise one sample in training: drop a trailing 1-sample batch.
    if drop_single and mbs and mbs[-1].numel() < 2:
        mbs.pop()
    return mbs


def _epoch_groups(sampler, epoch: int, cfg: TrainConfig) -> list[list[Tensor]]:
    sampler.set_epoch(epoch)
    indices = torch.tensor(list(iter(sampler)), dtype=torch.int64)
    mbs = _micro_batches(indices, cfg.batch_size, cfg.batch_norm)
    return [mbs[i : i + cfg.accum_steps] for i in range(0, len(mbs), cfg.accum_steps)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loss_fn: nn.Module,
    x: Tensor,
    y: Tensor,
    autocast: Callable[[], contextlib.AbstractContextManager],
    chunk: int = 8192,
) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` (in eval mode) on ``(x, y)``."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for xs, ys in zip(torch.split(x, chunk), torch.split(y, chunk), strict=True):
        with autocast():
            logits = model(xs)
        loss_sum += loss_fn(logits.float(), ys).item() * xs.shape[0]
        correct += int(accuracy(logits, ys))
    model.train(was_training)
    n = max(1, x.shape[0])
    return loss_sum / n, correct / n


def loss_of(net: nn.Module, loss_fn: nn.Module, amp_dtype, device_type: str):
    """``(x, y) -> (loss, logits)`` for one micro-batch: the net and the loss as one op each way
    (``FusedMLP.bce_with_logits``) where the net is a ``FusedMLP`` itself (not wrapped: DDP's
    hooks must see its forward), the loss the library's and no autocast; else the net (under
    autocast when ``amp_dtype``), then the loss on fp32 logits."""
    if (
        amp_dtype is None
        and isinstance(net, hnn.FusedMLP)
        and isinstance(loss_fn, hnn.BCEWithLogitsLoss)
    ):

        def fused(x, y):
            return net.bce_with_logits(
                x, y, loss_fn.weight, loss_fn.pos_weight, loss_fn.reduction, return_logits=True
            )

        return fused

    def apart(x, y):
        with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = net(x)
        return loss_fn(logits.float(), y), logits

    return apart


def _step(net, group, x, y, forward_loss, optimizer, scaler) -> Tensor:
    """One optimizer step over the micro-batches of ``group`` (index tensors); ``forward_loss(x,
    y)`` gives a micro-batch's (mean loss, logits). Returns float64 ``[sum of per-sample losses,
    samples, correct predictions]`` on the data's device."""
    optimizer.zero_grad(set_to_none=True)
    n_group = sum(int(mb.numel()) for mb in group)
    stats = torch.zeros(3, dtype=torch.float64, device=x.device)
    stats[1] = n_group
    ddp = hasattr(net, "no_sync")
    for k, mb in enumerate(group):
        xb, yb = x[mb], y[mb]
        # DDP: reduce the gradients once per group, with the last micro-batch's backward.
        sync = net.no_sync() if (ddp and k < len(group) - 1) else contextlib.nullcontext()
        with sync:
            loss, logits = forward_loss(xb, yb)
            # The group's mean loss: each micro-batch weighted by its share of the samples.
            weighted = loss * (mb.numel() / n_group)
            if scaler is not None:
                scaler.scale(weighted).backward()
            else:
                weighted.backward()
        stats[0] += loss.detach().double() * mb.numel()
        stats[2] += accuracy(logits.detach(), yb)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return stats


def _save_checkpoint(path: str, state: dict) -> None:
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def _dist_setup(cfg: TrainConfig, device: torch.device):
    import torch.distributed as dist

    if not dist.is_available():
        raise ConfigError("ddp: this torch was built without torch.distributed")
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ConfigError("ddp: run under torchrun (RANK and WORLD_SIZE are not set)")
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.get_rank())))
        torch.cuda.set_device(device)
    return dist, dist.get_rank(), dist.get_world_size(), device


def _wrap_ddp(model: nn.Module, reference: bool, device: torch.device) -> nn.Module:
    if reference:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    else:
        # Imported here: the module may be missing from an older hpml_ops.
        from ..nn import SyncBatchNorm

        model = SyncBatchNorm.convert_sync_batchnorm(model)
    if device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[device])
    return DistributedDataParallel(model)


def train(
    cfg: TrainConfig,
    model: nn.Module | None = None,
    data: Dataset | None = None,
    *,
    reference: bool = False,
    log: Callable[[str], None] | None = print,
    label: str = "",
) -> TrainResult:
    """Train ``model`` (default: ``MLP`` built from ``cfg`` with ``torch.manual_seed(cfg.seed)``;
    fused modules, or PyTorch's when ``reference``) on ``data`` (default: ``cfg.dataset``).

    The fused model runs under ``hpml_ops.use_backend(cfg.backend)`` with
    ``hpml_ops.nn.BCEWithLogitsLoss``; a reference run uses ``torch.nn.BCEWithLogitsLoss`` and no
    hpml_ops op. ``log`` receives the per-epoch lines (None: silent). Returns a
    :class:`TrainResult` whose ``history`` holds per step ``loss``, ``lr``, ``time_s`` and per
    epoch ``train_loss``, ``train_acc``, ``test_loss``, ``test_acc``, ``lr``.
    """
    cfg.validate()
    device = cfg.resolved_device()
    rank, world, dist = 0, 1, None
    if cfg.ddp:
        dist, rank, world, device = _dist_setup(cfg, device)
    main_proc = rank == 0
    say = log if (log is not None and main_proc) else (lambda s: None)

    if data is None:
        data = load_dataset(cfg.dataset, cfg.seed, cfg.test_fraction, cfg.n_samples, cfg.n_features)
    ckpt = torch.load(cfg.resume, map_location="cpu", weights_only=True) if cfg.resume else None
    if ckpt is not None:
        saved = ckpt["config"]
        diff = [k for k in TrainConfig.TRAJECTORY if _norm(saved.get(k)) != _norm(getattr(cfg, k))]
        if diff:
            raise ConfigError(
                f"resume: the checkpoint was made with different settings ({', '.join(diff)})"
            )
        normalizer = Normalizer.from_state_dict(ckpt["normalizer"])
    else:
        # The lecture's rule: normalisation parameters from the training split only.
        normalizer = Normalizer(cfg.normalize).fit(data.x_train)
    x_train = normalizer.transform(data.x_train).to(device)
    y_train = data.y_train.to(device)
    x_test = normalizer.transform(data.x_test).to(device)
    y_test = data.y_test.to(device)

    if model is None:
        torch.manual_seed(cfg.seed)
        model = MLP(
            data.in_features,
            cfg.hidden,
            data.outputs,
            cfg.activation,
            cfg.batch_norm,
            cfg.init,
            fused=not reference,
        )
    model = model.to(device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    net = _wrap_ddp(model, reference, device) if cfg.ddp else model
    inner = net.module if cfg.ddp else net
    loss_fn = torch.nn.BCEWithLogitsLoss() if reference else hnn.BCEWithLogitsLoss()

    sampler = DistributedSampler(
        range(x_train.shape[0]), num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed
    )
    steps_per_epoch = len(_epoch_groups(sampler, 0, cfg))
    if steps_per_epoch == 0:
        raise ConfigError("the training split is too small for one batch")
    total_steps = cfg.epochs * steps_per_epoch
    effective_batch = cfg.batch_size * cfg.accum_steps * world
    lr = scaled_lr(cfg.lr, effective_batch, cfg.lr_reference_batch)
    sched_cfg = cfg.schedule_config()
    if cfg.lr_reference_batch is not None and sched_cfg.max_lr is not None:
        sched_cfg.max_lr = scaled_lr(sched_cfg.max_lr, effective_batch, cfg.lr_reference_batch)
    sched_cfg = sched_cfg.resolved(total_steps, lr)
    optimizer = _make_optimizer(cfg, net.parameters(), lr)
    try:
        scheduler = build_scheduler(optimizer, sched_cfg, total_steps)
    except ValueError as e:
        raise ConfigError(f"schedule: {e}") from None
    amp_dtype = DTYPES[cfg.dtype]
    scaler = torch.amp.GradScaler(device.type) if cfg.dtype == "fp16" else None

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=amp_dtype)

    forward_loss = loss_of(net, loss_fn, amp_dtype, device.type)
    history = {
        "step": {"loss": [], "lr": [], "time_s": []},
        "epoch": [],
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "effective_batch": effective_batch,
        "lr0": lr,
    }
    epoch, group0, step = 0, 0, 0
    ep_acc = {"loss": 0.0, "n": 0, "correct": 0}
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler") is not None:
            scaler.load_state_dict(ckpt["scaler"])
        history = ckpt["history"]
        epoch, group0, step = ckpt["epoch"], ckpt["group"], ckpt["step"]
        ep_acc = ckpt["epoch_acc"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)

    backend_ctx = contextlib.nullcontext() if reference else _backend.use_backend(cfg.backend)
    if reference:
        resolved_backend = "torch"
    else:
        with _backend.use_backend(cfg.backend):
            resolved_backend = _backend.resolve(device)
    ckpt_path = os.path.join(cfg.out_dir, CHECKPOINT) if cfg.out_dir else None
    if ckpt_path and main_proc:
        os.makedirs(cfg.out_dir, exist_ok=True)

    def checkpoint(next_epoch: int, next_group: int) -> None:
        if not (ckpt_path and main_proc):
            return
        rng = {"torch": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        _save_checkpoint(
            ckpt_path,
            {
                "config": cfg.to_dict(),
                "model": inner.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "normalizer": normalizer.state_dict(),
                "epoch": next_epoch,
                "group": next_group,
                "step": step,
                "epoch_acc": dict(ep_acc),
                "history": history,
                "rng": rng,
            },
        )

    bar = None
    if cfg.progress and main_proc:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=total_steps,
                initial=step,
                desc=label or ("reference" if reference else resolved_backend),
                unit="step",
                leave=False,
                dynamic_ncols=True,
                disable=None,  # only on a terminal: logs and pipes get the epoch lines alone
            )
            say = (lambda s: tqdm.write(s)) if log is not None else say
        except ImportError:
            bar = None

    stopped = False
    net.train()
    with backend_ctx:
        while epoch < cfg.epochs:
            groups = _epoch_groups(sampler, epoch, cfg)
            gi = group0
            while gi < len(groups):
                t0 = time.perf_counter()
                lr_now = current_lr(optimizer)
                s = _step(net, groups[gi], x_train, y_train, forward_loss, optimizer, scaler)
                scheduler.step()
                if dist is not None:
                    dist.all_reduce(s)
                _sync(device)
                dt = time.perf_counter() - t0
                loss_sum, n, correct = s.tolist()
                gi += 1
                step += 1
                history["step"]["loss"].append(loss_sum / n)
                history["step"]["lr"].append(lr_now)
                history["step"]["time_s"].append(dt)
                ep_acc["loss"] += loss_sum
                ep_acc["n"] += int(n)
                ep_acc["correct"] += int(correct)
                if bar is not None:
                    bar.update(1)
                    if step % 10 == 0:
                        bar.set_postfix(loss=f"{loss_sum / n:.4f}", lr=f"{lr_now:.3g}")
                if cfg.stop_at_step is not None and step >= cfg.stop_at_step:
                    stopped = True
                    break
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and gi < len(groups):
                    checkpoint(epoch, gi)
            if gi < len(groups):  # stopped within the epoch
                checkpoint(epoch, gi)
                break
            test_loss, test_acc = evaluate(inner, loss_fn, x_test, y_test, autocast)
            rec = {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": ep_acc["loss"] / max(1, ep_acc["n"]),
                "train_acc": ep_acc["correct"] / max(1, ep_acc["n"]),
                "test_loss": test_loss,
                "test_acc": test_acc,
                "lr": current_lr(optimizer),
            }
            history["epoch"].append(rec)
            ep_acc = {"loss": 0.0, "n": 0, "correct": 0}
            epoch += 1
            group0 = 0
            if cfg.log_every and (epoch % cfg.log_every == 0 or epoch == cfg.epochs):
                say(
                    f"{label + ' ' if label else ''}epoch {epoch:3d}/{cfg.epochs}  "
                    f"train loss {rec['train_loss']:.4f} acc {rec['train_acc']:.3f}  "
                    f"test loss {rec['test_loss']:.4f} acc {rec['test_acc']:.3f}  "
                    f"lr {rec['lr']:.4g}"
                )
            if (
                stopped
                or epoch == cfg.epochs
                or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
            ):
                checkpoint(epoch, 0)
            if stopped:
                break
    if bar is not None:
        bar.close()
    return TrainResult(
        model=inner,
        normalizer=normalizer,
        history=history,
        config=cfg,
        data=data,
        backend=resolved_backend,
        stopped_early=stopped and epoch < cfg.epochs,
    )


def _norm(v):
    # JSON-ish normalisation so tuples and lists compare equal.
    return list(v) if isinstance(v, tuple | list) else v
