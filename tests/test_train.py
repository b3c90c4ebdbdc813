"""hpml_ops.train: convergence parity with plain PyTorch, gradient accumulation, normalisation
fitted on the training split, checkpoint resume, the schedules against the lecture's formulas,
the CLI (bad flags, the comparison table) and the data-parallel run."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import hpml_ops
from hpml_ops.models import MLP
from hpml_ops.train import (
    SCHEDULES,
    Normalizer,
    ScheduleConfig,
    TrainConfig,
    build_scheduler,
    lecture_lr,
    load_dataset,
    scaled_lr,
    train,
)
from hpml_ops.train.cli import main
from hpml_ops.train.report import compare_reference

from .helpers import TOL, backend_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small synthetic problem: 160 training samples, batch 16 -> 10 steps per epoch, 5 epochs ->
# 50 optimizer steps. Small enough for the Triton interpreter.
SMALL = dict(
    dataset="synthetic",
    n_samples=200,
    n_features=8,
    hidden=(16, 8),
    batch_size=16,
    epochs=5,
    lr=0.1,
    schedule="cosine",
    progress=False,
    log_every=0,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """The models here are tiny: intra-op threads only add synchronisation, and on a shared 2-core
    runner OpenMP contention can make a 16x16 batch norm take 100x longer. Results do not depend
    on it (the kernels reduce in a fixed order); only the test time does."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- convergence parity


@pytest.mark.parametrize("backend", backend_params(include_reference=True))
def test_convergence_parity_with_pytorch(backend):
    """Fused MLP (batch norm + ReLU fused) vs the same MLP in plain PyTorch, same initial weights
    and data order, SGD with momentum, 50 steps: the loss at every step and the final parameters
    and running statistics agree within the suite's fp32 tolerance (tests/helpers.TOL: atol 1e-5,
    rtol 1.3e-6). Each op matches torch to ~1 ulp; over these 50 steps the measured differences
    stay below 1e-6 (loss ~2e-7, parameters ~5e-7). Triton runs in its interpreter here, so it
    gets one hidden layer (same ops, fewer kernel launches)."""
    hidden = (8,) if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1" else (16, 8)
    cfg = TrainConfig(**{**SMALL, "hidden": hidden}, backend=backend)
    fused, ref, summary = compare_reference(cfg, log=None)
    lf = torch.tensor(fused.history["step"]["loss"], dtype=torch.float64)
    lr_ = torch.tensor(ref.history["step"]["loss"], dtype=torch.float64)
    assert lf.numel() == lr_.numel() == 50
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(lf, lr_, atol=atol, rtol=rtol)
    assert summary["max_step_loss_diff"] == pytest.approx((lf - lr_).abs().max().item())
    pr = _params(ref.model)
    for k, v in _params(fused.model).items():
        torch.testing.assert_close(v, pr[k], atol=atol, rtol=rtol, msg=k)
    assert fused.history["step"]["lr"] == ref.history["step"]["lr"]
    # It trained: the loss fell well below the start (log 2 ~ 0.69).
    assert lf[-10:].mean() < 0.6 * lf[:3].mean()
    assert fused.backend == backend


# --------------------------------------------------------------------------- accumulation


def test_grad_accumulation_equals_big_batch():
    """4 micro-batches of 16 accumulated == one batch of 64, step for step (SGD with momentum, 4
    steps per epoch, 2 epochs), including the last, partial group of each epoch (40 samples: 16 +
    16 + 8 against one batch of 40). Without batch norm: its statistics are per micro-batch, so
    accumulation changes the model there by design. Tolerance: fp32, the sums in another order."""
    base = dict(SMALL, n_samples=290, batch_norm=False, epochs=2, backend="cpp")
    data = load_dataset("synthetic", 0, 0.2, 290, 8)
    assert data.x_train.shape[0] == 232  # 3 x 64 + 40
    torch.manual_seed(0)
    m0 = MLP(8, [16, 8], 1, batch_norm=False)
    big = train(TrainConfig(**{**base, "batch_size": 64}), m0.twin(fused=True), data, log=None)
    acc = train(
        TrainConfig(**{**base, "batch_size": 16, "accum_steps": 4}),
        m0.twin(fused=True),
        data,
        log=None,
    )
    assert len(big.history["step"]["loss"]) == len(acc.history["step"]["loss"]) == 8
    torch.testing.assert_close(
        torch.tensor(acc.history["step"]["loss"]),
        torch.tensor(big.history["step"]["loss"]),
        atol=1e-6,
        rtol=1e-6,
    )
    pb = _params(big.model)
    for k, v in _params(acc.model).items():
        torch.testing.assert_close(v, pb[k], atol=1e-6, rtol=1e-5, msg=k)
    # Not trivially equal: the weights moved.
    assert not torch.equal(pb["0.0.weight"], m0.state_dict()["0.0.weight"])


# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("kind", ["standard", "minmax"])
def test_normalizer_fitted_on_train_only(kind):
    data = load_dataset("breast_cancer", seed=0)
    norm = Normalizer(kind).fit(data.x_train)
    xt = norm.transform(data.x_train).double()
    if kind == "standard":
        torch.testing.assert_close(
            xt.mean(0), torch.zeros(30, dtype=torch.float64), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            xt.std(0, correction=0), torch.ones(30, dtype=torch.float64), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(norm.shift, data.x_train.double().mean(0))
    else:
        torch.testing.assert_close(
            xt.amin(0), torch.zeros(30, dtype=torch.float64), atol=1e-6, rtol=0
        )
        torch.testing.assert_close(
            xt.amax(0), torch.ones(30, dtype=torch.float64), atol=1e-6, rtol=0
        )
    # The test split gets the training parameters, not its own: it is not exactly standardised.
    xs = norm.transform(data.x_test).double()
    own = Normalizer(kind).fit(data.x_test).transform(data.x_test).double()
    assert (xs - own).abs().max() > 1e-2
    expected = (data.x_test.double() - norm.shift) / norm.scale
    torch.testing.assert_close(xs, expected.float().double())


def test_train_uses_train_split_statistics():
    cfg = TrainConfig(**{**SMALL, "epochs": 1, "backend": "cpp"})
    res = train(cfg, log=None)
    torch.testing.assert_close(res.normalizer.shift, res.data.x_train.double().mean(0))
    full = torch.cat([res.data.x_train, res.data.x_test]).double().mean(0)
    assert (res.normalizer.shift - full).abs().max() > 1e-3


def test_normalizer_state_round_trip_and_constant_feature():
    x = torch.tensor([[1.0, 5.0], [3.0, 5.0], [5.0, 5.0]])
    n = Normalizer("standard").fit(x)
    m = Normalizer.from_state_dict(n.state_dict())
    torch.testing.assert_close(m.transform(x), n.transform(x))
    assert torch.equal(n.transform(x)[:, 1], torch.zeros(3))  # constant: shifted, not divided
    with pytest.raises(ValueError, match="normalization"):
        Normalizer("zscore")


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    "sched",
    [
        {"schedule": "cosine"},
        {"schedule": "triangular2", "warmup_steps": 4, "cycle_momentum": True},
        {"schedule": "inverse", "optimizer": "adam", "lr": 0.01},
    ],
    ids=["cosine", "triangular2_warmup", "inverse_adam"],
)
def test_checkpoint_resume_gives_identical_curve(tmp_path, sched):
    """Stop in the middle of an epoch (step 13 of 30, accumulation 2), resume from the
    checkpoint: the loss at every step, the learning rates, the per-epoch metrics and the final
    state equal an uninterrupted run's exactly (schedulers chained with a warm-up and cycling
    the momentum too; LambdaLR rebuilt from the config)."""
    base = dict(SMALL, epochs=3, batch_size=8, accum_steps=2, backend="cpp", **sched)
    full = train(TrainConfig(**base), log=None)
    out = str(tmp_path / "run")
    first = train(TrainConfig(**base, out_dir=out, stop_at_step=13), log=None)
    assert first.stopped_early and len(first.history["step"]["loss"]) == 13
    ckpt = os.path.join(out, "checkpoint.pt")
    resumed = train(TrainConfig(**base, out_dir=out, resume=ckpt), log=None)
    assert resumed.history["step"]["loss"] == full.history["step"]["loss"]
    assert resumed.history["step"]["lr"] == full.history["step"]["lr"]
    assert resumed.history["epoch"] == full.history["epoch"]
    pf = _params(full.model)
    for k, v in _params(resumed.model).items():
        assert torch.equal(v, pf[k]), k
    torch.testing.assert_close(resumed.normalizer.shift, full.normalizer.shift, atol=0, rtol=0)


