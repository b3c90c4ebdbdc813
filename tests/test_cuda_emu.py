"""The CUDA emulator (hpml_ops._C_emu, csrc/emu): its checks catch what they are for, and every
CUDA kernel of csrc/cuda runs under it.

- Deliberately broken kernels (csrc/emu/broken_kernels.cu, ops of hpml_emu_test), one per check,
  each caught under several seeds with the message shown here.
- A battery that launches every kernel instantiation of csrc/cuda (every dtype, activation,
  weight combination, vector width, walk; checked against the library's symbols) and gets the
  same bits under several seeds (different orders of blocks and threads, different WMMA layouts).

The parity of each op against float64 torch runs in the op's own test file, where "cuda-emu" is
one of the backends (and tests/test_batch_norm_cuda.py tests the batch-norm kernels directly).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import hpml_ops
from hpml_ops.ops.schema import SCHEMAS

_REASON = hpml_ops._backend.unavailable_reason("cuda-emu", "cpu")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"no CUDA emulator: {_REASON}")
ROOT = Path(__file__).resolve().parent.parent
SEEDS = (0, 1, 2)


def _emu():
    return hpml_ops._backend._C_EMU


# (op of hpml_emu_test, input, the message the emulator prints: a pattern any seed matches).
BROKEN = {
    "tree_sum_without_barrier": (
        lambda: torch.randn(64),
        r"hpml_emu: kernel tree_sum_without_barrier, block \(0, 0, 0\), thread \(\d+, 0, 0\): "
        r"(reads|writes) 4 bytes at shared 0x[0-9a-f]+ \(byte \d+ of the emulated library's "
        r"shared memory\) that (thread \(\d+, 0, 0\)|other threads) (wrote|read) since the last "
        r"__syncthreads \(a shared-memory race\)",
    ),
    "copy_off_by_one": (
        lambda: torch.randn(100),
        r"hpml_emu: kernel copy_off_by_one, block \(1, 0, 0\), thread \(36, 0, 0\): writes 4 "
        r"bytes at 0x[0-9a-f]+, outside every tensor of the op \(out of bounds\); the nearest "
        r"tensor below, \[0x[0-9a-f]+, 0x[0-9a-f]+\), ends 0 bytes before it",
    ),
    "shuffle_with_wrong_mask": (
        lambda: torch.randn(32),
        r"hpml_emu: kernel shuffle_with_wrong_mask, block \(0, 0, 0\): __shfl_down_sync: lane \d+ "
        r"of warp 0 calls it with mask 0xffffffff, but lane \d+ named in the mask has exited "
        r"\(the mask must name exactly the lanes that make the call\)",
    ),
    "read_unwritten_shared": (
        lambda: torch.randn(32),
        r"hpml_emu: kernel read_unwritten_shared, block \(0, 0, 0\), thread \(\d+, 0, 0\): reads "
        r"4 bytes at shared 0x[0-9a-f]+ \(byte \d+ of the emulated library's shared memory\) "
        r"that no thread of this block wrote \(uninitialised shared memory\)",
    ),
    "launch_too_many_threads": (
        lambda: torch.randn(32),
        r"hpml_emu: kernel copy_off_by_one: invalid launch configuration, grid \(1, 1, 1\), "
        r"block \(2048, 1, 1\) \(CUDA: invalid configuration argument\)",
    ),
    "barrier_in_branch": (
        lambda: torch.randn(32),
        r"hpml_emu: kernel barrier_in_branch, block \(0, 0, 0\): __syncthreads: 16 threads wait "
        r"at a barrier that thread \(\d+, 0, 0\) \(and 15 others\) exited without reaching "
        r"\(every thread of a block must reach it\)",
    ),
}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_kernel_is_caught(name, seed, capsys):
    make, message = BROKEN[name]
    _emu().set_seed(seed)
    with pytest.raises(RuntimeError) as info:
        getattr(torch.ops.hpml_emu_test, name)(make())
    text = str(info.value).splitlines()[0]
    print(f"{name} (seed {seed}): {text}")  # shown with pytest -s
    assert re.fullmatch(message, text), text


def test_fragment_layout_dependence_shows():
    """A kernel that reads WMMA fragment elements assuming one layout gives a different (wrong)
    tile under each seed; the correct one (store_matrix_sync) gives the tile under every seed."""
    x = torch.randn(256)
    wrong = []
    for seed in SEEDS:
        _emu().set_seed(seed)
        assert torch.equal(torch.ops.hpml_emu_test.tile_through_fragment(x, False), x)
        _emu().set_seed(seed)
        wrong.append(torch.ops.hpml_emu_test.tile_through_fragment(x, True))
    assert not any(torch.equal(w, x) for w in wrong)
    assert not torch.equal(wrong[0], wrong[1])


# ---- every kernel, the same bits under every seed ------------------------------------------------

E = torch.ops.hpml_emu if _REASON is None else None
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _t(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _unaligned(t):
    """A copy of t that starts one element into its buffer: no 16-byte packs."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    v = buf[1:].view(t.shape)
    v.copy_(t)
    return v


def _bce_cases(dtype):
    out = []
    for aligned in (True, False):
        x = _t((37, 8), dtype, 1)
        y = torch.rand(37, 8, generator=torch.Generator().manual_seed(2)).to(dtype)
        if not aligned:
            x, y = _unaligned(x), _unaligned(y)
        full = torch.rand(37, 8, generator=torch.Generator().manual_seed(3)).to(dtype) + 0.5
        # Full weights allow packs; broadcast ones (per row, per column) take the index path.
        for w in (None, full if aligned else full[:, :1]):
            for pw in (None, (full * 2) if aligned else (full * 2)[0]):
                for red in (0, 1, 2):
                    out.append((x, y, w, pw, red))
    return out


