"""Benchmark: one MLP training step (zero_grad, forward, loss, backward, optimizer step), plain
PyTorch vs the same model after ``hpml_ops.convert`` vs ``torch.compile``, side by side in one run.

Models (each provider starts from the same weights, trains on the same fixed batch):

- ``net``: the lecture's ``Net``, 256-120-84-10 with ReLU, batch 256 (a common mini-batch size;
  at it the model is small enough that per-op overheads, not FLOPs, decide the step; ``--batch``
  changes it), 10 logits trained as 10 sigmoid outputs with ``BCEWithLogitsLoss``;
- ``wide``: 1024-1024-1024-1, each hidden Linear followed by BatchNorm1d and ReLU, batch 4096,
  one logit with ``BCEWithLogitsLoss``;
- ``small``: ``make train``'s model, 30-64-32-1 with BatchNorm1d + ReLU, batch 32: nothing but
  per-call costs.

Optimizer: ``torch.optim.SGD(lr=0.01, momentum=0.9)`` with torch's default implementation (the
per-tensor loop on CPU, foreach on CUDA), the same for every provider. Providers:

- ``eager``: the plain ``nn.Sequential`` and ``nn.BCEWithLogitsLoss``;
- ``fused``: the same modules after ``hpml_ops.convert(model, backend="cpp", fuse_mlp=False)``
  (the per-layer ops: C++ kernels on the CPU, CUDA kernels on a GPU; skipped, saying why, where
  the cpp backend lacks one of the ops): FusedLinear (+ activation), BatchNorm1d with fused ReLU,
  our loss (the whole network as one op: ``bench_mlp.py``'s ``fused-mlp``);
- ``fused-triton``: the same with ``backend="triton"`` (GPU only: on the CPU Triton runs
  interpreted, which measures the interpreter);
- ``compile``: ``torch.compile`` of the eager model's forward + loss (Inductor; the backward is
  compiled with it); the optimizer step stays eager. Compilation happens in the warm-up steps and
  is not timed.

Steps are timed interleaved on the CPU (eager, fused, compile, eager, ...): "vs_eager" is the
median of the per-round ratios of eager's step time to the provider's (on a GPU each provider is
timed by do_bench in turn). ``--threads 1`` gives numbers that a busy shared machine disturbs
less (two OpenMP threads on two shared cores stall whenever one of them is descheduled).
FLOPs per step: 6 x batch x (sum of in x out over the Linears) (forward 2, backward 4). fp32 on
every device unless ``--dtype`` says otherwise.

    python benchmarks/bench_train_step.py [--device cpu|cuda] [--models net,wide,small] [--batch N]
        [--threads N] [--profile]
"""

from __future__ import annotations

import copy
import sys
import time

import torch
from common import (
    base_parser,
    bench_side_by_side,
    check_names,
    env_note,
    finish,
    machine,
    record_flops,
    sync,
)
from torch import nn

import hpml_ops

PROVIDERS = ("eager", "fused", "fused-triton", "compile")


def net() -> nn.Sequential:
    """The lecture's Net: 256-120-84-10, ReLU."""
    return nn.Sequential(
        nn.Linear(256, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10)
    )


def wide() -> nn.Sequential:
    """1024-1024-1024-1, Linear -> BatchNorm1d -> ReLU for each hidden layer."""
    layers: list[nn.Module] = []
    for _ in range(2):
        layers += [nn.Linear(1024, 1024), nn.BatchNorm1d(1024), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(1024, 1))


