"""The lockstep harness: a backend stepped beside fastopt.reference on the same data, every
param and state tensor compared bit for bit after every step.

The kernels follow csrc/adamw_math.h, the reference follows it operation for operation, and
every stochastic rounding (bf16 stores, 8-bit codes) draws the same counter-based noise, so
params, masters, moments, codes and block scales must agree to the bit: no tolerance.

Two levels over (backend, device, state format), one comparator (`assert_same_state`):
* the op (`op_lockstep`): a state of lists as the ops take them, stepped through
  `adamw_step`, the one place in the tests that calls a backend's ``adamw_step``;
* the optimizer (`optimizer_lockstep`): fastopt.AdamW on the reference backend (CPU tensors)
  beside the same optimizer on another backend and device, on the same gradients.

State formats: ``"int8"`` (uint8 codes and int8 block scales, fastopt.quant) or a float dtype
(fp32 or bf16 moments); fastopt.AdamW's ``state_dtype`` at the optimizer level. Tolerances
where a test compares against torch.optim.AdamW instead live beside that test
(tests/test_lean_adamw.py, tests/properties.py).
"""

from __future__ import annotations

import dataclasses

import torch

import fastopt
from fastopt import quant, reference
from fastopt.backends import backend_ops
from fastopt.rounding import split_master
from fastopt.step_args import Hyper, Lean

__all__ = [
    "CUDA_SIZES",
    "INT8_VARIANTS",
    "STATE_KEYS",
    "adamw_step",
    "assert_same_state",
    "bits_differ",
    "fresh_state",
    "int8_optimizer_lockstep",
    "make_state",
    "op_lockstep",
    "op_snapshot",
    "optimizer_lockstep",
    "optimizer_snapshot",
    "to_device",
]

# The tensors a step writes, in the ops' argument names (the op advances the step counts).
STATE_KEYS = (
    "params", "masters", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "scales", "state_steps"
)  # fmt: skip
# adamw_step's memory-lean settings (fastopt.step_args.Lean's fields); masters and scales
# default to the state's own lists.
_LEAN = tuple(field.name for field in dataclasses.fields(Lean))


def adamw_step(backend: str, state: dict, grads: list, **settings) -> None:
    """One ``adamw_step`` of ``backend`` ('reference', 'cpu', 'cuda', 'triton') on ``state``
    (make_state's lists), in place: the only call of a backend's adamw_step in the tests."""
    lean = {"masters": state["masters"], "scales": state["scales"]}
    lean.update({k: settings.pop(k) for k in _LEAN if k in settings})
    backend_ops(backend).adamw_step(
        state["params"], grads, state["exp_avgs"], state["exp_avg_sqs"],
        state["max_exp_avg_sqs"], state["state_steps"], Hyper(**settings), Lean(**lean),
    )  # fmt: skip


_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _int8_variants() -> dict:
    """Every variant the CPU dispatch builds for 8-bit moments: params, fp32 grads, master,
    stochastic rounding (bf16 stores only), amsgrad."""
    out = {}
    for p in (torch.float32, torch.bfloat16, torch.float16):
        for g in (False, True):
            for mw in (False,) if p == torch.float32 else (False, True):
                for sr in (False, True) if p == torch.bfloat16 and not mw else (False,):
                    for ams in (False, True):
                        flags = [k for k, on in (("fp32_grads", g), ("master", mw), ("sr", sr),
                                                 ("amsgrad", ams)) if on]  # fmt: skip
                        cfg = dict(p_dtype=p, grad_dtype=torch.float32 if g else None,
                                   master=mw, sr=sr, amsgrad=ams)  # fmt: skip
                        out["-".join([_NAMES[p], *flags])] = cfg
    return out


INT8_VARIANTS = _int8_variants()


def _empty_state() -> dict:
    return {k: [] for k in STATE_KEYS}


