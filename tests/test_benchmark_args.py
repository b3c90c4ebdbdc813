"""The benchmark programs' command lines (benchmarks/common.py's parse): the provider and mode
names are checked, so that a misspelt provider fails instead of running plain PyTorch under its
name (it once did, and its rows read as a 1.07-1.12x "speedup" of eager over itself)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

# benchmarks/common.py under a name of its own (the scripts import it as `common` from their
# directory; that name is not put on this process's path).
_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "common.py")
_SPEC = importlib.util.spec_from_file_location("hpml_benchmarks_common", _PATH)
common = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(common)

MODES4 = ("fwd", "fwd-eval", "bwd", "fwd+bwd")


def _parse(argv, modes=None):
    p = common.base_parser("test")
    return common.parse(p, argv, ("eager", "cpp"), modes=modes)


def test_defaults_and_subsets():
    args = _parse([])
    assert args.providers == ["eager", "cpp"] and args.modes == ["fwd", "bwd", "fwd+bwd"]
    assert args.dtype == torch.float32 or args.on_gpu
    args = _parse(["--providers", "cpp", "--modes", "fwd"], modes=("fwd", "loss"))
    assert args.providers == ["cpp"] and args.modes == ["fwd"]
    # a script's own modes: the default is all of them, and the default string is not special
    assert _parse([], modes=("fwd", "loss")).modes == ["fwd", "loss"]
    assert _parse(["--modes", "fwd,bwd,fwd+bwd"], modes=MODES4).modes == ["fwd", "bwd", "fwd+bwd"]


@pytest.mark.parametrize(
    "argv,word",
    [
        (["--providers", "eager,per-layr"], "provider per-layr"),
        (["--modes", "fwd,bwdd"], "mode bwdd"),
    ],
)
def test_unknown_names_are_usage_errors(argv, word, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(argv)
    assert e.value.code == 2
    assert f"unknown {word}" in capsys.readouterr().err
