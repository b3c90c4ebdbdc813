"""Benchmark: the fixed cost of one call of each public function and module, on inputs of one
row (two for batch norm in training), where the arithmetic is a few nanoseconds and everything
measured is the path from Python to the kernel and back. Side by side with torch's own op on the
same inputs.

Cases, each as a forward alone (inputs not requiring grad) and as forward + backward (parameters
requiring grad, ``torch.autograd.grad`` of the output's sum):

- ``linear_act``: ``hpml_ops.linear_act(x, w, b, "relu")`` vs ``F.relu(F.linear(x, w, b))``,
  x (1, 8), w (8, 8);
- ``bce``: ``hpml_ops.binary_cross_entropy_with_logits(x, y)`` vs torch's, (1, 8), mean;
- ``batch_norm_eval``: ``hpml_ops.batch_norm`` vs ``F.batch_norm``, (1, 8), running statistics;
- ``batch_norm_train``: the same in training (running statistics updated), (2, 8);
- ``FusedLinear`` / ``BatchNorm1d`` / ``BCEWithLogitsLoss``: the modules (ours after
  ``hpml_ops.convert``-style construction with ``backend="cpp"``) vs torch's.

One thread; each sample times ``--calls`` calls in a loop; providers interleaved (torch, ours,
torch, ...), the ratio is the median of the per-round ratios. Reported: microseconds per call.

    python benchmarks/bench_call_overhead.py [--backend cpp] [--calls 200] [--min-time 0.5]
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from common import base_parser, bench_side_by_side, finish, machine

import hpml_ops


def _cases(backend: str) -> dict:
    torch.manual_seed(0)
    x = torch.randn(1, 8)
    x2 = torch.randn(2, 8)
    w = torch.randn(8, 8)
    b = torch.randn(8)
    y = torch.rand(1, 8)
    rm, rv = torch.zeros(8), torch.ones(8)
    gamma, beta = torch.ones(8), torch.zeros(8)
    wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
    xg = x.clone().requires_grad_()
    x2g = x2.clone().requires_grad_()
    gg, btg = gamma.clone().requires_grad_(), beta.clone().requires_grad_()

    lin_t, lin_o = torch.nn.Linear(8, 8), hpml_ops.nn.FusedLinear(8, 8, activation="relu")
    lin_o.backend = backend
    bn_t, bn_o = torch.nn.BatchNorm1d(8), hpml_ops.nn.BatchNorm1d(8)
    bn_o.backend = backend
    loss_t, loss_o = torch.nn.BCEWithLogitsLoss(), hpml_ops.nn.BCEWithLogitsLoss()
    loss_o.backend = backend

    def fb(out, *leaves):
        torch.autograd.grad(out.sum(), leaves)

    return {
        "linear_act fwd": (
            lambda: F.relu(F.linear(x, w, b)),
            lambda: hpml_ops.linear_act(x, w, b, "relu"),
        ),
        "linear_act fwd+bwd": (
            lambda: fb(F.relu(F.linear(x, wg, bg)), wg, bg),
            lambda: fb(hpml_ops.linear_act(x, wg, bg, "relu"), wg, bg),
        ),
        "bce fwd": (
            lambda: F.binary_cross_entropy_with_logits(x, y),
            lambda: hpml_ops.binary_cross_entropy_with_logits(x, y),
        ),
        "bce fwd+bwd": (
            lambda: fb(F.binary_cross_entropy_with_logits(xg, y), xg),
            lambda: fb(hpml_ops.binary_cross_entropy_with_logits(xg, y), xg),
        ),
        "batch_norm_eval fwd": (
            lambda: F.batch_norm(x, rm, rv, gamma, beta, False),
            lambda: hpml_ops.batch_norm(x, rm, rv, gamma, beta, False),
        ),
        "batch_norm_train fwd+bwd": (
            lambda: fb(F.batch_norm(x2g, rm, rv, gg, btg, True), x2g, gg, btg),
            lambda: fb(hpml_ops.batch_norm(x2g, rm, rv, gg, btg, True), x2g, gg, btg),
        ),
        "FusedLinear fwd+bwd": (
            lambda: fb(torch.relu(lin_t(xg)), xg),
            lambda: fb(lin_o(xg), xg),
        ),
        "BatchNorm1d fwd+bwd": (
            lambda: fb(bn_t(x2g), x2g),
            lambda: fb(bn_o(x2g), x2g),
        ),
        "BCEWithLogitsLoss fwd+bwd": (
            lambda: fb(loss_t(xg, y), xg),
            lambda: fb(loss_o(xg, y), xg),
        ),
    }


def main(argv=None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--backend", default="cpp")
    p.add_argument("--calls", type=int, default=200, help="calls per timed sample")
    p.add_argument("--cases", default=None, help="comma-separated subset")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    meta = machine("cpu")
    meta["backend"] = args.backend
    meta["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    print(meta, flush=True)
    cases = _cases(args.backend)
    if args.cases:
        cases = {k: v for k, v in cases.items() if k in args.cases.split(",")}
    rows = []
    n = args.calls

    def loop(fn):
        def run():
            for _ in range(n):
                fn()

        return run

    with hpml_ops.use_backend(args.backend):
        for name, (torch_fn, ours_fn) in cases.items():
            res = bench_side_by_side(
                {"torch": (loop(torch_fn), None), "ours": (loop(ours_fn), None)},
                "cpu",
                min_time=args.min_time,
            )
            t_us = res["torch"]["ms"] * 1e3 / n
            o_us = res["ours"]["ms"] * 1e3 / n
            ratio = res["ours"]["vs_first"]
            rows.append(
                {
                    "case": name,
                    "torch_us": round(t_us, 2),
                    "ours_us": round(o_us, 2),
                    "ours_p20_us": round(res["ours"]["p20"] * 1e3 / n, 2),
                    "ours_p80_us": round(res["ours"]["p80"] * 1e3 / n, 2),
                    "speed_vs_torch": round(ratio, 3),
                }
            )
            print(
                f"{name:>26}: torch {t_us:7.2f} us  ours {o_us:7.2f} us  ({ratio:5.2f}x torch)",
                flush=True,
            )
    return finish("call_overhead", meta, rows, args)


if __name__ == "__main__":
    sys.exit(main())