def small() -> nn.Sequential:
    """``make train``'s model: 30-64-32-1, Linear -> BatchNorm1d -> ReLU for each hidden layer."""
    layers: list[nn.Module] = []
    for fan_in, fan_out in ((30, 64), (64, 32)):
        layers += [nn.Linear(fan_in, fan_out), nn.BatchNorm1d(fan_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(32, 1))


MODELS = {
    # name: (builder, in_features, out_features, batch)
    "net": (net, 256, 10, 256),
    "wide": (wide, 1024, 1, 4096),
    "small": (small, 30, 1, 32),
}


def backend_of(provider: str) -> str | None:
    return {"fused": "cpp", "fused-triton": "triton"}.get(provider)


def ops_of(model: nn.Module) -> list[str]:
    """The hpml ops the converted ``model`` and its loss call."""
    has_bn = any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    return ["linear_act", "bce_with_logits"] + (["batch_norm"] if has_bn else [])


def unavailable(provider: str, device: str, ops: list[str]) -> str | None:
    """Why ``provider`` cannot be measured on ``device`` for a model calling ``ops`` (None if it
    can)."""
    dt = torch.device(device).type
    backend = backend_of(provider)
    if backend is None:
        return None
    if backend == "triton" and dt == "cpu":
        return "Triton runs interpreted on CPU: not a speed measurement"
    for op in ops:
        why = hpml_ops._backend.unavailable_reason(backend, dt, op)
        if why:
            return f"{backend} backend, {op}: {why}"
    return None


class Trainer:
    """One provider's model, loss, optimizer and fixed batch; ``step()`` is the timed work."""

    def __init__(self, provider: str, model: nn.Module, x, y) -> None:
        model = copy.deepcopy(model)
        loss_fn: nn.Module = nn.BCEWithLogitsLoss()
        backend = backend_of(provider)
        if backend is not None:
            model = hpml_ops.convert(model, backend=backend, fuse_mlp=False)
            loss_fn = hpml_ops.convert(loss_fn, backend=backend)
        self.model, self.loss_fn = model, loss_fn
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def fwd_loss(inp, tgt):
            return loss_fn(model(inp), tgt)

        if provider == "compile":
            fwd_loss = torch.compile(fwd_loss, dynamic=False)
        self.fwd_loss = fwd_loss
        self.x, self.y = x, y

    def step(self) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss = self.fwd_loss(self.x, self.y)
        loss.backward()
        self.opt.step()
        return loss


def linear_flops(model: nn.Module, batch: int) -> int:
    macs = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    return 6 * batch * macs


def profile(trainers: dict[str, Trainer], steps: int, rows: int = 30) -> str:
    """torch.profiler over ``steps`` steps of each provider, in turn: per op, its self CPU time in
    ms per step, providers side by side (largest first); the last rows are the profiled step's
    wall time and what no op accounts for (Python, autograd engine, the profiler itself)."""
    per: dict[str, dict[str, float]] = {}
    wall: dict[str, float] = {}
    for name, t in trainers.items():
        t.step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                t.step()
            wall[name] = (time.perf_counter() - t0) * 1e3 / steps
        per[name] = {
            e.key: e.self_cpu_time_total / 1e3 / steps
            for e in prof.key_averages()
            if not e.key.startswith("ProfilerStep")
        }
    names = list(trainers)
    keys = sorted(
        {k for d in per.values() for k in d}, key=lambda k: -max(d.get(k, 0) for d in per.values())
    )
    head = "| op (self CPU ms / step) | " + " | ".join(names) + " |"
    lines = [head, "|---|" + "---|" * len(names)]
    for k in keys[:rows]:
        lines.append(f"| {k} | " + " | ".join(f"{per[n].get(k, 0):.3f}" for n in names) + " |")
    lines.append("| (all ops) | " + " | ".join(f"{sum(per[n].values()):.3f}" for n in names) + " |")
    lines.append(
        "| (outside ops) | "
        + " | ".join(f"{wall[n] - sum(per[n].values()):.3f}" for n in names)
        + " |"
    )
    lines.append("| step wall, profiled | " + " | ".join(f"{wall[n]:.3f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.set_defaults(min_time=2.0)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: net, wide, small")
    p.add_argument("--batch", type=int, default=None, help="override every model's batch size")
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)"
    )
    p.add_argument("--profile", action="store_true", help="also print a per-op profile table")
    p.add_argument("--profile-steps", type=int, default=10, help="steps profiled per provider")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    dtype = getattr(torch, args.dtype or "float32")
    providers = args.providers.split(",") if args.providers else list(PROVIDERS)
    models = args.models.split(",")
    check_names(p, "provider", providers, PROVIDERS)
    check_names(p, "model", models, MODELS)

    meta = machine(device)
    meta["dtype"] = str(dtype).replace("torch.", "")
    if env_note():
        meta["env"] = env_note()
    print(f"# MLP training step on {device} ({meta.get('gpu', meta['cpu'])}), {meta['dtype']}")

    rows = []
    for name in models:
        build, n_in, n_out, batch = MODELS[name]
        batch = args.batch or batch
        torch.manual_seed(0)
        model = build().to(device, dtype)
        live = []
        for prov in providers:
            why = unavailable(prov, device, ops_of(model))
            if why:
                print(f"# {name}: {prov}: skipped: {why}")
            else:
                live.append(prov)
        if not live:
            continue
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, n_in, generator=g).to(device, dtype)
        y = torch.randint(0, 2, (batch, n_out), generator=g).to(device, dtype)
        torch._dynamo.reset()
        trainers = {prov: Trainer(prov, model, x, y) for prov in live}
        # Warm-up (compilation included) and a check that every provider computes the same
        # thing: the first steps' losses from the same weights and data.
        losses = {prov: [t.step().item() for _ in range(3)] for prov, t in trainers.items()}
        sync(device)
        ref = losses[live[0]]
        for prov in live:
            diff = max(abs(a - b) for a, b in zip(losses[prov], ref, strict=True))
            print(f"{name}: {prov:>12} first 3 losses {losses[prov]} (max diff {diff:.2e})")
        res = bench_side_by_side(
            {prov: (t.step, None) for prov, t in trainers.items()}, device, min_time=args.min_time
        )
        key = {"model": name, "batch": batch}
        record_flops(
            rows, key, f"{name:>5} batch {batch:>5}", res, linear_flops(model, batch), "ms/step"
        )
        if args.profile:
            table = profile(trainers, steps=args.profile_steps)
            print(f"\n## {name}: profile over {args.profile_steps} steps\n\n{table}")
    return finish("train_step", meta, rows, args)


if __name__ == "__main__":
    sys.exit(main())
