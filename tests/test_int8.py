"""8-bit moments (``state_dtype="int8"``): the C++ CPU kernel bit for bit against the reference,
and fastopt.AdamW's state, state dicts both ways, resume, skips, accumulation and loss scaling.

The kernel follows csrc/adamw_math.h, the reference follows it operation for operation, and
the codes round stochastically from the same counter-based noise, so every byte (params,
masters, codes, scales) must agree: no tolerance. tests/test_int8_triton.py and
tests/test_int8_cuda.py hold the same lockstep for the Triton and CUDA kernels; test_quant.py
the format's own error bounds; test_lean_accuracy.py the training accuracy.
"""

from __future__ import annotations

import copy
import io
import math
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastopt
from fastopt import _ops, quant, reference
from fastopt.quant import BLOCK, QuantizedMoment

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=1e-2, eps=1e-8)
# A block's awkward sizes, the small-tensor threshold's neighbours, a chunk boundary (64 Ki).
HOSTILE = [1, 31, 32, 33, 97, 4095, 4096, 4097, 65_536 + 33]
STORE = {torch.float32: None, torch.bfloat16: torch.int16, torch.float16: torch.float32}


def _state(sizes, gen, p_dtype, master, amsgrad):
    """Mid-training state: params, quantized random moments (heavy-tailed, some zeros), masters
    and a different step count per tensor."""
    rows = 3 if amsgrad else 2
    s = dict(params=[], masters=[], m=[], v=[], vmax=[], scales=[], steps=[])
    for i, n in enumerate(sizes):
        p = torch.randn(n, generator=gen)
        s["params"].append(p.to(p_dtype))
        if master and p_dtype == torch.bfloat16:
            s["masters"].append(torch.randint(-(2**15), 2**15, (n,), generator=gen).short())
        elif master:
            s["masters"].append(p.clone())
        m = torch.randn(n, generator=gen) * 10.0 ** torch.randint(-6, 1, (n,), generator=gen)
        m[torch.rand(n, generator=gen) < 0.1] = 0.0
        v = m.square() * 3 + 1e-12
        codes, scales = [], torch.empty((rows, -(-n // BLOCK)), dtype=torch.int8)
        moments = [(m, quant.quantize_m), (v.sqrt(), quant.quantize_v),
                   (v.sqrt() * 1.5, quant.quantize_v)]  # fmt: skip
        for row, (x, quantize) in enumerate(moments[:rows]):
            c, sc = quantize(x)
            codes.append(c)
            scales[row] = sc
        s["m"].append(codes[0])
        s["v"].append(codes[1])
        if amsgrad:
            s["vmax"].append(codes[2])
        s["scales"].append(scales)
        s["steps"].append(torch.tensor(float(3 + i % 5)))
    return s


def _step(backend, s, gen_grads, **kw):
    """One step of `backend` on `s` (in place) with the given gradients."""
    backend.adamw_step(
        s["params"], gen_grads, s["m"], s["v"], s["vmax"], s["steps"], masters=s["masters"],
        scales=s["scales"], positions=list(range(len(s["params"]))), **kw,
    )  # fmt: skip


def _lockstep(sizes, *, p_dtype=torch.float32, fp32_grads=False, master=False, sr=False,
              amsgrad=False, maximize=False, clip=False, scaled=False, steps=3, seed=0,
              first_indices=None):  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    ours = _state(sizes, gen, p_dtype, master, amsgrad)
    ref = copy.deepcopy(ours)
    g_dtype = torch.float32 if fp32_grads else p_dtype
    for k in range(steps):
        grads = [(torch.randn(n, generator=gen) * 10.0 ** (k % 3 - 1)).to(g_dtype) for n in sizes]
        extra = {}
        if scaled:
            extra["grad_scale"] = torch.tensor(1024.0)
            extra["found_inf"] = torch.tensor(0.0)
        if clip:
            extra["grad_norm"] = torch.tensor(5.0)
            extra["max_grad_norm"] = 1.0
        for s in (ours, ref):
            for t in s["steps"]:
                t += 1
        kw = dict(HYPER, amsgrad=amsgrad, maximize=maximize, stochastic_rounding=sr,
                  seed=987654321 + seed, first_indices=first_indices or [], **extra)  # fmt: skip
        _step(_ops, ours, grads, **kw)
        _step(reference, ref, grads, **kw)
        for key in ("params", "masters", "m", "v", "vmax", "scales"):
            for i, (a, b) in enumerate(zip(ours[key], ref[key])):
                assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (key, i, k, sizes)


CONFIGS = [
    dict(p_dtype=p, fp32_grads=g, master=mw, sr=sr, amsgrad=ams)
    for p in (torch.float32, torch.bfloat16, torch.float16)
    for g in (False, True)
    for mw in ((False,) if p == torch.float32 else (False, True))
    for sr in ((False, True) if p == torch.bfloat16 and not mw else (False,))
    for ams in (False, True)
]


def _cfg_id(c):
    dtype = str(c["p_dtype"]).removeprefix("torch.")
    flags = [k for k in ("fp32_grads", "master", "sr", "amsgrad") if c[k]]
    return "-".join([dtype, *flags])


@pytest.mark.parametrize("cfg", CONFIGS, ids=[_cfg_id(c) for c in CONFIGS])
def test_cpu_kernel_matches_the_reference_bit_for_bit(cfg):
    """Every variant the dispatch builds for 8-bit moments, over the hostile sizes, many
    tensors in one call."""
    _lockstep(HOSTILE + [5] * 40, **cfg)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_maximize_clipping_and_loss_scale_match_the_reference(amsgrad):
    _lockstep([33, 4097], maximize=True, clip=True, scaled=True, amsgrad=amsgrad)


def test_first_indices_across_two_to_the_32_match_the_reference():
    """A shard whose elements straddle index 2**32 of its whole param: the CPU kernel splits the
    chunk there; the noise, and so the codes, follow the element's index in the whole param."""
    first = 2**32 - 50
    _lockstep([200, 64], sr=True, p_dtype=torch.bfloat16, first_indices=[first, 2**33 + 7])


# About 40 examples of at most ~10k elements: 15-25 s on 2 cores.
@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 9000), min_size=1, max_size=6),
    cfg=st.sampled_from(CONFIGS),
    maximize=st.booleans(),
    clip=st.booleans(),
    scaled=st.booleans(),
    beta1=st.sampled_from([0.0, 0.3, 0.5, 0.9]),
    seed=st.integers(0, 2**16),
)
def test_random_configurations_match_the_reference(sizes, cfg, maximize, clip, scaled, beta1,
                                                   seed):  # fmt: skip
    global HYPER
    saved = HYPER
    HYPER = dict(saved, beta1=beta1)
    try:
        _lockstep(sizes, maximize=maximize, clip=clip, scaled=scaled, seed=seed, steps=2, **cfg)
    finally:
        HYPER = saved