def test_resume_with_other_settings_is_refused(tmp_path):
    out = str(tmp_path / "run")
    base = dict(SMALL, epochs=1, backend="cpp")
    train(TrainConfig(**base, out_dir=out), log=None)
    with pytest.raises(ValueError, match="lr"):
        train(
            TrainConfig(**{**base, "lr": 0.2}, resume=os.path.join(out, "checkpoint.pt")),
            log=None,
        )


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("warmup", [0, 5], ids=["no_warmup", "warmup"])
@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_matches_lecture_formula(name, warmup):
    """torch's scheduler, as built, gives the closed-form rate of the lecture (inverse
    α0/(1+γt), exponential α0 exp(-γt), polynomial α0(1-t/T)^n, multi-step α0/γ^k, cosine, and
    Smith's triangular / triangular2 / exp_range) at every step, warm-up included."""
    total, lr = 120, 0.2
    cfg = ScheduleConfig(name=name, warmup_steps=warmup, power=2.0).resolved(total, lr)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)
    sched = build_scheduler(opt, cfg, total)
    got, want = [], []
    for t in range(total):
        got.append(opt.param_groups[0]["lr"])
        want.append(lecture_lr(cfg, lr, t, total))
        opt.step()
        sched.step()
    torch.testing.assert_close(
        torch.tensor(got, dtype=torch.float64),
        torch.tensor(want, dtype=torch.float64),
        atol=1e-12,
        rtol=1e-12,
    )
    if name != "constant":
        assert len({round(v, 12) for v in got}) >= 3  # the schedule does move


def test_lecture_formulas_by_hand():
    """Spot values straight from the lecture's table."""
    lr = 0.1
    cfg = ScheduleConfig("inverse", gamma=0.5).resolved(100, lr)
    assert lecture_lr(cfg, lr, 4, 100) == pytest.approx(0.1 / 3)
    cfg = ScheduleConfig("exponential", gamma=0.1).resolved(100, lr)
    assert lecture_lr(cfg, lr, 10, 100) == pytest.approx(0.1 * math.exp(-1))
    cfg = ScheduleConfig("polynomial", power=1.0).resolved(100, lr)
    assert lecture_lr(cfg, lr, 25, 100) == pytest.approx(0.075)
    cfg = ScheduleConfig("multistep", gamma=10, milestones=[10, 20]).resolved(100, lr)
    assert [lecture_lr(cfg, lr, t, 100) for t in (9, 10, 20)] == pytest.approx([0.1, 0.01, 0.001])
    cfg = ScheduleConfig("triangular", max_lr=1.0, step_size_up=10).resolved(100, lr)
    assert [lecture_lr(cfg, lr, t, 100) for t in (0, 5, 10, 20)] == pytest.approx(
        [0.1, 0.55, 1.0, 0.1]
    )
    cfg = ScheduleConfig("triangular2", max_lr=1.0, step_size_up=10).resolved(100, lr)
    assert lecture_lr(cfg, lr, 30, 100) == pytest.approx(0.1 + 0.9 / 2)


def test_linear_scaling_rule_and_cycle_momentum():
    assert scaled_lr(0.1, 256, 32) == pytest.approx(0.8)
    assert scaled_lr(0.1, 256, None) == 0.1
    cfg = TrainConfig(
        **{**SMALL, "epochs": 1, "backend": "cpp", "accum_steps": 2, "lr_reference_batch": 8}
    )
    res = train(cfg, log=None)
    assert res.history["effective_batch"] == 32
    assert res.history["lr0"] == pytest.approx(0.1 * 32 / 8)
    assert res.history["step"]["lr"][0] == pytest.approx(0.4)
    # Cyclical momentum: SGD's momentum moves opposite to the lr.
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    cfg = ScheduleConfig("triangular", cycle_momentum=True, step_size_up=4).resolved(16, 0.1)
    sched = build_scheduler(opt, cfg, 16)
    for _ in range(4):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)
    assert opt.param_groups[0]["momentum"] == pytest.approx(0.8)


