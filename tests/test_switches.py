"""Speed switches (train.compile, channels_last, fused_adamw, grad_checkpoint, bf16 precision; tf32 and flash_attn on
CUDA): each trains to the same numbers as the plain run within its tolerance, the inexact ones are part of the run
key and the exact one is not, and the switches the CPU cannot run are refused by name. Also the trainer step's own
pieces that replaced library calls for speed: the gradient norm and the multi-tensor EMA are bit-identical to them.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import pytest
import torch
from helpers import SMOKE_KWARGS, TINY_DIT, train_config

import backbones
from diffusion.config import ConfigError, SwitchUnavailable
from diffusion.run import RecipeMismatchError
from diffusion.trainer import build_run, train, train_step, update_ema

NAMES = [n for n in backbones.available() if not n.startswith("test_")]


def steps(run_dir, overrides=(), backbone=None, n: int = 2):
    """Build a run on digits, perturb the adaLN-Zero init (else the first losses ignore most weights), take ``n``
    steps; returns (run, metrics of each step, gradients of the last step by name)."""
    run = build_run(train_config(run_dir, list(overrides), backbone))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in run.model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
        run.ema.load_state_dict(run.model.state_dict())
    metrics = [train_step(run) for _ in range(n)]
    grads = {name: p.grad.clone() for name, p in run.model.named_parameters() if p.grad is not None}
    return run, metrics, grads


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def compare(plain, switched, loss_rtol: float, grad_rtol: float) -> None:
    """Every step's loss (from the second on they also test the updates) and the last step's gradients (max-norm
    relative per tensor). Not the weights themselves: Adam's update of a near-zero gradient is about lr x its
    sign, so ulp-level gradient differences move single weights by up to ~lr, whatever the switch."""
    (_, metrics_a, grads_a), (_, metrics_b, grads_b) = plain, switched
    for a, b in zip(metrics_a, metrics_b):
        assert math.isclose(a["loss"], b["loss"], rel_tol=loss_rtol, abs_tol=0), (a, b)
    assert grads_a.keys() == grads_b.keys()
    worst = max(rel(grads_b[k], grads_a[k]) for k in grads_a)
    assert worst <= grad_rtol, worst


@pytest.mark.parametrize("name", NAMES)
def test_grad_checkpoint_is_bit_identical_for_every_backbone(tmp_path, name):
    """Per-block recomputation with the RNG state restored (drop-path of Diffusion-RWKV included): the same losses,
    gradients and weights, bit for bit, for every registered backbone."""
    backbone = {"name": name, **SMOKE_KWARGS[name]}
    a = steps(tmp_path / f"{name}-a", backbone=backbone)
    b = steps(tmp_path / f"{name}-b", ["train.grad_checkpoint=true"], backbone=backbone)
    assert [m["loss"] for m in a[1]] == [m["loss"] for m in b[1]], name
    assert all(torch.equal(a[2][k], b[2][k]) for k in a[2]), name
    assert all(torch.equal(v, b[0].model.state_dict()[k]) for k, v in a[0].model.state_dict().items()), name


def test_grad_checkpoint_recomputes_blocks_and_keeps_the_state_dict(tmp_path, monkeypatch):
    run = build_run(train_config(tmp_path, TINY_DIT + ["train.grad_checkpoint=true"]))
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    train_step(run)
    assert len(calls) == len(run.model.blocks)  # one per block (the embedders and the final layer are not)
    assert set(run.model.state_dict()) == set(run.ema.state_dict())
    run.model.set_grad_checkpointing(False)
    calls.clear()
    train_step(run)
    assert not calls


def test_fused_adamw_matches_the_default_adamw(tmp_path):
    """One fused kernel instead of the per-tensor loop: the same update up to rounding (first losses equal: the
    optimizer has not acted yet)."""
    plain = steps(tmp_path / "a", TINY_DIT, n=3)
    fused = steps(tmp_path / "b", TINY_DIT + ["train.fused_adamw=true"], n=3)
    assert fused[0].opt.defaults["fused"] and not plain[0].opt.defaults.get("fused")
    assert plain[1][0]["loss"] == fused[1][0]["loss"]
    compare(plain, fused, loss_rtol=1e-6, grad_rtol=1e-4)


@pytest.mark.parametrize("name", ["dit", "dico", "dimr"])
def test_channels_last_matches_contiguous(tmp_path, name):
    """NHWC convolutions (DiCo built with its own channels_last off, so the switch does the converting)."""
    backbone = {"name": name, **SMOKE_KWARGS[name], **({"channels_last": False} if name == "dico" else {})}
    plain = steps(tmp_path / "a", backbone=backbone)
    nhwc = steps(tmp_path / "b", ["train.channels_last=true"], backbone=backbone)
    convs = [m for m in nhwc[0].model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    compare(plain, nhwc, loss_rtol=1e-5, grad_rtol=1e-4)


def test_bf16_autocast_trains_on_cpu(tmp_path):
    """train.precision=bf16 runs under CPU bf16 autocast: the losses within bf16 rounding of fp32 (1e-2, as the CUDA
    check of tests/test_gpu.py) and the weights stay fp32."""
    plain = steps(tmp_path / "a", TINY_DIT + ["train.precision=fp32"])
    bf16 = steps(tmp_path / "b", TINY_DIT + ["train.precision=bf16"])
    assert bf16[0].identity["train"]["precision"] == "bf16"
    assert all(p.dtype == torch.float32 for p in bf16[0].model.parameters())
    compare(plain, bf16, loss_rtol=1e-2, grad_rtol=5e-2)
    assert any(rel(bf16[2][k], plain[2][k]) > 0 for k in plain[2])  # really another precision


@pytest.mark.slow
def test_compile_matches_eager(tmp_path):
    """torch.compile (inductor, C++ on the CPU) of the backbone: the same steps within fused-kernel rounding; the
    state_dict keeps its names (checkpoints load into an eager model) and the EMA stays eager."""
    plain = steps(tmp_path / "a", TINY_DIT)
    compiled = steps(tmp_path / "b", TINY_DIT + ["train.compile=true"])
    assert compiled[0].model._compiled_call_impl is not None and compiled[0].ema._compiled_call_impl is None
    assert set(compiled[0].model.state_dict()) == set(plain[0].model.state_dict())
    compare(plain, compiled, loss_rtol=1e-5, grad_rtol=1e-4)


def test_cuda_only_switches_are_refused_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for switch in ("tf32", "flash_attn"):
        with pytest.raises(SwitchUnavailable, match=f"train.{switch}=true"):
            build_run(train_config(tmp_path / switch, TINY_DIT + [f"train.{switch}=true"]))
    with pytest.raises(ConfigError, match="half precision"):
        build_run(train_config(tmp_path / "fp32", TINY_DIT + ["device=cuda", "train.precision=fp32",
                                                             "train.flash_attn=true"]))


def test_switches_in_the_run_key(tmp_path):
    """Keyed only when on (the keys of every existing run hold); grad_checkpoint (exact) never; all recorded in
    the session history."""
    base = build_run(train_config(tmp_path / "base", TINY_DIT))
    assert not {"compile", "channels_last", "fused_adamw", "tf32", "flash_attn", "grad_checkpoint", "heap_cache"} \
        & set(base.identity["train"])
    ckpt = build_run(train_config(tmp_path / "ckpt", TINY_DIT + ["train.grad_checkpoint=true"]))
    assert ckpt.key == base.key and ckpt.session["switches"] == ["grad_checkpoint"] and base.session["switches"] == []
    keys = {base.key}
    for switch in ("channels_last", "fused_adamw"):
        run = build_run(train_config(tmp_path / switch, TINY_DIT + [f"train.{switch}=true"]))
        assert run.identity["train"][switch] is True and run.key not in keys
        keys.add(run.key)


def test_resume_with_another_switch_is_refused(tmp_path):
    train(train_config(tmp_path, TINY_DIT + ["train.steps=2"]))
    with pytest.raises(RecipeMismatchError, match="train.fused_adamw"):
        build_run(train_config(tmp_path, TINY_DIT + ["train.steps=4", f"resume={tmp_path}",
                                                     "train.fused_adamw=true"]))
    run = build_run(train_config(tmp_path, TINY_DIT + ["train.steps=4", f"resume={tmp_path}",
                                                       "train.fused_adamw=true", "allow_changes=[train.fused_adamw]"]))
    assert all(g["fused"] for g in run.opt.param_groups)  # the resumed optimizer really is the fused one
    train_step(run)
    # the exact switch needs no allowance
    build_run(train_config(tmp_path, TINY_DIT + ["train.steps=4", f"resume={tmp_path}", "train.grad_checkpoint=true"]))


def test_logged_gradient_norm_equals_clip_grad_norm(tmp_path):
    """Without clipping the step computes the norm alone (no rescaling pass): the number clip_grad_norm_ gives."""
    run, metrics, grads = steps(tmp_path, TINY_DIT, n=1)
    model = copy.deepcopy(run.model)
    for name, p in model.named_parameters():
        p.grad = grads.get(name)
    assert metrics[0]["grad_norm"] == float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))


def test_multi_tensor_ema_equals_the_per_tensor_loop():
    torch.manual_seed(0)
    model = backbones.build("dit", **SMOKE_KWARGS["dit"], input_size=8, in_channels=1, num_classes=10)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    reference = copy.deepcopy(ema)
    with torch.no_grad():  # DiT train.py's update_ema
        ref_params = OrderedDict(reference.named_parameters())
        for name, param in model.named_parameters():
            ref_params[name].mul_(0.9999).add_(param.data, alpha=1 - 0.9999)
    update_ema(ema, model, 0.9999)
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), reference.parameters()))


def grad_fn_names(out: torch.Tensor) -> set[str]:
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack += [n for n, _ in node.next_functions]
    return {type(n).__name__ for n in seen}


def test_attention_splits_qkv_with_one_unbind():
    """q, k, v by unbind (one stacked gradient in the backward) instead of three selects (three full-size zero
    fills, copies and adds): the trainer-vs-official gap of DiT-S/2 on the CPU. Same outputs and gradients."""
    from backbones.layers import Attention, attention

    torch.manual_seed(0)
    module, x, go = Attention(64, 4), torch.randn(3, 20, 64, requires_grad=True), torch.randn(3, 20, 64)
    out = module(x)
    names = grad_fn_names(out)
    assert "UnbindBackward0" in names and "SelectBackward0" not in names, names
    B, T, D = x.shape
    qkv = module.qkv(x).reshape(B, T, 3, 4, D // 4).permute(2, 0, 3, 1, 4)
    selected = module.proj(attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(B, T, D))
    assert torch.equal(out, selected)
    params = [x, *module.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(out, params, go),
                                                 torch.autograd.grad(selected, params, go)))


HEAP_CACHE_CHILD = """
import ctypes, sys
import torch
sys.path.insert(0, sys.argv[2])
from helpers import TINY_DIT, train_config
from test_switches import steps

class MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2 (size_t fields)
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def mmapped_blocks_while_holding_64_mib() -> int:
    without = libc.mallinfo2().hblks
    big = torch.empty(2**24)  # 64 MiB
    big.fill_(1.0)
    n = libc.mallinfo2().hblks - without
    del big
    return n

root = sys.argv[1]
before = mmapped_blocks_while_holding_64_mib()
plain = steps(root + "/plain", TINY_DIT)
cached = steps(root + "/cached", TINY_DIT + ["train.heap_cache=true"])
after = mmapped_blocks_while_holding_64_mib()
assert before == 1 and after == 0, (before, after)  # the 64 MiB block came from the heap, not its own mmap
assert [m["loss"] for m in plain[1]] == [m["loss"] for m in cached[1]]
assert plain[2].keys() == cached[2].keys() and all(torch.equal(plain[2][k], cached[2][k]) for k in plain[2])
assert cached[0].key == plain[0].key and cached[0].session["switches"] == ["heap_cache"]
print("heap cache ok")
"""


def test_heap_cache_stops_mmap_per_block_and_is_bit_identical(tmp_path):
    """glibc serves a 64 MiB tensor from its heap instead of a fresh mmap once train.heap_cache is on (mallinfo2's
    mmapped-block count), the steps are bit-identical and the run key is the same (exact switch, recorded in the
    history). In a child process: the policy is process-wide and would stay for the rest of this worker."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).parent
    proc = subprocess.run([sys.executable, "-c", HEAP_CACHE_CHILD, str(tmp_path), str(tests)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(tests.parent)})
    assert proc.returncode == 0 and "heap cache ok" in proc.stdout, proc.stderr[-3000:]


def test_heap_cache_is_refused_without_glibc(tmp_path, monkeypatch):
    import runio.env

    monkeypatch.setattr(runio.env, "heap_cache_available", lambda: False)
    with pytest.raises(SwitchUnavailable, match="train.heap_cache=true needs glibc"):
        build_run(train_config(tmp_path, TINY_DIT + ["train.heap_cache=true"]))
    assert not (tmp_path / "checkpoint.pt").exists()
