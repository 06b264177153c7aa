"""The Triton kernels (fastopt.kernels) in lockstep with the oracle, fastopt.reference.

On a machine with a CUDA GPU they run compiled on CUDA tensors; without one, under Triton's
interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1 before Triton loads).
The interpreter runs each program in Python, so sizes are small except where a size is the
point (a chunk boundary), and those cases take few steps.

Tolerances, fp32: the kernels follow csrc/adamw_math.h, which differs from the reference's
torch ops in rounding only: a multiply by 1/sqrt(bc2) instead of a divide, (1-b2)*(g*g) instead
of ((1-b2)*g)*g, an IEEE divide instead of torch's reciprocal-times-x in the clip factor. Each
costs at most one or two roundings (unit roundoff u = 2^-24) in an update, so after k steps the
states differ by at most ~8 k u relative to the tensor's magnitude (the update and the moments
feed back linearly, damped by beta). bf16/fp16: at most twice the reference's own error
against a float64 AdamW.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from fastopt import kernels as tk
from fastopt import reference
from fastopt.step_args import Hyper

_table = tk._table
adamw_kernel = tk.adamw.adamw_kernel

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = DEVICE.type == "cpu"
U = 2.0**-24  # fp32 unit roundoff
STEPS = 20
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8)

ADAMW = _table.launch_heuristics("adamw", 4)
NORM = _table.launch_heuristics("norm", 4)

# Small shapes of every awkward kind: 0-dim, empty, tiny, 2-d, prime, block +- 1.
SMALL = [(), (0,), (1,), (3, 5), (257,), (ADAMW.block - 1,), (ADAMW.block + 1,)]
SMALL_IDS = "0dim-empty-1-3x5-prime257-block-1-block+1"


@pytest.fixture
def gen(request) -> torch.Generator:
    """Fresh random data per test, reproducible from the test's id."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def rand(shape, gen, *, scale=1.0, dtype=torch.float32, positive=False) -> torch.Tensor:
    x = torch.randn(shape, generator=gen) * scale
    if positive:
        x = x.abs() + scale * 0.1  # never zero: zeros hide unwritten outputs
    return x.to(device=DEVICE, dtype=dtype)


def make_state(shapes, gen, *, dtype=torch.float32, amsgrad=False) -> dict:
    """Mid-training AdamW state: random moments, a different step count per tensor."""
    v = [rand(s, gen, scale=1e-2, dtype=dtype, positive=True) for s in shapes]
    return {
        "params": [rand(s, gen, dtype=dtype) for s in shapes],
        "exp_avgs": [rand(s, gen, scale=0.1, dtype=dtype) for s in shapes],
        "exp_avg_sqs": v,
        "max_exp_avg_sqs": [(x.float() * 1.5).to(dtype) for x in v] if amsgrad else [],
        "state_steps": [
            torch.tensor(float(i % 5), device=DEVICE, dtype=torch.float32)
            for i in range(len(shapes))
        ],
    }


def clone_state(state: dict, dtype=None) -> dict:
    # Step counts too: each backend advances its own.
    return {k: [t.clone() if dtype is None else t.to(dtype) for t in v] for k, v in state.items()}


def assert_states_close(mine: dict, ref: dict, rtol: float, what: str) -> None:
    for key in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        # Rounding errors scale with the magnitudes combined (m's are (1 - beta1) * g and
        # beta1 * m), those of the whole list: one element's value may be a cancellation's
        # residue, far smaller than the terms that made it.
        scale = max((b.abs().max().item() for b in ref[key] if b.numel()), default=0.0)
        for i, (a, b) in enumerate(zip(mine[key], ref[key])):
            msg = f"{what}: {key}[{i}]"
            torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale, msg=msg)


def step_once(state, grads, *, impl, **kw):
    impl.adamw_step(
        state["params"], grads, state["exp_avgs"], state["exp_avg_sqs"],
        state["max_exp_avg_sqs"], state["state_steps"], Hyper(**kw),
    )  # fmt: skip


# ------------------------------------------------------------------------------------ AdamW

ADAMW_CONFIGS = {
    "plain": dict(),
    "decay-amsgrad": dict(weight_decay=0.1, amsgrad=True),
    "maximize-tensor-lr": dict(maximize=True, tensor_lr=True, weight_decay=0.05),
    "scale-factor-clipped": dict(grad_scale=1024.0, grad_factor=0.25, max_grad_norm=0.5),
    "scale-not-clipped": dict(grad_scale=1024.0, max_grad_norm=1e6, amsgrad=True),
    "found-inf-skips": dict(grad_scale=64.0, skip_every=4, amsgrad=True, weight_decay=0.1),
}


