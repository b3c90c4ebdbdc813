"""After a run: the fused-vs-PyTorch comparison, the metrics JSON and the PNG plot."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics

import torch

from .loop import TrainConfig, TrainResult, train

__all__ = ["compare_reference", "comparison_table", "plot_runs", "summarize", "write_metrics"]

PLOT = "train.png"
METRICS = "metrics.json"


def summarize(result: TrainResult) -> dict:
    """Final metrics and timing of one run."""
    h = result.history
    last = h["epoch"][-1] if h["epoch"] else {}
    times = h["step"]["time_s"]
    return {
        "backend": result.backend,
        "steps": len(h["step"]["loss"]),
        "final_train_loss": last.get("train_loss"),
        "final_test_loss": last.get("test_loss"),
        "test_accuracy": last.get("test_acc"),
        "train_accuracy": last.get("train_acc"),
        "ms_per_step_median": 1e3 * statistics.median(times) if times else None,
        "ms_per_step_mean": 1e3 * statistics.fmean(times) if times else None,
    }


def compare_reference(
    cfg: TrainConfig, log=print, data=None, timing_rounds: int = 300
) -> tuple[TrainResult, TrainResult, dict]:
    """Train the fused MLP of ``cfg`` and the same model in plain PyTorch (``MLP(fused=False)``,
    ``torch.nn.BCEWithLogitsLoss``) from identical initial weights, on the same data in the same
    order with the same optimizer and schedule. Returns both results and a summary: each run's
    :func:`summarize` plus the largest per-step loss difference and the speedup, PyTorch's step
    time over the fused one's, from ``timing_rounds`` steps of the two trained models timed
    alternately (:func:`interleaved_step_times`; with 0 rounds, or for Triton in its CPU
    interpreter, the ratio of the two runs' median step times)."""
    if cfg.ddp:
        raise ValueError("--compare-reference runs in one process; drop --ddp")
    if cfg.resume or cfg.stop_at_step:
        raise ValueError(
            "--compare-reference runs to the end from scratch; drop --resume/--stop-at-step"
        )
    cfg.validate()
    from ..models import MLP
    from .data import load_dataset

    if data is None:
        data = load_dataset(cfg.dataset, cfg.seed, cfg.test_fraction, cfg.n_samples, cfg.n_features)
    torch.manual_seed(cfg.seed)
    fused0 = MLP(
        data.in_features, cfg.hidden, data.outputs, cfg.activation, cfg.batch_norm, cfg.init
    )
    plain0 = fused0.twin(fused=False)  # identical parameters and buffers, PyTorch's modules
    fused = train(cfg, fused0, data, log=log, label="fused")
    ref_cfg = dataclasses.replace(cfg, out_dir=None, checkpoint_every=0)
    ref = train(ref_cfg, plain0, data, reference=True, log=log, label="pytorch")
    lf, lr_ = fused.history["step"]["loss"], ref.history["step"]["loss"]
    diff = max((abs(a - b) for a, b in zip(lf, lr_, strict=True)), default=0.0)
    sf, sr = summarize(fused), summarize(ref)
    # Triton on CPU tensors runs in its interpreter: timing it measures the interpreter.
    interpreted = fused.backend == "triton" and cfg.resolved_device().type == "cpu"
    timing = None
    if timing_rounds > 0 and not interpreted:
        timing = interleaved_step_times(fused, ref, data, cfg, timing_rounds)
    speedup = timing["speedup"] if timing else sr["ms_per_step_median"] / sf["ms_per_step_median"]
    summary = {
        "fused": sf,
        "pytorch": sr,
        "max_step_loss_diff": diff,
        "interleaved": timing,
        "speedup": speedup,
        "dataset": data.describe(),
    }
    return fused, ref, summary


def interleaved_step_times(
    fused: TrainResult, ref: TrainResult, data, cfg: TrainConfig, rounds: int = 300
) -> dict:
    """Time one training step of each trained model side by side: copies of both models with
    the run's optimizer, one batch of ``cfg.batch_size`` training samples, steps alternating
    (fused, PyTorch, fused, ...) so that both see the same machine (two runs one after the other
    on a shared machine can differ by 20% for no reason of their own). Returns the medians (ms)
    and ``speedup``: the median over rounds of PyTorch's step time over the fused one's."""
    import copy
    import time

    from .. import nn as hnn
    from .._backend import use_backend
    from .loop import DTYPES, _make_optimizer, loss_of

    device = cfg.resolved_device()
    amp_dtype = DTYPES[cfg.dtype]  # the run's precision (fp16's loss scaling left out)
    x = fused.normalizer.transform(data.x_train[: cfg.batch_size]).to(device)
    y = data.y_train[: cfg.batch_size].to(device)

    def stepper(result: TrainResult, loss_fn):
        model = copy.deepcopy(result.model).train()
        opt = _make_optimizer(cfg, model.parameters(), cfg.lr)
        forward_loss = loss_of(model, loss_fn, amp_dtype, device.type)  # as the training loop

        def step():
            opt.zero_grad(set_to_none=True)
            forward_loss(x, y)[0].backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        return step

    steps = {
        "fused": stepper(fused, hnn.BCEWithLogitsLoss()),
        "pytorch": stepper(ref, torch.nn.BCEWithLogitsLoss()),
    }
    times: dict[str, list[float]] = {k: [] for k in steps}
    with use_backend(cfg.backend):
        for _ in range(10):  # warm-up
            for step in steps.values():
                step()
        for _ in range(rounds):
            for name, step in steps.items():
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
    ratios = [p / f for f, p in zip(times["fused"], times["pytorch"], strict=True)]
    return {
        "fused_ms": 1e3 * statistics.median(times["fused"]),
        "pytorch_ms": 1e3 * statistics.median(times["pytorch"]),
        "rounds": rounds,
        "speedup": statistics.median(ratios),
    }


def comparison_table(summary: dict) -> str:
    """The table ``make train`` prints."""
    f, r = summary["fused"], summary["pytorch"]
    col = f"fused ({f['backend']})"
    w = max(len(col), 10)
    rows = [
        ("", col, "PyTorch"),
        ("test accuracy", f"{100 * f['test_accuracy']:.2f}%", f"{100 * r['test_accuracy']:.2f}%"),
        ("final test loss", f"{f['final_test_loss']:.5f}", f"{r['final_test_loss']:.5f}"),
        (
            "ms / step in training (median)",
            f"{f['ms_per_step_median']:.3f}",
            f"{r['ms_per_step_median']:.3f}",
        ),
    ]
    timing = summary.get("interleaved")
    if timing is not None:
        rows.append(
            (
                "ms / step side by side (median)",
                f"{timing['fused_ms']:.3f}",
                f"{timing['pytorch_ms']:.3f}",
            )
        )
    lines = [f"{a:<34}{b:>{w}}  {c:>10}" for a, b, c in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"{'speedup (PyTorch ms / fused ms)':<34}{summary['speedup']:>{w}.2f}x")
    lines.append(
        f"{'largest per-step loss difference':<34}{summary['max_step_loss_diff']:>{w}.2e}"
        f"  over {f['steps']} steps"
    )
    return "\n".join(lines)


def write_metrics(path: str, runs: dict[str, TrainResult], summary: dict | None = None) -> None:
    """Write the config, each run's per-step and per-epoch history and the summary as JSON."""
    first = next(iter(runs.values()))
    out = {
        "config": first.config.to_dict(),
        "dataset": first.data.describe() if first.data is not None else first.config.dataset,
        "runs": {name: {**summarize(r), "history": r.history} for name, r in runs.items()},
    }
    if summary is not None:
        out["summary"] = summary
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)