def make_state(shapes, gen, *, p_dtype=torch.float32, master=False, amsgrad=False) -> dict:
    """Mid-training 8-bit state on the CPU: random moments quantized (to nearest), a different
    step count per tensor (the first step among them), and the masters of bf16 (int16
    remainder) or fp16 (fp32) params."""
    state = _empty_state()
    for i, shape in enumerate(shapes):
        # Magnitudes spread over decades within a block, and a tenth of exp_avg zero: the
        # scales, the subnormal codes and the zero code all get exercised.
        spread = 10.0 ** torch.randint(-6, 2, shape, generator=gen)
        p32 = torch.randn(shape, generator=gen)
        m = torch.randn(shape, generator=gen) * 0.1 * spread
        m[torch.rand(shape, generator=gen) < 0.1] = 0.0
        v = (torch.randn(shape, generator=gen) * 0.1 * spread) ** 2
        codes = [quant.quantize_m(m), quant.quantize_v(v.sqrt())]
        if amsgrad:
            codes.append(quant.quantize_v((v * 1.5).sqrt()))
        if master and p_dtype == torch.bfloat16:
            param, remainder = split_master(p32)
            state["params"].append(param)
            state["masters"].append(remainder)
        else:
            state["params"].append(p32.to(p_dtype))
            if master:
                state["masters"].append(p32)
        state["exp_avgs"].append(codes[0][0])
        state["exp_avg_sqs"].append(codes[1][0])
        if amsgrad:
            state["max_exp_avg_sqs"].append(codes[2][0])
        state["scales"].append(torch.stack([s for _, s in codes]).contiguous())
        state["state_steps"].append(torch.tensor(float(i % 7)))
    return state


def fresh_state(params, fmt, *, amsgrad=False) -> dict:
    """A first step's state for ``params`` (used as given): zero moments in ``fmt`` ("int8", or
    a float dtype) and zero step counts on the params' devices."""
    state = _empty_state()
    for p in params:
        rows = 3 if amsgrad else 2
        dtype = torch.uint8 if fmt == "int8" else fmt
        state["params"].append(p)
        for key in ("exp_avgs", "exp_avg_sqs") + (("max_exp_avg_sqs",) if amsgrad else ()):
            state[key].append(torch.zeros(p.shape, dtype=dtype, device=p.device))
        if fmt == "int8":
            state["scales"].append(torch.zeros(rows, -(-p.numel() // quant.BLOCK),
                                               dtype=torch.int8, device=p.device))  # fmt: skip
        state["state_steps"].append(torch.zeros((), device=p.device))
    return state


def to_device(state: dict, device) -> dict:
    return {k: [t.to(device, copy=True) for t in v] for k, v in state.items()}


# ---------------------------------------------------------------------- the comparator


def op_snapshot(state: dict) -> list:
    """(name, tensor) for every tensor a step writes in an op-level state."""
    return [(f"{key}[{i}]", t) for key in STATE_KEYS for i, t in enumerate(state[key])]


def optimizer_snapshot(opt, params) -> list:
    """(name, tensor) for every param and every state tensor of it (codes, scales, moments,
    masters, step), in a fixed order."""
    out = [(f"param[{i}]", p) for i, p in enumerate(params)]
    for i, p in enumerate(params):
        for key in sorted(opt.state[p]):
            if isinstance(opt.state[p][key], torch.Tensor):
                out.append((f"state[{i}][{key}]", opt.state[p][key]))
    return out


def _bytes(t: torch.Tensor) -> torch.Tensor:
    # A copy in contiguous memory: an empty or 1-element view may keep a stride other than 1.
    flat = t.detach().cpu().reshape(-1).clone(memory_format=torch.contiguous_format)
    return flat.view(torch.uint8)


def bits_differ(got: list, want: list) -> str | None:
    """Why two snapshots are not the same bits (names, dtypes, shapes, bytes), or None."""
    if [n for n, _ in got] != [n for n, _ in want]:
        return f"different tensors: {[n for n, _ in got]} != {[n for n, _ in want]}"
    for (name, a), (_, b) in zip(got, want):
        if (a.dtype, a.shape) != (b.dtype, b.shape):
            return f"{name}: {a.dtype} {tuple(a.shape)} != {b.dtype} {tuple(b.shape)}"
        differ = (_bytes(a) != _bytes(b)).nonzero().flatten()
        if differ.numel():
            return (f"{name} ({a.dtype}, {tuple(a.shape)}) differs in {differ.numel()} bytes, "
                    f"first at {differ[:5].tolist()}")  # fmt: skip
    return None


def assert_same_state(got: list, want: list, where: str = "", *, rtol=None, atol=None) -> None:
    """The state comparator: two snapshots hold the same tensors (names, dtypes, shapes), bit
    for bit; or, where a test compares against torch.optim.AdamW, within ``rtol``/``atol``
    (step counts exactly)."""
    if rtol is None and atol is None:
        why = bits_differ(got, want)
        assert why is None, f"{where}: {why}"
        return
    assert [n for n, _ in got] == [n for n, _ in want], f"{where}: different tensors"
    for (name, a), (_, b) in zip(got, want):
        if name.endswith("[step]"):
            assert float(a) == float(b), f"{where}: {name} differs"
        else:
            message = lambda m, name=name: f"{where}: {name}: {m}"  # noqa: E731
            torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), rtol=rtol, atol=atol,
                                       msg=message)  # fmt: skip