def _battery():
    """Calls of every op in every configuration that selects a different kernel instantiation;
    returns every output, in order."""
    res = []
    for dt in DTYPES:
        for x, y, w, pw, red in _bce_cases(dt):
            loss = E.bce_with_logits(x, y, w, pw, red)
            g = torch.ones_like(loss)
            res += [loss, *E.bce_with_logits_backward(g, x, y, w, pw, red, True, True)]
        for act in range(5):
            x, wt, b = _t((37, 29), dt, 4), _t((23, 29), dt, 5, scale=0.2), _t((23,), dt, 6)
            out, mask = E.linear_act(x, wt, b, act, 0.1)
            g = _t((37, 23), dt, 7)
            grads = E.linear_act_backward(g, x, wt, out, mask, act, 0.1, True, True, True)
            res += [out, mask, *grads]
        if dt in (torch.float16, torch.bfloat16):  # the fused MLP kernels (csrc/cuda/mlp.cu)
            x, none = _t((37, 29), dt, 14), torch.empty(0, 0, dtype=dt)
            ws = [_t((23, 29), dt, 15, scale=0.2), _t((3, 23), dt, 16, scale=0.2)]
            bs, no = [_t((23,), dt, 17), none], [none]
            out, saved = E.mlp(x, ws, bs, [False], no, no, no, no, True, 1e-5, 1, 0.1, 3)
            res += [out, *saved]
            gx, gw, gb, _, _ = E.mlp_backward(
                _t((37, 3), dt, 18), x, out, ws, bs, [False], no, saved, True, 1, 0.1, 3, True,
                [True, True], [True, False], [False], [False],
            )  # fmt: skip
            res += [gx, *gw, *gb]
        pdt = torch.float32 if dt in (torch.float16, torch.bfloat16) else dt
        for shape, cl in (
            ((64, 8), False),  # rows, 16-byte packs
            ((64, 5), False),  # rows, single values
            ((2, 3, 8, 8), False),  # planes, packs
            ((2, 3, 7, 9), False),  # planes, single values
            ((2, 8, 3, 3), True),  # channels last: rows
        ):
            x = _t(shape, dt, 8)
            if cl:
                x = x.movedim(1, -1).contiguous().movedim(-1, 1)
            c = shape[1]
            w, b = _t((c,), pdt, 9) + 2, _t((c,), pdt, 10)
            rm, rv = _t((c,), pdt, 11), _t((c,), pdt, 12).abs() + 0.5
            for training in (True, False):
                out, mean, invstd, var = E.batch_norm(x, w, b, rm, rv, training, 1e-5, 1)
                g = _t(shape, dt, 13)
                res += [out, mean, invstd, var]
                res += list(
                    E.batch_norm_backward(g, x, w, out, mean, invstd, training, 1, True, True, True)
                )
            m, v = E.batch_norm_stats(x)
            sdz, sdzx = E.batch_norm_backward_reduce(g, x, out, m, 1)
            n = x.numel() // c
            res += [m, v, sdz, sdzx]
            res.append(E.batch_norm_backward_elemt(g, x, w, out, m, invstd, sdz, sdzx, n, 1))
    return res


def _kernel_symbols() -> dict[int, str]:
    """{symbol value: name} of every instantiation of a kernel of csrc/cuda in the emulated
    library (the kernels: the __global__ functions of the sources)."""
    names = set()
    for cu in (ROOT / "csrc" / "cuda").glob("*.cu"):
        text = cu.read_text()
        pattern = r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)"
        names |= set(re.findall(pattern, text))
    lib = _emu().__file__
    out = subprocess.run(
        ["nm", "-C", "--defined-only", lib], capture_output=True, text=True, check=True
    ).stdout
    found = {}
    for line in out.splitlines():
        parts = line.split(" ", 2)
        if len(parts) != 3 or parts[1] not in ("t", "T", "W", "w"):
            continue
        m = re.match(r"(?:void )?hpml::\(anonymous namespace\)::(\w+)[<(]", parts[2])
        if m and m.group(1) in names:
            found[int(parts[0], 16)] = parts[2]
    return found


def test_every_kernel_runs_and_gives_the_same_bits_under_every_seed():
    runs = []
    for seed in SEEDS:
        _emu().set_seed(seed)
        runs.append(_battery())
    for i, outs in enumerate(zip(*runs, strict=True)):
        for s, o in zip(SEEDS[1:], outs[1:], strict=True):
            assert o.dtype == outs[0].dtype and o.shape == outs[0].shape
            assert torch.equal(o, outs[0]), f"output {i}: seed {s} differs from seed {SEEDS[0]}"
    if shutil.which("nm") is None:
        pytest.skip("no nm here to list the library's kernels (the bits were checked)")
    kernels = _kernel_symbols()
    assert kernels, "no kernel symbols found in the emulated library"
    launched = set(_emu().launched_kernels())
    missing = sorted(name for addr, name in kernels.items() if addr not in launched)
    assert not missing, f"{len(missing)} of {len(kernels)} kernels never ran:\n" + "\n".join(
        missing[:20]
    )


def test_every_op_has_an_emulated_kernel():
    for family in SCHEMAS.values():
        for op in family:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"hpml_emu::{op}", "CPU"), op