# ---- fastopt.AdamW with state_dtype="int8" ----------------------------------------------


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(96, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    ).to(dtype)


def _train(model, opt, steps, seed=1, scaler=None, acc=None):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 96, generator=gen).to(next(model.parameters()).dtype)
        micro = 2 if acc is not None else 1
        for half in x.chunk(micro):
            loss = model(half).float().square().mean()
            (scaler.scale(loss) if scaler else loss).backward()
            if acc is not None:
                acc.accumulate()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad()


def test_state_layout_threshold_and_nbytes():
    """Params of min_8bit_size elements or more hold uint8 codes of their shape and (2, blocks)
    int8 scales; smaller ones fp32 moments. state_nbytes counts codes and scales."""
    params = [torch.nn.Parameter(torch.randn(n)) for n in (99, 100, 101)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = fastopt.AdamW(params, state_dtype="int8", min_8bit_size=100, amsgrad=True)
    opt.step()
    small, at, above = (opt.state[p] for p in params)
    assert small["exp_avg"].dtype == torch.float32 and "scales" not in small
    for entry, n in ((at, 100), (above, 101)):
        assert entry["exp_avg"].dtype == entry["exp_avg_sq"].dtype == torch.uint8
        assert entry["max_exp_avg_sq"].shape == (n,)
        assert entry["scales"].shape == (3, -(-n // BLOCK)) and entry["scales"].dtype == torch.int8
    expected = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    assert opt.state_nbytes() == expected
    assert opt.state_nbytes() == 99 * 4 * 3 + 4 * 3 + (100 + 101) * 3 + 3 * (4 + 4)


@pytest.mark.parametrize(
    "kwargs",
    [dict(state_dtype="int4"), dict(state_dtype=torch.int8), dict(min_8bit_size=-1),
     dict(min_8bit_size=True), dict(min_8bit_size=2.5)],
    ids=["int4", "torch-int8", "negative", "bool", "float"],
)  # fmt: skip
def test_bad_settings_raise_one_line_errors(kwargs):
    with pytest.raises(ValueError) as info:
        fastopt.AdamW([torch.nn.Parameter(torch.zeros(3))], **kwargs)
    assert "\n" not in str(info.value)
    assert next(iter(kwargs)) in str(info.value)


def test_complex_params_are_refused_in_one_line():
    p = torch.nn.Parameter(torch.zeros(8000, dtype=torch.complex64))
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="float32, bfloat16 and float16 params"):
        fastopt.AdamW([p], state_dtype="int8").step()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_training_reduces_the_loss_and_backends_agree(backend):
    models = {b: _model() for b in ("reference", backend)}
    for b, model in models.items():
        opt = fastopt.AdamW(model.parameters(), lr=1e-2, state_dtype="int8", backend=b,
                            min_8bit_size=0, seed=3)  # fmt: skip
        _train(model, opt, 8)
    for a, b in zip(models["reference"].parameters(), models[backend].parameters()):
        assert torch.equal(a, b)


def _saved(opt) -> dict:
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_dict_loads_into_torch_adamw_as_dequantized_moments():
    """torch.optim.AdamW takes the moments as fp32 tensors of the param's shape, equal to the
    dequantized codes, and its own steps then update them (they are plain tensors)."""
    model = _model()
    opt = fastopt.AdamW(model.parameters(), lr=1e-2, state_dtype="int8", min_8bit_size=0)
    _train(model, opt, 3)
    packed = opt.state_dict()
    assert all("scales" not in entry for entry in packed["state"].values())
    twin = _model()
    twin.load_state_dict(model.state_dict())
    torch_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    torch_opt.load_state_dict(_saved(opt))
    for p, q in zip(model.parameters(), twin.parameters()):
        entry = torch_opt.state[q]
        for key, kind in (("exp_avg", quant.dequantize_m), ("exp_avg_sq", quant.dequantize_v)):
            row = 0 if key == "exp_avg" else 1
            assert type(entry[key]) is torch.Tensor and entry[key].shape == p.shape
            assert torch.equal(entry[key], kind(opt.state[p][key], opt.state[p]["scales"][row]))
    before = torch_opt.state[next(twin.parameters())]["exp_avg"].clone()
    _train(twin, torch_opt, 1)
    assert not torch.equal(torch_opt.state[next(twin.parameters())]["exp_avg"], before)


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True)])
def test_resume_from_a_saved_state_dict_is_bit_exact(dtype, master):
    """Codes and scales come back exactly (through torch.save and weights_only loading), so a
    resumed run equals the uninterrupted one bit for bit."""
    kw = dict(lr=1e-2, state_dtype="int8", min_8bit_size=0, master_weights=master, seed=11)
    model = _model(dtype=dtype)
    opt = fastopt.AdamW(model.parameters(), **kw)
    _train(model, opt, 3)
    saved, weights = _saved(opt), copy.deepcopy(model.state_dict())
    _train(model, opt, 3, seed=2)
    resumed = _model(dtype=dtype)
    resumed.load_state_dict(weights)
    opt2 = fastopt.AdamW(resumed.parameters(), **kw)
    opt2.load_state_dict(saved)
    _train(resumed, opt2, 3, seed=2)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), resumed.parameters()):
        for key, value in opt.state[p].items():
            assert torch.equal(value, opt2.state[q][key]), key


