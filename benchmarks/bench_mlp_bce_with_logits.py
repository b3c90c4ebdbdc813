"""Benchmark: the net and its BCE-with-logits loss as one op each way
(``FusedMLP.bce_with_logits``, ``hpml_ops.mlp_bce_with_logits``) against the net's op and the loss's
op apart (``FusedMLP`` then the library's loss), plain PyTorch and ``torch.compile``: bench_mlp's
``loss`` (forward, loss, backward) and ``step`` (the same and SGD with momentum) modes on its
models, side by side in one run. Results: ``results/mlp_bce_with_logits_<device>.*``.

    python benchmarks/bench_mlp_bce_with_logits.py [--models small,net,mnist,w1000,wide]
        [--threads N]
"""

from __future__ import annotations

import sys

import bench_mlp


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--providers" not in argv:
        argv += ["--providers", "eager,fused-mlp,fused-loss,compile"]
    if "--modes" not in argv:
        argv += ["--modes", "loss,step"]
    return bench_mlp.main(argv, name="mlp_bce_with_logits")


if __name__ == "__main__":
    sys.exit(main())
