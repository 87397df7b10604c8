"""CUDA checks, run by ``make test-gpu`` (``pytest -m gpu``): does every CUDA path of the project work?

Every test here is marked ``gpu`` and runs on CUDA only: without a CUDA device tests/conftest.py skips it with the
reason "no CUDA device: torch.cuda.is_available() is False", and the default run (``make test``) deselects it.

1. Triton Bi-WKV kernels (forward and backward) against the dense float64 reference, fp32 and bf16 inputs; the
   official variant on CUDA against its float64 transcription of the official CUDA kernel.
2. Softmax attention: the SDPA route of ``backbones.layers.attention`` (bf16 and fp32) and, when flash-attn is
   installed, its flash-attn route (bf16 and fp16), against a float64 CPU softmax attention.
3. Two bf16-autocast training steps of every registered backbone on CUDA against the fp32 CPU steps.
4. DDP on NCCL (two or more GPUs): a 2-process torchrun training equals the 1-process training.
5. ``bench.throughput`` (when it exists): --help and a tiny CUDA run.
6. ``sample_images`` on CUDA equals the CPU result (the noise is drawn on CPU generators on both).
7. Mamba kernels (DiS): the selective scan (Triton kernels; mamba_ssm's CUDA kernel when installed) and the causal
   conv1d (PyTorch on CUDA; the causal_conv1d package when installed) against their float64 references.

Errors are norm-wise as in test_bi_wkv.py: max|x - ref| / max|ref|.
"""

from __future__ import annotations

import copy
import csv
import importlib.util
import inspect
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import SMOKE_KWARGS, make_inputs, train_config

import backbones
from backbones import layers
from backbones.kernels import bi_wkv, bi_wkv_reference, resolve_impl
from backbones.kernels.wkv_official import bi_wkv_official_reference, bi_wkv_official_reference_backward
from diffusion.sampling import sample_images
from diffusion.trainer import build_run, train_step

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[1]


def device() -> torch.device:
    """The device every test of this file runs on."""
    return torch.device("cuda")


def cuda_device_count() -> int:
    return torch.cuda.device_count()