def plot_runs(path: str, runs: dict[str, TrainResult], title: str = "") -> None:
    """PNG (matplotlib, Agg): per-step and per-epoch train loss with the per-epoch test loss,
    test accuracy, and the learning rate per step, for each run; for two runs also the absolute
    difference of their per-step losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pair = len(runs) == 2
    if pair:
        fig, grid = plt.subplots(2, 2, figsize=(12, 8))
        axes = list(grid.flat)
    else:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax_loss, ax_acc, ax_lr = axes[:3]
    styles = [("tab:blue", "-"), ("tab:orange", "--"), ("tab:green", ":")]
    for (name, r), (color, ls) in zip(runs.items(), styles, strict=False):
        h = r.history
        steps = range(1, len(h["step"]["loss"]) + 1)
        ep_steps = [e["step"] for e in h["epoch"]]
        ax_loss.plot(steps, h["step"]["loss"], color=color, alpha=0.25, lw=0.8)
        ax_loss.plot(
            ep_steps, [e["train_loss"] for e in h["epoch"]], color=color, ls=ls,
            label=f"{name} train",
        )  # fmt: skip
        ax_loss.plot(
            ep_steps, [e["test_loss"] for e in h["epoch"]], color=color, ls=ls, marker="o",
            ms=3, label=f"{name} test",
        )  # fmt: skip
        ax_acc.plot(
            ep_steps, [100 * e["test_acc"] for e in h["epoch"]], color=color, ls=ls, marker="o",
            ms=3, label=f"{name} test",
        )  # fmt: skip
        ax_lr.plot(steps, h["step"]["lr"], color=color, ls=ls, label=name)
    ax_loss.set(xlabel="optimizer step", ylabel="BCE loss", title="loss", yscale="log")
    ax_acc.set(xlabel="optimizer step", ylabel="accuracy (%)", title="test accuracy")
    ax_lr.set(xlabel="optimizer step", ylabel="learning rate", title="learning-rate schedule")
    if pair:
        (na, a), (nb, b) = runs.items()
        la, lb = a.history["step"]["loss"], b.history["step"]["loss"]
        diff = [abs(x - y) for x, y in zip(la, lb, strict=True)]
        nonzero = [(i + 1, d) for i, d in enumerate(diff) if d > 0]
        axes[3].plot(
            [i for i, _ in nonzero],
            [d for _, d in nonzero],
            ".",
            color="tab:red",
            ms=3,
            label=f"|{na} - {nb}| (steps with equal losses not shown)",
        )
        axes[3].set(
            xlabel="optimizer step",
            ylabel="absolute difference",
            title=f"per-step loss difference: {len(diff) - len(nonzero)} of {len(diff)} equal",
            yscale="log",
        )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