def run_lockstep(state, ref, shapes, gen, steps, cfg, check):
    """``steps`` AdamW steps of both implementations on the same fresh gradients."""
    amsgrad = cfg.get("amsgrad", False)
    scale = cfg.get("grad_scale")
    for k in range(steps):
        grads = [rand(s, gen, scale=scale or 1.0) for s in shapes]
        kw = dict(HYPER, amsgrad=amsgrad, maximize=cfg.get("maximize", False))
        kw["weight_decay"] = cfg.get("weight_decay", 0.0)
        kw["grad_factor"] = cfg.get("grad_factor", 1.0)
        if cfg.get("tensor_lr"):
            kw["lr"] = torch.tensor(HYPER["lr"] * (1 - k / (2 * steps)), device=DEVICE)
        if scale is not None:
            kw["grad_scale"] = torch.tensor(scale, device=DEVICE)
        if "max_grad_norm" in cfg:
            kw["grad_norm"] = reference.multi_tensor_norm(grads, 2.0)[0]
            kw["max_grad_norm"] = cfg["max_grad_norm"]
        skip = bool(cfg.get("skip_every")) and k % cfg["skip_every"] == cfg["skip_every"] - 1
        if "skip_every" in cfg:
            kw["found_inf"] = torch.tensor(float(skip), device=DEVICE)
        before = clone_state(state) if skip else None
        step_once(state, grads, impl=tk, **kw)
        step_once(ref, grads, impl=reference, **kw)
        if skip:
            for key in before:
                for a, b in zip(state[key], before[key]):
                    assert torch.equal(a, b), f"step {k} was skipped but {key} changed"
        check(k, kw)


@pytest.mark.parametrize("cfg", ADAMW_CONFIGS.values(), ids=ADAMW_CONFIGS.keys())
def test_adamw_fp32_lockstep_with_reference(cfg, gen):
    shapes = SMALL
    state = make_state(shapes, gen, amsgrad=cfg.get("amsgrad", False))
    ref = clone_state(state)
    unscaled = []

    def check(k, kw):
        assert_states_close(state, ref, 8 * (k + 1) * U, f"step {k}")
        if "grad_norm" in kw:
            coef = kw["grad_factor"] / kw["grad_scale"].item()
            unscaled.append(kw["grad_norm"].item() * coef)

    run_lockstep(state, ref, shapes, gen, STEPS, cfg, check)
    if "max_grad_norm" in cfg:  # the case really is above / below the clipping threshold
        clipped = [n > cfg["max_grad_norm"] for n in unscaled]
        assert all(clipped) if cfg["max_grad_norm"] < 1 else not any(clipped)


@pytest.mark.parametrize(
    "shapes",
    [
        [(ADAMW.chunk - 1,), (ADAMW.chunk,), (ADAMW.chunk + 1,)],
        [(1,)] * 40 + [(0,), ()] * 3 + [(2 * ADAMW.block + 3,)] + [(2,)] * 5,
    ],
    ids=["chunk-1-chunk-chunk+1", "many-tiny-beside-a-larger"],
)
def test_adamw_hostile_sizes(shapes, gen):
    cfg = ADAMW_CONFIGS["decay-amsgrad"]
    state = make_state(shapes, gen, amsgrad=True)
    ref = clone_state(state)

    def check(k, kw):
        assert_states_close(state, ref, 8 * (k + 1) * U, f"step {k}")

    run_lockstep(state, ref, shapes, gen, 2, cfg, check)


def adamw_float64(state, grads, *, lr, beta1, beta2, weight_decay, eps, amsgrad, coef) -> None:
    """AdamW in float64 throughout: the yardstick for the low-precision backends."""
    for i, p in enumerate(state["params"]):
        g = grads[i].double() * coef
        m, v = state["exp_avgs"][i], state["exp_avg_sqs"][i]
        step = state["state_steps"][i].add_(1).item()  # as the ops count
        p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        second = v
        if amsgrad:
            torch.maximum(state["max_exp_avg_sqs"][i], v, out=state["max_exp_avg_sqs"][i])
            second = state["max_exp_avg_sqs"][i]
        denom = second.sqrt() / math.sqrt(1 - beta2**step) + eps
        p.addcdiv_(m, denom, value=-lr / (1 - beta1**step))