def test_recorded_lr_follows_schedule_in_training():
    cfg = TrainConfig(**{**SMALL, "epochs": 2, "backend": "cpp", "schedule": "exponential",
                         "warmup_steps": 4})  # fmt: skip
    res = train(cfg, log=None)
    scfg = cfg.schedule_config().resolved(20, cfg.lr)
    want = [lecture_lr(scfg, cfg.lr, t, 20) for t in range(20)]
    assert res.history["step"]["lr"] == pytest.approx(want, rel=1e-12)


# --------------------------------------------------------------------------- data and dtypes


def test_digits_ten_sigmoid_outputs():
    data = load_dataset("digits", seed=0)
    assert data.outputs == 10 and torch.equal(data.y_train.sum(1), torch.ones(len(data.y_train)))
    cfg = TrainConfig(dataset="digits", hidden=(64,), batch_size=64, epochs=4, lr=0.1,
                      backend="cpp", progress=False, log_every=0)  # fmt: skip
    res = train(cfg, data=data, log=None)
    assert res.history["epoch"][-1]["test_acc"] > 0.85
    binary = load_dataset("digits_binary", seed=0)
    assert binary.outputs == 1 and 0.4 < binary.y_train.mean() < 0.6


def test_bf16_autocast_trains():
    cfg = TrainConfig(**{**SMALL, "epochs": 3, "backend": "cpp", "dtype": "bf16"})
    res = train(cfg, log=None)
    loss = res.history["step"]["loss"]
    assert all(math.isfinite(v) for v in loss)
    assert sum(loss[-5:]) / 5 < 0.8 * sum(loss[:3]) / 3
    assert next(res.model.parameters()).dtype == torch.float32  # master weights stay fp32