# ---------------------------------------------------------------------- op level


def op_lockstep(backend, device, shapes, gen, *, steps=3, p_dtype=torch.float32, grad_dtype=None,
                master=False, sr=False, amsgrad=False, maximize=False, lr=1e-2, beta1=0.9,
                beta2=0.999, eps=1e-8, weight_decay=0.0, grad_scale=None, grad_factor=1.0,
                max_grad_norm=None, tensor_lr=False, skip_every=None, found_inf=False, seed=11,
                first_indices=(), grad_magnitude=1.0, decades=False):  # fmt: skip
    """``steps`` steps of ``backend`` (on ``device``) and the reference (on the CPU) on the same
    fresh gradients from an 8-bit state (make_state), every byte compared after each. Gradients
    are randn * grad_magnitude * grad_scale, times 0.1, 1, 10 in turn with ``decades`` (so
    block scales move). skip_every: every so many steps found_inf is 1 and the step must leave
    every byte alone (found_inf: a found_inf of 0 on every step). Returns both states."""
    ref = make_state(shapes, gen, p_dtype=p_dtype, master=master, amsgrad=amsgrad)
    mine = to_device(ref, device)
    grad_dtype = grad_dtype or p_dtype
    for k in range(steps):
        scale = 1.0 if grad_scale is None else grad_scale
        size = grad_magnitude * scale * (10.0 ** (k % 3 - 1) if decades else 1.0)
        grads = [(torch.randn(s, generator=gen) * size).to(grad_dtype) for s in shapes]
        kw = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                  amsgrad=amsgrad, maximize=maximize, grad_factor=grad_factor,
                  stochastic_rounding=sr, seed=seed, positions=list(range(3, 3 + len(shapes))),
                  first_indices=list(first_indices))  # fmt: skip
        if tensor_lr:
            kw["lr"] = torch.tensor(lr * (1 - k / (2 * steps)))
        if grad_scale is not None:
            kw["grad_scale"] = torch.tensor(grad_scale)
        if max_grad_norm is not None:
            kw["grad_norm"] = reference.multi_tensor_norm(grads, 2.0)[0]
            kw["max_grad_norm"] = max_grad_norm
        skip = skip_every is not None and k % skip_every == skip_every - 1
        if skip_every is not None or found_inf:
            kw["found_inf"] = torch.tensor(float(skip))
        before = op_snapshot(to_device(mine, "cpu")) if skip else None
        on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        adamw_step(backend, mine, [g.to(device) for g in grads], **on_device)
        adamw_step("reference", ref, grads, **kw)
        if skip:  # the skipped step left every byte alone, codes and scales included
            assert_same_state(op_snapshot(mine), before, f"skipped step {k}")
        assert_same_state(op_snapshot(mine), op_snapshot(ref), f"{backend} step {k}")
    return mine, ref