def rel_err(x: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    x, ref = x.detach().cpu().double(), ref.detach().cpu().double()
    return ((x - ref).abs().max() / max(ref.abs().max().item(), floor)).item()


@pytest.fixture
def no_tf32():
    """fp32 matmuls and convolutions in true fp32 on CUDA (TF32 off) for the test, restored afterwards."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def leaf(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fresh leaf copy of ``x`` on the test device (in ``dtype``), requiring grad."""
    return x.detach().to(device(), dtype or x.dtype, copy=True).requires_grad_()


# --------------------------------------------------------------------------------------------------------------
# 1. Bi-WKV: Triton kernels and the official variant on CUDA
# --------------------------------------------------------------------------------------------------------------
# fp32: the tolerances of the interpreted Triton tests (tests/test_bi_wkv.py). bf16 k, v (w, u fp32, as the model
# passes them under autocast): y, dk, dv are rounded to bf16 (relative step 2^-8), hence 8e-3 of their maximum;
# dw, du stay fp32 (accumulated in fp32 from the same bf16-rounded inputs the reference gets), hence the fp32 bound.
FWD_TOL, GRAD_TOL = 1e-5, 1e-4
BF16_TOL = 8e-3

# (T, B, C, kind): T = 1 (every gradient but dv is 0), T and C not multiples of the kernels' channel block (32 for
# C > 16, else the next power of two: C = 5 masks 3 of 8 lanes, C = 33 leaves a 1-channel block), |k| beyond 100
# ("large_k": e^k overflows fp32 naively), and long sequences.
TRITON_CASES = [(1, 3, 5, "normal"), (1, 2, 40, "large_k"), (2, 2, 33, "normal"), (7, 2, 40, "large_k"),
                (33, 2, 5, "normal"), (64, 2, 64, "normal"), (100, 2, 48, "large_k"), (257, 2, 37, "normal"),
                (257, 1, 8, "large_k"), (1000, 1, 40, "normal"), (1024, 1, 16, "large_k")]


def wkv_errors(fn, T: int, B: int, C: int, kind: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """(forward error, [errors of dw, du, dk, dv]) of ``fn`` on the device with k, v (and the cotangent) in ``dtype``
    against the float64 reference of the same (rounded) inputs. Gradients that are 0 in exact arithmetic (dw at
    T <= 2; dw, du, dk at T = 1) are measured against max|dL/dy| * max(1, max|v|) * 1e-2, as in test_bi_wkv.py."""
    w, u, k, v = make_inputs(T, B, C, kind, seed)
    k, v = k.to(dtype), v.to(dtype)
    gy = torch.randn(B, T, C, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    xs = [leaf(x) for x in (w, u, k, v)]
    y = fn(*xs)
    grads = torch.autograd.grad(y, xs, gy.to(device()))
    assert y.device.type == device().type and y.dtype == dtype
    assert [g.dtype for g in grads] == [torch.float32, torch.float32, dtype, dtype]
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    x64 = [leaf(x, torch.float64) for x in (w, u, k, v)]
    y64 = bi_wkv_reference(*x64)
    grads64 = torch.autograd.grad(y64, x64, gy.to(device(), torch.float64))
    floor = 1e-2 * gy.abs().max().item() * max(1.0, v.abs().max().item())
    return rel_err(y, y64), [rel_err(g, r, floor) for g, r in zip(grads, grads64)]


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_bi_wkv_fp32_matches_float64_reference(case):
    fwd, grads = wkv_errors(lambda *a: bi_wkv(*a, impl="triton"), *case)
    assert fwd <= FWD_TOL, fwd
    assert max(grads) <= GRAD_TOL, grads


@pytest.mark.parametrize("case", [c for c in TRITON_CASES if c[0] <= 257], ids=lambda c: "-".join(map(str, c)))
def test_triton_bi_wkv_bf16_matches_float64_reference(case):
    fwd, (gw, gu, gk, gv) = wkv_errors(lambda *a: bi_wkv(*a, impl="triton"), *case, dtype=torch.bfloat16)
    assert fwd <= BF16_TOL, fwd
    assert max(gk, gv) <= BF16_TOL, (gk, gv)
    assert max(gw, gu) <= GRAD_TOL, (gw, gu)


def test_auto_dispatch_on_cuda_runs_the_triton_kernels():
    """impl="auto" (what the rwkv backbone uses) is the Triton implementation on CUDA, bit for bit."""
    w, u, k, v = (x.to(device()) for x in make_inputs(64, 2, 40))
    assert resolve_impl("auto", k.device) == "triton"
    assert torch.equal(bi_wkv(w, u, k, v), bi_wkv(w, u, k, v, impl="triton"))


OFFICIAL_T = [1, 5, 16, 32, 33, 64, 100, 256]


@pytest.mark.parametrize("T", OFFICIAL_T)
@pytest.mark.parametrize("kind", ["normal", "large_k"])
def test_official_variant_on_cuda_matches_kernel_transcription(T, kind):
    """variant="official" on CUDA (float64 and fp32) against the float64 transcriptions of the official kernels
    (forward, and backward with gw, gu summed over the batch). float64: 1e-10 (1e-12 / 1e-10 on the CPU in
    test_bi_wkv_official.py; the CUDA scans sum in another order); fp32: 1e-5 forward, 1e-4 gradients."""
    w, u, k, v = make_inputs(T, 2, 37, kind, dtype=torch.float64)
    gy = torch.randn(k.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = bi_wkv_official_reference(w, u, k, v)
    ref_grads = bi_wkv_official_reference_backward(w, u, k, v, gy)
    floor = 1e-2 * gy.abs().max().item() * v.abs().max().item()
    for dtype, fwd_tol, grad_tol in ((torch.float64, 1e-10, 1e-10), (torch.float32, FWD_TOL, GRAD_TOL)):
        xs = [leaf(x, dtype) for x in (w, u, k, v)]
        y = bi_wkv(*xs, variant="official")
        grads = torch.autograd.grad(y, xs, gy.to(device(), dtype))
        assert y.device.type == device().type and y.dtype == dtype
        assert rel_err(y, ref) <= fwd_tol, (dtype, rel_err(y, ref))
        errs = [rel_err(g, r, floor) for g, r in zip(grads, ref_grads)]
        assert max(errs) <= grad_tol, (dtype, errs)


def test_official_variant_bf16_on_cuda():
    """bf16 k, v with fp32 w, u: y, dk, dv within bf16 rounding (8e-3) of the float64 transcription of the same
    rounded inputs, dw, du within the fp32 bound."""
    w, u, k, v = make_inputs(100, 2, 37, "large_k")
    k, v = k.bfloat16(), v.bfloat16()
    gy = torch.randn(k.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    xs = [leaf(x) for x in (w, u, k, v)]
    y = bi_wkv(*xs, variant="official")
    gw, gu, gk, gv = torch.autograd.grad(y, xs, gy.to(device()))
    assert y.dtype == gk.dtype == gv.dtype == torch.bfloat16 and gw.dtype == gu.dtype == torch.float32
    assert rel_err(y, bi_wkv_official_reference(w, u, k, v)) <= BF16_TOL
    rw, ru, rk, rv = bi_wkv_official_reference_backward(w, u, k, v, gy)
    assert max(rel_err(gk, rk), rel_err(gv, rv)) <= BF16_TOL
    assert max(rel_err(gw, rw), rel_err(gu, ru)) <= GRAD_TOL


# --------------------------------------------------------------------------------------------------------------
# 2. Softmax attention: SDPA and flash-attn routes of backbones.layers.attention
# --------------------------------------------------------------------------------------------------------------
# (B, heads, T, head_dim): T not a multiple of any tile (65), DiT-XL's head dim 72 (1152 / 16)
ATTN_SHAPES = [(2, 4, 64, 32), (2, 6, 65, 64), (1, 16, 256, 72)]
# max-norm relative error against float64 softmax attention of the same rounded inputs: fp32 1e-5; half precision
# (inputs, output and gradients rounded to bf16/fp16, fp32 accumulation inside the kernels): bf16 1e-2, fp16 2e-3
ATTN_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def softmax_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """softmax(q k^T / sqrt(d)) v in float64 on the CPU, and its gradients for the cotangent ``go``."""
    q, k, v = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    out = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v
    return out, (q, k, v)


def attention_inputs(shape, dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v, go = (torch.randn(shape, generator=g) for _ in range(4))
    return [x.to(dtype) for x in (2 * q, k, v, go)]  # 2 q: sharper softmax rows


def check_attention(fn, shape, dtype) -> None:
    q, k, v, go = attention_inputs(shape, dtype)
    xs = [leaf(x) for x in (q, k, v)]
    out = fn(*xs)
    grads = torch.autograd.grad(out, xs, go.to(device()))
    assert out.device.type == device().type and out.dtype == dtype and out.shape == q.shape
    ref, ref_xs = softmax_attention_reference(q, k, v)
    ref_grads = torch.autograd.grad(ref, ref_xs, go.double())
    tol = ATTN_TOL[dtype]
    assert rel_err(out, ref) <= tol, (dtype, rel_err(out, ref))
    errs = [rel_err(g, r) for g, r in zip(grads, ref_grads)]
    assert max(errs) <= 2 * tol, (dtype, errs)


@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_sdpa_attention_on_cuda_matches_float64_reference(shape, dtype, monkeypatch, no_tf32):
    """The SDPA route of layers.attention (taken when flash-attn is absent, and for fp32), flash-attn disabled."""
    monkeypatch.setattr(layers, "_flash_attn_func", lambda: None)
    check_attention(layers.attention, shape, dtype)


@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_flash_attn_route_matches_sdpa_and_float64_reference(shape, dtype, monkeypatch):
    """layers.attention on CUDA half precision goes through flash-attn inside layers.flash_attention() (what
    train.flash_attn=true turns on): same result as the float64 reference (and as SDPA, within twice the
    tolerance); outside it, SDPA."""
    if importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn not installed")
    flash = layers._flash_attn_func()
    assert flash is not None, "flash_attn is installed but flash_attn_func does not import"
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return flash(*args, **kwargs)

    monkeypatch.setattr(layers, "_flash_attn_func", lambda: counted)
    q, k, v, _ = (x.to(device()) for x in attention_inputs(shape, dtype))
    layers.attention(q, k, v)
    assert not calls, "layers.attention called flash-attn without train.flash_attn"
    with layers.flash_attention():
        check_attention(layers.attention, shape, dtype)
        assert calls, "layers.attention did not call flash-attn"
        assert rel_err(layers.attention(q, k, v), F.scaled_dot_product_attention(q, k, v)) <= 2 * ATTN_TOL[dtype]


# --------------------------------------------------------------------------------------------------------------
# 3. bf16 training step of every registered backbone on CUDA
# --------------------------------------------------------------------------------------------------------------
NAMES = [n for n in backbones.available() if not n.startswith("test_")]
# bf16 autocast against fp32: the losses of the same two steps (same weights, batches, t, noise, labels), relative
TRAIN_LOSS_RTOL = 1e-2  # measured on the CPU (bf16 autocast there): at most 7e-4


def two_steps(run_dir: Path, name: str, overrides: list[str]):
    """Build the run of SMOKE_KWARGS[name] on digits and take two training steps; returns (run, metrics).

    The seeded initial weights are perturbed by the same N(0, 0.02^2) draw on every device first: at the official
    init the adaLN-Zero and output layers are zero, so the first loss would not depend on the precision at all."""
    assert name in SMOKE_KWARGS, f"add a tiny configuration for backbone {name} to tests/helpers.py SMOKE_KWARGS"
    backbone = {"name": name, **SMOKE_KWARGS[name]}
    if "drop_path_rate" in inspect.signature(backbones.get(name)).parameters:
        backbone["drop_path_rate"] = 0.0  # drop-path masks come from the device's RNG: CPU and CUDA draw others
    run = build_run(train_config(run_dir, overrides, backbone))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in run.model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g).to(p.device))
    return run, [train_step(run) for _ in range(2)]


@pytest.mark.parametrize("name", NAMES)
def test_bf16_training_step_on_cuda_matches_fp32_cpu_step(name, tmp_path):
    run, steps = two_steps(tmp_path / "cuda", name, [f"device={device().type}", "train.precision=bf16"])
    assert run.device.type == device().type and run.identity["train"]["precision"] == "bf16"
    assert all(p.device.type == device().type for p in run.model.parameters())
    for m in steps:  # train_step raises on a non-finite loss or gradient norm; check anyway
        assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]), m
    _, cpu = two_steps(tmp_path / "cpu", name, ["device=cpu", "train.precision=fp32"])
    for key in ("loss", "mse"):
        assert steps[0][key] == pytest.approx(cpu[0][key], rel=TRAIN_LOSS_RTOL), (steps[0], cpu[0])
    assert steps[1]["loss"] == pytest.approx(cpu[1]["loss"], rel=TRAIN_LOSS_RTOL), (steps[1], cpu[1])


# --------------------------------------------------------------------------------------------------------------
# 4. DDP on NCCL
# --------------------------------------------------------------------------------------------------------------
def test_ddp_on_nccl_two_processes_equal_one_process(tmp_path, monkeypatch):
    """As tests/test_distributed.py on gloo, now with device=cuda (NCCL): 4 steps with the global batch split over
    two GPUs equal 4 steps in one process (after 2, the adaLN-Zero init leaves most tensors unmoved). fp32 without
    TF32 (NVIDIA_TF32_OVERRIDE=0), compared at 1e-5 (the weights move by ~1e-3 per step); bf16 autocast would
    round differently for another per-GPU batch size."""
    import torch.distributed as dist
    from test_distributed import assert_same_weights, train

    n = cuda_device_count()
    if n < 2:
        pytest.skip(f"DDP on NCCL needs two or more CUDA devices; this machine has {n}")
    if device().type == "cuda" and not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")
    extra = ["train.steps=4", f"device={device().type}", "train.precision=fp32"]
    one = train(1, tmp_path / "one", extra, tmp_path)
    two = train(2, tmp_path / "two", extra, tmp_path)
    assert one["step"] == two["step"] == 4
    on_cpu = [r["config"]["history"][0]["device"].startswith("cpu-") for r in (one, two)]
    assert on_cpu == [device().type == "cpu"] * 2  # both runs recorded the device they trained on
    assert_same_weights(one, two, atol=1e-5)
    torch.manual_seed(0)  # the run's seeded initialisation: training must have moved the weights
    init = backbones.build("dit", **one["config"]["backbone_kwargs"]).state_dict()
    assert sum(not torch.equal(init[name], v.cpu()) for name, v in one["model"].items()) > len(init) // 2


# --------------------------------------------------------------------------------------------------------------
# 5. Throughput benchmark
# --------------------------------------------------------------------------------------------------------------
# The tiny CUDA run in bench.throughput's options (DiT-S/2 at 32x32x4, batch 2), with the switches CUDA adds
THROUGHPUT_TINY_ARGS = ["--backbones", "dit", "--batch", "2", "--warmup", "1", "--repeats", "2", "--switches", "bf16",
                        "tf32", "flash_attn"]


def test_throughput_benchmark_runs_on_cuda(tmp_path):
    if importlib.util.find_spec("bench.throughput") is None:
        pytest.skip("bench.throughput not implemented yet")
    cmd, env = [sys.executable, "-m", "bench.throughput"], dict(os.environ, PYTHONPATH=str(REPO))
    helped = subprocess.run([*cmd, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "usage" in helped.stdout.lower(), helped.stderr[-3000:]
    out = tmp_path / "out"
    proc = subprocess.run([*cmd, *THROUGHPUT_TINY_ARGS, "--device", device().type, "--out", str(out)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p for p in out.rglob("*") if p.is_file()], f"bench.throughput wrote nothing under {out}"
    with open(next(out.glob("cuda-*.csv")), newline="") as f:
        rows = {r["switches"]: r for r in csv.DictReader(f)}
    assert all(rows[s]["status"] == "ok" for s in ("none", "bf16", "tf32")), rows
    assert rows["flash_attn"]["status"] == "ok" or importlib.util.find_spec("flash_attn") is None, rows
    assert float(rows["none"]["peak_mem_mb"]) > 0 and rows["none"]["mem_method"] == "cuda_max_memory_allocated"


# --------------------------------------------------------------------------------------------------------------
# 6. Sampling on CUDA
# --------------------------------------------------------------------------------------------------------------
# images in [-1, 1], fp32 without TF32, 10 steps. fp32-level differences (weights perturbed by 1e-6 relative) move
# these DDPM samples by ~4e-6 and the DDIM ones (CFG 2) by ~4e-5 on the CPU; wrong noise would move them by ~1.
SAMPLE_ATOL = 3e-4


def tiny_dit() -> torch.nn.Module:
    torch.manual_seed(0)
    model = backbones.build("dit", size="S", depth=2, hidden_size=64, num_heads=4, input_size=8, in_channels=1,
                            num_classes=10)
    with torch.no_grad():  # non-zero adaLN-Zero and output layers: a model whose output depends on x, t and y
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("sampler,cfg_scale", [("ddpm", 1.0), ("ddpm", 2.0), ("ddim", 2.0)])
def test_sampling_on_cuda_equals_cpu(sampler, cfg_scale, no_tf32):
    """Same seed, same noise (drawn on CPU generators and moved): CUDA samples equal CPU samples within 3e-4."""
    labels = torch.arange(12) % 10
    kw = dict(sampler=sampler, steps=10, cfg_scale=cfg_scale, seed=3, batch_size=5)  # 3 chunks, the last partial
    model = tiny_dit()
    cpu = sample_images(model, labels, **kw)
    on_device = copy.deepcopy(model).to(device())
    seen = []
    # the samplers call model.forward (no module hooks): watch the patch embedding inside it
    on_device.x_embedder.register_forward_pre_hook(lambda module, args: seen.append(args[0].device.type))
    out = sample_images(on_device, labels, **kw)  # the device is the model's
    assert seen and set(seen) == {device().type}
    assert out.shape == cpu.shape == (12, 1, 8, 8) and out.device.type == "cpu" and torch.isfinite(out).all()
    assert (out - cpu).abs().max().item() <= SAMPLE_ATOL
    assert cpu.std() > 0.1  # not a constant (e.g. fully clipped) image: a real comparison


# --------------------------------------------------------------------------------------------------------------
# 7. Mamba kernels (DiS): selective scan and causal conv1d
# --------------------------------------------------------------------------------------------------------------
# The tolerances of tests/test_selective_scan.py for our Triton kernels (fp32 accumulation like the interpreted
# runs). mamba_ssm's kernel is external (exp2-based, chunked, atomics in its backward): 1e-4 / 1e-3. Its backward
# ignores the last state's cotangent, so none is given to it. (batch, D, N, L, groups, kind, use, softplus)
SCAN_CASES = [(2, 3, 5, 1, 0, "normal", "Dzb", True), (2, 64, 16, 256, 0, "normal", "Dzb", True),
              (1, 48, 16, 300, 2, "mixed", "Dzb", True), (2, 40, 4, 1000, 0, "tiny", "D", False),
              (1, 33, 16, 77, 0, "huge", "z", True), (1, 8, 16, 4096, 0, "normal", "Dzb", True)]
MAMBA_TOL = (1e-4, 1e-3)


def _scan_impl(impl: str):
    from backbones.kernels import selective_scan

    return lambda *a, **kw: selective_scan(*a, **kw, impl=impl)


@pytest.mark.parametrize("impl", ["triton", "cuda"])
@pytest.mark.parametrize("case", SCAN_CASES, ids=lambda c: "-".join(map(str, c)))
def test_selective_scan_on_cuda_matches_float64_reference(impl, case):
    from test_selective_scan import FWD_TOL as SCAN_FWD_TOL
    from test_selective_scan import GRAD_TOL as SCAN_GRAD_TOL
    from test_selective_scan import compare, scan_inputs

    if impl == "cuda" and importlib.util.find_spec("mamba_ssm") is None:
        pytest.skip("mamba_ssm not installed")
    batch, Dm, N, L, groups, kind, use, softplus = case
    xs = [None if x is None else x.to(device()) for x in scan_inputs(batch, Dm, N, L, groups, kind, use, softplus)]
    fwd, last, grads = compare(_scan_impl(impl), xs, softplus, last_grad=impl == "triton")
    fwd_tol, grad_tol = (SCAN_FWD_TOL, SCAN_GRAD_TOL) if impl == "triton" else MAMBA_TOL
    assert fwd <= fwd_tol, fwd
    assert max(last, *grads.values()) <= grad_tol, (last, grads)


@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_selective_scan_bf16_on_cuda(impl):
    """bf16 u, delta, B, C, z (fp32 A, D, delta_bias, as Vim passes them under autocast): y in bf16 within 8e-3."""
    from test_selective_scan import NAMES, rel_err, scan_inputs

    if impl == "cuda" and importlib.util.find_spec("mamba_ssm") is None:
        pytest.skip("mamba_ssm not installed")
    xs = scan_inputs(2, 64, 16, 256)
    xb = [x.to(device()) if name in ("A", "D", "delta_bias") else x.to(device(), torch.bfloat16)
          for name, x in zip(NAMES, xs)]
    y, last = _scan_impl(impl)(*xb, delta_softplus=True, return_last_state=True)
    y64, last64 = _scan_impl("reference")(*(x.double() for x in xb), delta_softplus=True, return_last_state=True)
    assert y.dtype == torch.bfloat16 and last.dtype == torch.float32
    assert rel_err(y.cpu(), y64.cpu()) <= BF16_TOL and rel_err(last.cpu(), last64.cpu()) <= 1e-3


def test_selective_scan_auto_dispatch_on_cuda():
    from test_selective_scan import scan_inputs

    from backbones.kernels.selective_scan import resolve_scan_impl

    xs = [x.to(device()) for x in scan_inputs(2, 16, 8, 64)]
    expected = "cuda" if importlib.util.find_spec("mamba_ssm") is not None else "triton"
    assert resolve_scan_impl("auto", xs[0]) == expected
    assert resolve_scan_impl("auto", xs[0].double()) == "triton"  # mamba_ssm has no fp64 kernel
    assert torch.equal(_scan_impl("auto")(*xs, delta_softplus=True), _scan_impl(expected)(*xs, delta_softplus=True))


@pytest.mark.parametrize("impl", ["torch", "cuda"])
@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_causal_conv1d_on_cuda_matches_float64_reference(impl, W, dtype, no_tf32):
    from backbones.kernels import causal_conv1d
    from backbones.kernels.causal_conv1d import causal_conv1d_reference

    if impl == "cuda" and importlib.util.find_spec("causal_conv1d") is None:
        pytest.skip("causal_conv1d not installed")
    g = torch.Generator().manual_seed(W)
    x, w, b = torch.randn(2, 64, 300, generator=g), torch.randn(64, W, generator=g), torch.randn(64, generator=g)
    x = x.to(dtype)
    gy = torch.randn(2, 64, 300, generator=g)
    for activation in (None, "silu"):
        xs = [leaf(x), leaf(w, dtype), leaf(b, dtype)]
        y = causal_conv1d(*xs, activation=activation, impl=impl)
        grads = torch.autograd.grad(y, xs, gy.to(device(), dtype))
        x64 = [leaf(t, torch.float64) for t in (x, w.to(dtype), b.to(dtype))]
        y64 = causal_conv1d_reference(*x64, activation)
        grads64 = torch.autograd.grad(y64, x64, gy.to(device(), dtype).double())
        tol = 1e-5 if dtype == torch.float32 else BF16_TOL
        assert y.dtype == dtype and rel_err(y, y64) <= tol
        assert max(rel_err(a, r) for a, r in zip(grads, grads64)) <= (1e-4 if dtype == torch.float32 else 2e-2)
