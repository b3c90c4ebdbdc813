"""One process of the 2-process SyncBatchNorm test (tests/test_sync_batch_norm.py): joins a gloo
group, runs every case on its (unequal) share of a global batch for two training steps, and saves
what it computed for the parent to compare with one BatchNorm over the whole batch.

    python -m tests._sync_bn_worker RANK WORLD PORT BACKEND OUTDIR
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import hpml_ops

# (name, global shape per step, per-rank batch sizes, activation, channels_last, momentum)
CASES = [
    # rank 0 holds a single row: one value per channel there, 7 in the group (allowed).
    ("2d_relu_1_6", (7, 5), (1, 6), "relu", False, 0.1),
    ("3d_3_10", (13, 3, 7), (3, 10), None, False, None),
    ("4d_cl_relu_2_5", (7, 4, 3, 5), (2, 5), "relu", True, 0.3),
]


def case_data(shape, seed):
    """The global batch and output gradient of each step, and the initial affine parameters:
    the same on every process and in the parent."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    steps = [
        (torch.randn(shape, generator=g) * 2 + 3, torch.randn(shape, generator=g)) for _ in "ab"
    ]
    weight = torch.rand(c, generator=g) + 0.5
    bias = torch.randn(c, generator=g)
    return steps, weight, bias


def main(rank: int, world: int, port: int, backend: str, outdir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    try:
        with hpml_ops.use_backend(backend):
            for i, (name, shape, sizes, act, cl, momentum) in enumerate(CASES):
                steps, weight, bias = case_data(shape, seed=100 + i)
                m = hpml_ops.nn.SyncBatchNorm(shape[1], momentum=momentum, activation=act)
                with torch.no_grad():
                    m.weight.copy_(weight)
                    m.bias.copy_(bias)
                lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
                per_step = []
                for x_all, g_all in steps:
                    x = x_all[lo:hi].clone()
                    if cl:
                        x = x.contiguous(memory_format=torch.channels_last)
                    x.requires_grad_(True)
                    m.zero_grad()
                    out = m(x)
                    out.backward(g_all[lo:hi])
                    per_step.append(
                        {
                            "out": out.detach().clone(),
                            "grad_input": x.grad.clone(),
                            "grad_weight": m.weight.grad.clone(),
                            "grad_bias": m.bias.grad.clone(),
                            "running_mean": m.running_mean.clone(),
                            "running_var": m.running_var.clone(),
                            "num_batches_tracked": int(m.num_batches_tracked),
                            "channels_last": out.is_contiguous(memory_format=torch.channels_last)
                            and out.dim() == 4,
                        }
                    )
                results[name] = per_step
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))


if __name__ == "__main__":
    r, w, p, b, d = sys.argv[1:6]
    main(int(r), int(w), int(p), b, d)