# ---------------------------------------------------------------------- optimizer level


def optimizer_lockstep(backend, device, init, grads_at, *, steps, dtype, fp32_grads=False,
                       offset=0, bad_step=None, **settings):  # fmt: skip
    """fastopt.AdamW(**settings) on the reference backend (CPU) and on ``backend`` (on
    ``device``), each param ``init[i]`` in ``dtype``, stepped side by side on the CPU gradients
    ``grads_at(step)`` (through a GradAccumulator with ``fp32_grads``), every bit compared
    after each step. offset: elements the params start into a larger buffer (a kernel's
    unaligned path). bad_step: an inf in the last element of the last gradient then; the step
    must move no bit of the run under test. Returns the two (params, optimizer) pairs."""
    runs = []
    for name, where in (("reference", "cpu"), (backend, device)):
        ps = []
        for x in init:
            buf = torch.zeros(x.numel() + offset, device=where, dtype=dtype)
            buf[offset:] = x.reshape(-1).to(dtype)
            ps.append(torch.nn.Parameter(buf[offset:].view(x.shape)))
        opt = fastopt.AdamW(ps, backend=name, **settings)
        acc = fastopt.GradAccumulator(opt, backend=name) if fp32_grads else None
        runs.append((ps, opt, acc, where))
    for step in range(steps):
        grads = grads_at(step)
        if step == bad_step:
            grads[-1].view(-1)[-1] = float("inf")
        before = optimizer_snapshot(runs[1][1], runs[1][0]) if step == bad_step else None
        before = [(n, t.detach().cpu().clone()) for n, t in before] if before else None
        for ps, opt, acc, where in runs:
            for p, g in zip(ps, grads):
                p.grad = g.to(device=where, dtype=dtype)
            if acc is not None:
                acc.accumulate()
            opt.step()
        under_test = optimizer_snapshot(runs[1][1], runs[1][0])
        assert_same_state(under_test, optimizer_snapshot(runs[0][1], runs[0][0]), f"step {step}")
        if before is not None:  # a skipped step: not a bit moved, step counts restored
            assert_same_state(under_test, before, f"skipped step {step}")
    return [(ps, opt) for ps, opt, _, _ in runs]


# The CUDA kernel's hostile sizes: one block, a block +-1, a vector (16) and a lane pair (32)
# +-1, primes, a tile (4096) +-1, a chunk (65536) +-1, and a chunk plus a partial block.
CUDA_SIZES = [1, 15, 16, 17, 31, 32, 33, 47, 97, 1021, 4095, 4096, 4097, 65535, 65536, 65537,
              2 * 65536 + 33]  # fmt: skip


def int8_optimizer_lockstep(backend, device, sizes, dtype, master, sr, fp32_grads, amsgrad,
                            maximize, steps=4, clip=None, bad_step=None, offset=0):  # fmt: skip
    """optimizer_lockstep of fastopt.AdamW with 8-bit moments (every param, min_8bit_size=0)
    on ``sizes``, gradients changing by decades so that block scales move."""
    gen = torch.Generator().manual_seed(len(sizes) + sum(sizes))
    init = [torch.randn(n, generator=gen) for n in sizes]
    grad_gen = torch.Generator().manual_seed(99)

    def grads_at(step):
        return [torch.randn(n, generator=grad_gen) * 10.0 ** (step % 3 - 1) for n in sizes]

    optimizer_lockstep(backend, device, init, grads_at, steps=steps, dtype=dtype,
                       fp32_grads=fp32_grads, offset=offset, bad_step=bad_step, lr=3e-2,
                       betas=(0.8, 0.95), weight_decay=0.05, amsgrad=amsgrad, maximize=maximize,
                       master_weights=master, state_dtype="int8", min_8bit_size=0,
                       stochastic_rounding=sr, seed=1234, max_grad_norm=clip)  # fmt: skip