@pytest.mark.parametrize(
    "dtype,grad_dtype",
    [
        (torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
    ],
    ids=["bf16-fp32grads", "bf16", "fp16"],
)
def test_adamw_low_precision_error_within_twice_the_reference(dtype, grad_dtype, gen):
    shapes = [(), (1,), (129,), (ADAMW.block + 1,)]
    state = make_state(shapes, gen, dtype=dtype, amsgrad=True)
    ref = clone_state(state)
    exact = clone_state(state, torch.float64)
    kw = dict(HYPER, weight_decay=0.1, amsgrad=True, maximize=False, grad_factor=0.5)
    kw["grad_scale"] = torch.tensor(8.0, device=DEVICE)
    for _ in range(STEPS):
        grads = [rand(s, gen, scale=8.0, dtype=grad_dtype) for s in shapes]
        step_once(state, grads, impl=tk, **kw)
        step_once(ref, grads, impl=reference, **kw)
        f64 = {k: kw[k] for k in ("lr", "beta1", "beta2", "weight_decay", "eps", "amsgrad")}
        adamw_float64(exact, grads, coef=0.5 / 8.0, **f64)
    for key in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        err = max((a.double() - x).abs().max().item() for a, x in zip(state[key], exact[key]))
        ref_err = max((a.double() - x).abs().max().item() for a, x in zip(ref[key], exact[key]))
        assert err <= 2 * ref_err, f"{key}: triton error {err:.3g}, reference {ref_err:.3g}"


def test_adamw_matches_the_cpp_kernel_bit_for_bit(gen):
    """Same arithmetic as csrc/adamw_math.h, so the C++ CPU kernel agrees to the last bit."""
    from fastopt import _ext, _ops

    if not _ext.has_kernel("adamw_", "CPU"):
        pytest.skip(f"fastopt._C is not loaded: {_ext.extension_error()}")
    for dtype, grad_dtype in [(torch.float32,) * 2, (torch.bfloat16, torch.float32)]:
        shapes = [(), (7,), (ADAMW.block + 5,)]
        state = make_state(shapes, gen, dtype=dtype, amsgrad=True)
        cpp = {k: [t.cpu().clone() for t in v] for k, v in state.items()}  # own step counts too
        kw = dict(HYPER, weight_decay=0.1, amsgrad=True, maximize=True, grad_factor=0.5)
        kw["grad_norm"], kw["max_grad_norm"] = torch.tensor(100.0, device=DEVICE), 1.0
        for _ in range(3):
            grads = [rand(s, gen, dtype=grad_dtype) for s in shapes]
            step_once(state, grads, impl=tk, **kw)
            cpu_kw = dict(kw, grad_norm=kw["grad_norm"].cpu())
            step_once(cpp, [g.cpu() for g in grads], impl=_ops, **cpu_kw)
        for key in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
            for i, (a, b) in enumerate(zip(state[key], cpp[key])):
                assert torch.equal(a.cpu(), b), f"{dtype} {key}[{i}] differs from the C++ kernel"


def test_adamw_without_tensors_or_with_only_empty_ones_does_nothing(gen):
    tk.adamw_step([], [], [], [], [], [], Hyper(**HYPER))
    state = make_state([(0,), (0, 3)], gen)
    step_once(state, [rand(s, gen) for s in [(0,), (0, 3)]], impl=tk, **HYPER,
              amsgrad=False, maximize=False)  # fmt: skip


@pytest.mark.skipif(INTERPRETED, reason="the interpreter does not compile")
def test_adamw_does_not_recompile_for_new_shapes_or_hyperparameters(gen):
    kernels = adamw_kernel.device_caches[DEVICE.index or 0][0]
    for i, shapes in enumerate([[(5,)], [(1,), (2, 3)], [(ADAMW.chunk + 7,)] * 3, [(16,)] * 16]):
        state = make_state(shapes, gen)
        hyper = dict(HYPER, lr=10.0 ** -(i + 2), weight_decay=0.01 * i, eps=1e-8 * (i + 1))
        hyper["beta1"] = 0.8 + 0.05 * i
        grads = [rand(s, gen) for s in shapes]
        step_once(state, grads, impl=tk, **hyper, amsgrad=False, maximize=False)
        if i == 0:
            compiled = len(kernels)
    assert len(kernels) == compiled, "a new shape, count or hyperparameter compiled a new kernel"


@pytest.mark.skipif(INTERPRETED, reason="CUDA graphs need a GPU")
def test_a_whole_step_replays_from_a_cuda_graph_bit_for_bit(gen):
    """Norm, skip flag, clipped scaled update and scale update: nothing syncs, so all of it
    captures, and a replay equals the eager step."""
    shapes = [(5,), (), (ADAMW.block + 3,), (0,)]
    grads_at = [[rand(s, gen, scale=256.0) for s in shapes] for _ in range(4)]
    grads_at[2][0][1] = math.inf  # one skipped step

    def make():
        state = make_state(shapes, torch.Generator().manual_seed(7), amsgrad=True)
        scale = torch.tensor(256.0, device=DEVICE)
        return state, scale, torch.zeros((), dtype=torch.int32, device=DEVICE)

    def step(state, scale, tracker, grads):
        norm, found_inf = tk.multi_tensor_norm(grads, 2.0)
        kw = dict(HYPER, amsgrad=True, maximize=False, grad_scale=scale, found_inf=found_inf)
        step_once(state, grads, impl=tk, grad_norm=norm, max_grad_norm=1.0, **kw)
        tk.update_scale_(scale, tracker, found_inf, 2.0, 0.5, 2)

    eager = make()
    for grads in grads_at:
        step(*eager, grads)

    graphed = make()
    static = [g.clone() for g in grads_at[0]]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles, builds the tables; is step 0
        step(*graphed, static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(*graphed, static)
    for grads in grads_at[1:]:
        for buf, g in zip(static, grads):
            buf.copy_(g)
        graph.replay()
    for key in eager[0]:
        for a, b in zip(graphed[0][key], eager[0][key]):
            assert torch.equal(a, b), key
    assert torch.equal(graphed[1], eager[1]) and torch.equal(graphed[2], eager[2])


@pytest.mark.skipif(INTERPRETED, reason="CUDA graphs need a GPU")
def test_a_table_is_not_built_during_graph_capture(gen):
    state = make_state([(3,), (17,)], gen)
    grads = [rand(s, gen) for s in [(3,), (17,)]]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side), pytest.raises(RuntimeError, match="during CUDA graph capture"):
        with torch.cuda.graph(graph):
            step_once(state, grads, impl=tk, **HYPER, amsgrad=False, maximize=False)
    torch.cuda.current_stream().wait_stream(side)


def test_adamw_rejects_bad_input_naming_the_argument(gen):
    shapes = [(4,), (3, 4)]
    kw = dict(HYPER, amsgrad=False, maximize=False)

    def call(**over):
        grads = over.pop("grads", [rand(s, gen) for s in shapes])
        state = make_state(shapes, gen)
        state.update(over)
        step_once(state, grads, impl=tk, **kw)

    with pytest.raises(ValueError, match=r"params\[1\] must be contiguous"):
        call(params=[rand((4,), gen), rand((4, 3), gen).t()])
    with pytest.raises(ValueError, match=r"grads\[0\] is on meta"):
        call(grads=[torch.empty(4, device="meta"), rand((3, 4), gen)])
    with pytest.raises(ValueError, match=r"exp_avgs must be torch.float32"):
        call(exp_avgs=[rand(s, gen, dtype=torch.float16) for s in shapes])
    with pytest.raises(ValueError, match=r"state_steps\[0\] must be a one-element float32"):
        call(state_steps=[torch.tensor(1, device=DEVICE)] * 2)
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[1\] has 11 elements"):
        call(exp_avg_sqs=[rand((4,), gen), rand((11,), gen)])


# ------------------------------------------------------------------------------------- norm

NORM_SHAPES = [(), (0,), (1,), (NORM.block - 1,), (NORM.block + 1,), (NORM.chunk + 1,), (31, 7)]
NORM_TYPES = [2.0, 1.0, math.inf, 3.0, 0.5, 0.0, -math.inf]


def norm_rtol(p: float) -> float:
    """Both sides are fp32 sums with different orders. Ours: 16 sequential adds per lane, an
    11-level tree, then the same over the partials (~60 roundings deep); torch's is no deeper.
    The p-th root divides the relative error by p."""
    if p <= 0 or p == math.inf:
        return 0.0  # the max is exact; 0 and -inf are the reference itself
    return 2 * 64 * U / min(p, 1.0)


@pytest.mark.parametrize("p", NORM_TYPES, ids=lambda p: f"p{p}")
def test_norm_matches_reference_over_mixed_dtypes(p, gen):
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    tensors = [rand(s, gen, dtype=dtypes[i % 3]) for i, s in enumerate(NORM_SHAPES)]
    norm, flag = tk.multi_tensor_norm(tensors, p)
    ref_norm, ref_flag = reference.multi_tensor_norm(tensors, p)
    assert norm.dtype == flag.dtype == torch.float32 and norm.shape == flag.shape == ()
    assert norm.device.type == flag.device.type == DEVICE.type
    torch.testing.assert_close(norm, ref_norm, rtol=norm_rtol(p), atol=0.0)
    assert flag.item() == ref_flag.item() == 0.0
    again = tk.multi_tensor_norm(tensors, p)[0]
    assert torch.equal(norm, again), "not deterministic"


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("p", [2.0, math.inf, 3.0], ids=["p2", "pinf", "p3"])
def test_norm_flags_a_nonfinite_very_last_element(bad, p, gen):
    tensors = [rand(s, gen) for s in [(5,), (NORM.chunk + 1,)]]
    tensors[-1][-1] = bad
    norm, flag = tk.multi_tensor_norm(tensors, p)
    ref_norm, ref_flag = reference.multi_tensor_norm(tensors, p)
    assert flag.item() == ref_flag.item() == 1.0
    torch.testing.assert_close(norm, ref_norm, equal_nan=True)  # inf or NaN, as torch's


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")  # numpy, under the interpreter
def test_norm_overflowing_to_inf_is_not_a_nonfinite_gradient(gen):
    tensors = [rand((100,), gen, scale=1e30), rand((3,), gen)]
    norm, flag = tk.multi_tensor_norm(tensors, 2.0)
    assert flag.item() == 0.0 and norm.item() == math.inf


def test_norm_of_nothing_and_of_empty_tensors():
    for tensors in ([], [torch.empty(0, device=DEVICE), torch.empty(3, 0, device=DEVICE)]):
        norm, flag = tk.multi_tensor_norm(tensors, 2.0)
        ref_norm, ref_flag = reference.multi_tensor_norm(tensors, 2.0)
        assert norm.device == ref_norm.device and norm.item() == 0.0 and flag.item() == 0.0


def test_norm_rejects_non_contiguous_tensors(gen):
    with pytest.raises(ValueError, match=r"tensors\[1\] must be contiguous"):
        tk.multi_tensor_norm([rand((3,), gen), rand((4, 3), gen).t()], 2.0)


# ------------------------------------------------------------------------------- accumulate


@pytest.mark.parametrize(
    "grad_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
def test_accumulate_matches_reference_exactly(grad_dtype, gen):
    """Upcast, multiply, round, add, round: the reference's two roundings, no contraction."""
    shapes = SMALL + [(1,)] * 12 + [(ADAMW.chunk + 1,)]
    accs = [rand(s, gen) for s in shapes]  # stale contents: an overwrite must ignore them
    ref = [a.clone() for a in accs]
    for k, alpha in enumerate([1 / 3, 0.7, 1 / 3]):
        grads = [rand(s, gen, dtype=grad_dtype) for s in shapes]
        tk.accumulate_(accs, grads, alpha, k == 0)
        reference.accumulate_(ref, grads, alpha, k == 0)
        for i, (a, b) in enumerate(zip(accs, ref)):
            assert torch.equal(a, b), f"micro-batch {k}: accs[{i}] differs"


def test_accumulate_rejects_bad_input(gen):
    with pytest.raises(ValueError, match=r"accs must be float32"):
        tk.accumulate_([rand((3,), gen, dtype=torch.bfloat16)], [rand((3,), gen)], 1.0, True)
    with pytest.raises(ValueError, match=r"grads has 2 tensors"):
        tk.accumulate_([rand((3,), gen)], [rand((3,), gen)] * 2, 1.0, True)


# ------------------------------------------------------------------------------- loss scale


@pytest.mark.parametrize("interval", [1, 3], ids=["interval1", "interval3"])
def test_update_scale_matches_reference_exactly(interval):
    flags = [0, 0, 0, 1, 0, 0, 0, 0, math.nan, 0, 0, 0]
    for start in (2.0**16, 3.0e38):  # the second would grow past the fp32 range
        scale = torch.tensor(start, device=DEVICE)
        tracker = torch.tensor(0, dtype=torch.int32, device=DEVICE)
        ref_scale, ref_tracker = scale.clone(), tracker.clone()
        for f in flags:
            found = torch.tensor(float(f), device=DEVICE)
            tk.update_scale_(scale, tracker, found, 2.0, 0.5, interval)
            reference.update_scale_(ref_scale, ref_tracker, found, 2.0, 0.5, interval)
            assert torch.equal(scale, ref_scale) and torch.equal(tracker, ref_tracker)
        assert math.isfinite(scale.item())


# ------------------------------------------------------------------------------------ table


def test_table_is_cached_while_pointers_and_sizes_stay(gen):
    a = [rand((5,), gen), rand((0,), gen), rand((70,), gen)]
    lists = [a, [x.clone() for x in a]]
    first = _table.get_table(lists, 64, DEVICE)
    assert _table.get_table(lists, 64, DEVICE) is first
    assert (first.n_tensors, first.n_chunks) == (2, 1 + 2)  # the empty tensor gets no chunk
    lists[1][2] = rand((70,), gen)  # a new tensor: a new table
    assert _table.get_table(lists, 64, DEVICE) is not first
