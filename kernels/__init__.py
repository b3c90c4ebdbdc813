"""Triton kernels and their launchers, one module per op (installed as ``hpml_ops.kernels``).

No autograd here: the launchers take and return plain tensors; ``hpml_ops.ops`` registers them as
custom ops. Importing this package imports triton: set ``TRITON_INTERPRET=1`` before that to run
the kernels on CPU tensors.
"""