def test_torch_state_dict_loads_into_int8_quantized_on_load():
    model = _model()
    torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=True)
    _train(model, torch_opt, 3)
    opt = fastopt.AdamW(model.parameters(), lr=1e-2, amsgrad=True, state_dtype="int8",
                        min_8bit_size=0)  # fmt: skip
    opt.load_state_dict(torch_opt.state_dict())
    for p in model.parameters():
        ours, theirs = opt.state[p], torch_opt.state[p]
        assert ours["exp_avg"].dtype == torch.uint8
        codes, scales = quant.quantize_m(theirs["exp_avg"])
        assert torch.equal(ours["exp_avg"], codes) and torch.equal(ours["scales"][0], scales)
        codes, scales = quant.quantize_v(theirs["max_exp_avg_sq"].sqrt())
        assert torch.equal(ours["max_exp_avg_sq"], codes)
        assert torch.equal(ours["scales"][2], scales)
    _train(model, opt, 2)  # and it steps on


def test_a_saved_int8_optimizer_is_about_a_quarter_of_fp32():
    params = [torch.nn.Parameter(torch.randn(256, 256)) for _ in range(4)]
    sizes = {}
    for name, kw in (("fp32", {}), ("int8", dict(state_dtype="int8"))):
        opt = fastopt.AdamW(params, **kw)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        sizes[name] = len(buf.getvalue())
    # codes 2 bytes and scales 2/32 per param against 8 bytes of fp32 moments
    assert sizes["int8"] / sizes["fp32"] == pytest.approx((2 + 2 / 32) / 8, rel=0.02)


