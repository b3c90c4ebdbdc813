"""``python -m hpml_ops.train`` / ``hpml-train``: train an MLP on the fused ops.

Examples::

    python -m hpml_ops.train --dataset breast_cancer --compare-reference --out runs/breast_cancer
    python -m hpml_ops.train --dataset digits --hidden 128,64 --schedule triangular2 --epochs 40
    python -m hpml_ops.train --dataset synthetic --n-samples 200000 --batch-size 512 --accum-steps 4
    torchrun --standalone --nproc_per_node 2 -m hpml_ops.train --ddp --dataset synthetic

A bad flag exits with status 2 and one line on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .. import _backend
from ..models import ACTIVATIONS, INITS
from .data import DATASETS
from .loop import DTYPES, OPTIMIZERS, ConfigError, TrainConfig
from .normalize import NORMALIZATIONS
from .schedules import SCHEDULES

PROG = "hpml-train"

__all__ = ["build_parser", "config_from_args", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): ``hpml-train: error: <message>``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message.splitlines()[0]} (see --help)\n")


def _number(cast, ok, what: str):
    """An argparse type: ``cast(s)``, rejected with "expected <what>, got ..." unless ``ok``."""

    def parse(s: str):
        try:
            v = cast(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v

    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _number(float, lambda v: v > 0, "a positive number")  # NaN fails too


def _int_list(s: str) -> tuple[int, ...]:
    parts = [p for p in s.replace(" ", ",").split(",") if p]
    try:
        vals = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = _Parser(
        prog=PROG,
        description="Train an MLP built from hpml_ops' fused kernels (see hpml_ops.train).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default=d.dataset)
    g.add_argument("--n-samples", type=_positive_int, default=d.n_samples, help="synthetic only")
    g.add_argument("--n-features", type=_positive_int, default=d.n_features, help="synthetic only")
    g.add_argument("--test-fraction", type=float, default=d.test_fraction)
    g.add_argument(
        "--normalize",
        choices=NORMALIZATIONS,
        default=d.normalize,
        help="input normalisation, fitted on the training split only",
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--hidden",
        type=lambda s: () if s.strip() in ("", "none") else _int_list(s),
        default=d.hidden,
        help="hidden layer widths, comma-separated ('none': logistic regression)",
    )
    g.add_argument("--activation", choices=ACTIVATIONS, default=d.activation)
    g.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=d.batch_norm)
    g.add_argument("--init", choices=INITS, default=d.init)
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    g.add_argument("--lr", type=_positive_float, default=d.lr, help="base learning rate α0")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument(
        "--batch-size", type=_positive_int, default=d.batch_size, help="per process (micro-batch)"
    )
    g.add_argument(
        "--accum-steps",
        type=_positive_int,
        default=d.accum_steps,
        help="micro-batches per optimizer step (gradient accumulation)",
    )
    g.add_argument("--epochs", type=_positive_int, default=d.epochs)
    g.add_argument(
        "--lr-reference-batch",
        type=_positive_int,
        default=None,
        help="linear scaling rule: lr *= (batch x accum x processes) / this",
    )
    g = p.add_argument_group("learning-rate schedule (t counts optimizer steps)")
    g.add_argument("--schedule", choices=SCHEDULES, default=d.schedule)
    g.add_argument(
        "--lr-gamma",
        type=float,
        default=None,
        help="γ: inverse α0/(1+γt), exponential α0·exp(-γt), multistep divisor, exp_range base "
        "(default: from the run length)",
    )
    g.add_argument("--power", type=float, default=d.power, help="polynomial exponent n")
    g.add_argument(
        "--milestones",
        type=_int_list,
        default=None,
        help="multistep: steps after warm-up (default: 50%%, 75%%)",
    )
    g.add_argument("--min-lr", type=float, default=d.min_lr, help="cosine floor η")
    g.add_argument("--max-lr", type=_positive_float, default=None, help="cyclical peak (10 α0)")
    g.add_argument(
        "--cycle-steps", type=_positive_int, default=None, help="cyclical half-cycle (T / 8)"
    )
    g.add_argument(
        "--cycle-momentum",
        action="store_true",
        help="cyclical: cycle the momentum 0.9 -> 0.8 inversely to the lr",
    )
    g.add_argument("--warmup-steps", type=_nonneg_int, default=d.warmup_steps)
    g.add_argument("--warmup-start-factor", type=float, default=d.warmup_start_factor)
    g = p.add_argument_group("execution")
    g.add_argument(
        "--backend",
        choices=_backend.CHOICES,
        default=d.backend,
        help="hpml_ops backend for the fused model",
    )
    g.add_argument("--device", default=d.device, help="cpu, cuda, cuda:N or auto")
    g.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default=d.dtype,
        help="fp32, or autocast to bf16 (CPU, GPU) / fp16 (GPU, with a grad scaler)",
    )
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument(
        "--threads",
        type=_nonneg_int,
        default=0,
        help="CPU threads for torch's intra-op parallelism (0: torch's default)",
    )
    g.add_argument(
        "--ddp",
        action="store_true",
        help="DistributedDataParallel + SyncBatchNorm + DistributedSampler (run under torchrun)",
    )
    g.add_argument(
        "--compare-reference",
        action="store_true",
        help="also train the same model in plain PyTorch from the same weights and print a table",
    )
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="output directory (default: runs/<dataset>)")
    g.add_argument(
        "--checkpoint-every",
        type=_nonneg_int,
        default=d.checkpoint_every,
        help="optimizer steps between checkpoints (0: at the end only)",
    )
    g.add_argument("--resume", default=None, help="checkpoint to resume from")
    g.add_argument(
        "--stop-at-step",
        type=_positive_int,
        default=None,
        help="stop (and checkpoint) after this optimizer step",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument(
        "--log-every", type=_nonneg_int, default=d.log_every, help="epochs between lines"
    )
    g.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    out = args.out if args.out is not None else os.path.join("runs", args.dataset)
    return TrainConfig(
        dataset=args.dataset,
        n_samples=args.n_samples,
        n_features=args.n_features,
        test_fraction=args.test_fraction,
        normalize=args.normalize,
        hidden=tuple(args.hidden),
        activation=args.activation,
        batch_norm=args.batch_norm,
        init=args.init,
        optimizer=args.optimizer,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        accum_steps=args.accum_steps,
        epochs=args.epochs,
        lr_reference_batch=args.lr_reference_batch,
        schedule=args.schedule,
        lr_gamma=args.lr_gamma,
        power=args.power,
        milestones=args.milestones,
        min_lr=args.min_lr,
        max_lr=args.max_lr,
        cycle_steps=args.cycle_steps,
        cycle_momentum=args.cycle_momentum,
        warmup_steps=args.warmup_steps,
        warmup_start_factor=args.warmup_start_factor,
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        ddp=args.ddp,
        out_dir=out,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        stop_at_step=args.stop_at_step,
        progress=not args.no_progress,
        log_every=args.log_every,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (bad settings: 2, with one line on stderr)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    try:
        cfg.validate()
        if args.compare_reference and args.ddp:
            raise ConfigError("--compare-reference runs in one process; drop --ddp")
        if args.compare_reference and (args.resume or args.stop_at_step):
            raise ConfigError(
                "--compare-reference runs to the end from scratch; drop --resume/--stop-at-step"
            )
    except ConfigError as e:
        parser.error(str(e))
    from . import report
    from .loop import train

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        if args.compare_reference:
            fused, ref, summary = report.compare_reference(cfg)
            runs = {f"fused ({fused.backend})": fused, "PyTorch": ref}
        else:
            result = train(cfg, label="")
            runs, summary = {f"fused ({result.backend})": result}, None
    except ConfigError as e:
        parser.error(str(e))
    except ImportError as e:  # a missing optional dependency (scikit-learn for a dataset)
        parser.error(str(e))
    first = next(iter(runs.values()))
    main_proc = not cfg.ddp or _rank() == 0
    if main_proc:
        if first.stopped_early:
            print(f"stopped after step {args.stop_at_step}; resume with --resume "
                  f"{os.path.join(cfg.out_dir, 'checkpoint.pt')}")  # fmt: skip
        metrics = os.path.join(cfg.out_dir, report.METRICS)
        report.write_metrics(metrics, runs, summary)
        written = [metrics]
        if not args.no_plot:
            plot = os.path.join(cfg.out_dir, report.PLOT)
            title = first.data.describe() if first.data is not None else cfg.dataset
            try:
                report.plot_runs(plot, runs, title=title)
                written.append(plot)
            except ImportError as e:
                print(f"no plot: {e} (pip install 'hpml_ops[train]')", file=sys.stderr)
        print(first.data.describe() if first.data is not None else cfg.dataset)
        if summary is not None:
            print(report.comparison_table(summary))
        elif first.history["epoch"]:
            s = report.summarize(first)
            print(
                f"backend {s['backend']}: test accuracy {100 * s['test_accuracy']:.2f}%, "
                f"test loss {s['final_test_loss']:.5f}, {s['ms_per_step_median']:.3f} ms/step "
                f"(median of {s['steps']})"
            )
        print(f"wrote {', '.join(written)} ({time.perf_counter() - t0:.1f} s)")
    if cfg.ddp:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