def test_same_seed_same_split_and_order():
    a = load_dataset("synthetic", seed=3, n_samples=100, n_features=4)
    b = load_dataset("synthetic", seed=3, n_samples=100, n_features=4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    c = load_dataset("synthetic", seed=4, n_samples=100, n_features=4)
    assert not torch.equal(a.x_train, c.x_train)


# --------------------------------------------------------------------------- CLI


def _run_cli(args, **env):
    e = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-m", "hpml_ops.train", *args],
        cwd=REPO,
        env=e,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args, env, match",
    [
        (["--dataset", "imagenet"], {}, "invalid choice: 'imagenet'"),
        # Triton on CPU tensors needs the interpreter: not available with TRITON_INTERPRET=0.
        (["--backend", "triton", "--device", "cpu"], {"TRITON_INTERPRET": "0"}, "backend 'triton'"),
    ],
    ids=["unknown_dataset", "unavailable_backend"],
)
def test_cli_bad_flag_subprocess(args, env, match):
    """A bad flag: exit status 2, exactly one line on stderr, no traceback, nothing trained."""
    r = _run_cli(args, **env)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("hpml-train: error:") and match in lines[0], lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.mark.parametrize(
    "args, match",
    [
        (["--batch-size", "-4"], "--batch-size: expected a positive integer, got -4"),
        (["--accum-steps", "0"], "--accum-steps: expected a positive integer, got 0"),
        (["--epochs", "two"], "--epochs: expected a positive integer"),
        (["--schedule", "step"], "invalid choice: 'step'"),
        (["--warmup-steps", "1000", "--epochs", "1"], "warmup_steps (1000) must be fewer"),
        (["--dtype", "fp16", "--device", "cpu"], "fp16"),
        (["--resume", "/nonexistent/ckpt.pt"], "no checkpoint file"),
        (["--ddp"], "run under torchrun"),
        (["--compare-reference", "--stop-at-step", "3"], "drop --resume/--stop-at-step"),
    ],
)
def test_cli_bad_flags(args, match, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main([*args, "--out", str(tmp_path), "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert match in err, err


def test_cli_compare_reference(tmp_path, capsys):
    """The table ``make train`` prints, and the metrics JSON and plot it writes (small run)."""
    out = tmp_path / "run"
    rc = main(["--dataset", "synthetic", "--n-samples", "300", "--n-features", "8",
               "--hidden", "16,8", "--epochs", "2", "--backend", "cpp", "--compare-reference",
               "--out", str(out), "--no-progress", "--warmup-steps", "3"])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    for row in ("test accuracy", "ms / step", "speedup", "largest per-step loss difference"):
        assert row in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["runs"]) == {"fused (cpp)", "PyTorch"}
    s = metrics["summary"]
    assert s["max_step_loss_diff"] < 1e-5
    timing = s["interleaved"]  # the speed line: both trained models' steps timed alternately
    assert timing["rounds"] == 300 and timing["fused_ms"] > 0 and timing["pytorch_ms"] > 0
    assert s["speedup"] == timing["speedup"] > 0
    assert len(metrics["runs"]["PyTorch"]["history"]["step"]["loss"]) == 2 * math.ceil(240 / 32)
    png = (out / "train.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (out / "checkpoint.pt").is_file()


# --------------------------------------------------------------------------- data parallel


def _has_sync_batch_norm() -> bool:
    return hasattr(hpml_ops.nn, "SyncBatchNorm")


def test_ddp_two_processes_match_one(tmp_path):
    """torchrun-style run of 2 gloo processes (per-process batch 16, SyncBatchNorm) against one
    process with the same global batch (32): the loss at every step and the final weights agree
    within the fp32 tolerance (the statistics are reduced across processes in another order)."""
    if not _has_sync_batch_norm():
        pytest.skip("hpml_ops.nn.SyncBatchNorm is not in this tree yet (issue 4)")
    base = dict(SMALL, n_samples=200, epochs=2, backend="cpp")  # 160 train: 5 steps of 32
    single = train(TrainConfig(**{**base, "batch_size": 32}), log=None)
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "hpml_ops.train", "--ddp", "--dataset", "synthetic", "--n-samples", "200",
        "--n-features", "8", "--hidden", "16,8", "--batch-size", "16", "--epochs", "2",
        "--lr", "0.1", "--schedule", "cosine", "--backend", "cpp", "--device", "cpu",
        "--out", str(out), "--no-progress", "--no-plot", "--log-every", "0",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    (run,) = metrics["runs"].values()
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(
        torch.tensor(run["history"]["step"]["loss"], dtype=torch.float64),
        torch.tensor(single.history["step"]["loss"], dtype=torch.float64),
        atol=atol,
        rtol=rtol,
    )
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    ps = _params(single.model)
    for k, v in ckpt["model"].items():
        torch.testing.assert_close(v, ps[k], atol=atol, rtol=rtol, msg=k)


def test_config_is_plain_data():
    cfg = TrainConfig()
    assert dataclasses.asdict(cfg)["dataset"] == "breast_cancer"
    assert json.loads(json.dumps(cfg.to_dict()))["hidden"] == [64, 32]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_optimizer_is_torchs_fused_where_it_exists(optimizer):
    """The loop's optimizer is torch's fused implementation for floating-point parameters on CPU
    (one call for all of them), and the for-loop one where torch has no fused kernel (here: a
    parameter on the meta device); the fused one takes the for-loop's steps within an ulp."""
    from hpml_ops.train.loop import _make_optimizer

    cfg = TrainConfig(**{**SMALL, "optimizer": optimizer, "weight_decay": 1e-4})
    meta = _make_optimizer(cfg, [torch.nn.Parameter(torch.zeros(3, device="meta"))], 0.1)
    assert not meta.param_groups[0]["fused"]
    g = torch.Generator().manual_seed(4)
    start = [torch.randn(17, 5, generator=g), torch.randn(5, generator=g)]
    grads = [[torch.randn(t.shape, generator=g) for t in start] for _ in range(20)]
    runs = []
    for fused in (True, False):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = _make_optimizer(cfg, params, 0.05)
        assert opt.param_groups[0]["fused"] is True
        if not fused:  # the same optimizer, switched to torch's for-loop implementation
            opt.param_groups[0]["fused"] = False
        for step in grads:
            for p, d in zip(params, step, strict=True):
                p.grad = d.clone()
            opt.step()
        runs.append(torch.cat([p.detach().flatten() for p in params]))
    torch.testing.assert_close(runs[0], runs[1], rtol=2**-23, atol=2**-24)