def test_a_skipped_step_leaves_codes_and_scales_unchanged():
    model = _model()
    opt = fastopt.AdamW(model.parameters(), state_dtype="int8", min_8bit_size=0,
                        max_grad_norm=1.0)  # fmt: skip
    _train(model, opt, 2)
    before = {p: {k: v.clone() for k, v in entry.items()} for p, entry in opt.state.items()}
    weights = copy.deepcopy(model.state_dict())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    next(model.parameters()).grad.view(-1)[-1] = math.inf
    opt.step()
    assert opt.last_found_inf.item() != 0
    for p, entry in opt.state.items():
        for key, value in entry.items():
            assert torch.equal(value, before[p][key]), key
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key])


def test_accumulation_and_loss_scaling_match_the_reference_backend():
    """GradAccumulator's fp32 sums and LossScaler's unscale and skip reach the kernel as they do
    for 16-bit states: the CPU kernel equals the reference backend bit for bit."""
    finals = []
    for backend in ("reference", "cpu"):
        model = _model(dtype=torch.bfloat16)
        opt = fastopt.AdamW(model.parameters(), lr=1e-2, state_dtype="int8", backend=backend,
                            master_weights=True, min_8bit_size=0, seed=5,
                            max_grad_norm=1.0)  # fmt: skip
        acc = fastopt.GradAccumulator(opt, backend=backend)
        scaler = fastopt.LossScaler(init_scale=2.0**20, growth_interval=2, backend=backend)
        _train(model, opt, 5, scaler=scaler, acc=acc)
        finals.append([p.detach().clone() for p in model.parameters()])
        finals.append([t.clone() for s in opt.state.values() for t in s.values()])
    assert all(torch.equal(a, b) for a, b in zip(finals[0], finals[2]))
    assert all(torch.equal(a, b) for a, b in zip(finals[1], finals[3]))


def test_quantized_moment_behaves_as_its_fp32_values():
    gen = torch.Generator().manual_seed(zlib.crc32(b"qm"))
    x = torch.randn(70, generator=gen)
    q = QuantizedMoment(*quant.quantize_m(x), "m")
    plain = q.dequantize()
    assert q.shape == x.shape and q.dtype == torch.float32
    assert type(q + 1) is torch.Tensor and torch.equal(q + 1, plain + 1)
    assert type(q.to(torch.float32)) is torch.Tensor  # a no-op .to still dequantizes
    assert torch.equal(copy.deepcopy(q).codes, q.codes)
    with pytest.raises(ValueError, match="scales"):
        QuantizedMoment(q.codes, q.scales[:1], "m")
