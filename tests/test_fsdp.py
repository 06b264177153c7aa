"""fastopt under FSDP2 (``fully_shard``): DTensor params update shard by shard, and the global
norm, the clip and the skip decision are those of the whole model on every rank. Two gloo
ranks on the CPU against one process holding the whole model and batch."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastopt

fully_shard = pytest.importorskip("torch.distributed.fsdp").fully_shard

WORLD = 2
STEPS = 4
LR = 1e-2
CLIP = 0.05  # far below this problem's gradient norms (about 0.5 to 1): every step clips
INF_STEP = 2  # the step whose gradient holds an inf, on rank 1's shard only
INF_AT = (8, 0)  # that element of the first weight: row 8 is rank 1's first row


def _model():
    torch.manual_seed(0)
    # The last bias has one element: rank 1's shard of it is empty.
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 8, generator=gen), torch.randn(16, 1, generator=gen))
            for _ in range(STEPS)]  # fmt: skip


SCENARIOS = ("plain", "clip", "scaler", "scaler-unscale", "clip_grad_norm_")


def _run_sharded(scenario, rank):
    model = _model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = fastopt.AdamW(
        model.parameters(), lr=LR, max_grad_norm=CLIP if scenario == "clip" else None
    )
    scaler = fastopt.LossScaler(init_scale=2.0**10, enabled=scenario.startswith("scaler"))
    norms, flags = [], []
    for step, (x, y) in enumerate(_batches()):
        xs, ys = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        scaler.scale(nn.functional.mse_loss(model(xs), ys)).backward()
        weight = next(model.parameters())
        if step == INF_STEP and scenario.startswith("scaler") and rank == 1:
            weight.grad.to_local()[0, 0] = math.inf
        if scenario == "scaler-unscale":
            scaler.unscale_(opt)
        if scenario == "clip_grad_norm_":
            norms.append(float(fastopt.clip_grad_norm_(model.parameters(), CLIP)))
        scaler.step(opt)
        scaler.update()
        if scenario == "clip":
            norms.append(float(opt.last_grad_norm))
        if scenario.startswith("scaler"):
            flags.append(float(scaler.last_found_inf) != 0)
        opt.zero_grad()
    state = opt.state[next(model.parameters())]
    return {
        "params": [p.full_tensor().flatten().tolist() for p in model.parameters()],
        "norms": norms,
        "flags": flags,
        "steps": [float(opt.state[p]["step"]) for p in model.parameters()],
        "state_is_dtensor": type(state["exp_avg"]).__name__ == "DTensor",
    }


def _accumulator_error():
    model = _model()
    fully_shard(model)
    acc = fastopt.GradAccumulator(fastopt.AdamW(model.parameters()))
    nn.functional.mse_loss(model(torch.randn(4, 8)), torch.randn(4, 1)).backward()
    try:
        acc.accumulate()
    except TypeError as e:
        return str(e)
    return "no error"


NORM_TYPES = [2.0, 1.0, 3.0, math.inf, 0.0, -1.0, -math.inf]


def _full_tensors(norm_type):
    """(5, 3) shards 3 + 2 rows; (1,) leaves rank 1 an empty shard, alone in its bucket (its
    own dtype), so that rank measures nothing of it. For the 0-"norm", a zero
    tensor (not counted) and one whose only non-zero is on rank 1 (counted once); without
    them otherwise, since one zero makes any negative-p norm 0."""
    gen = torch.Generator().manual_seed(2)
    tensors = [torch.randn(5, 3, generator=gen),
               torch.randn(1, generator=gen, dtype=torch.float64).abs() + 1]  # fmt: skip
    if norm_type == 0:
        tensors += [torch.zeros(4), torch.tensor([0.0, 0.0, 0.0, 2.0])]
    return tensors + [torch.randn(3, generator=gen)]  # a plain tensor beside the DTensors


def _dtensor_checks():
    """Hand-laid DTensors: norms of shards with an empty one, beside a plain tensor; a plain
    param in a bucket with DTensor ones; Partial and differently sharded gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    norms = {}
    for p in NORM_TYPES:
        full = _full_tensors(p)
        mixed = [distribute_tensor(t, mesh, [Shard(0)]) for t in full[:-1]] + full[-1:]
        norms[str(p)] = float(fastopt.global_norm(mixed, p, backend="reference")[0])

    init = [torch.linspace(-1, 1, 12).reshape(4, 3), torch.arange(4.0), torch.ones(4, 4)]
    grads = [torch.full((4, 3), 0.5), torch.zeros(4), torch.eye(4)]
    params = [
        nn.Parameter(init[0].clone()),  # plain, first in the bucket
        nn.Parameter(distribute_tensor(init[1].clone(), mesh, [Replicate()])),
        nn.Parameter(distribute_tensor(init[2].clone(), mesh, [Shard(0)])),
    ]
    params[0].grad = grads[0].clone()
    # The true gradient of params[1] is 0: the ranks' Partial values cancel.
    sign = 1.0 if dist.get_rank() == 0 else -1.0
    params[1].grad = DTensor.from_local(torch.full((4,), sign), mesh, [Partial()])
    params[2].grad = distribute_tensor(grads[2].clone(), mesh, [Shard(1)])  # not as its param
    opt = fastopt.AdamW(params, lr=0.1, max_grad_norm=100.0, backend="cpu")
    for _ in range(2):
        opt.step()
    updated = [params[0].detach()] + [p.full_tensor() for p in params[1:]]
    return {"norms": norms, "params": [p.flatten().tolist() for p in updated]}


# bf16 params with exact masters and bf16 moments; with stochastic rounding too.
LEAN_SCENARIOS = {
    "master": dict(master_weights=True, state_dtype=torch.bfloat16),
    "master-sr": dict(master_weights=True, state_dtype=torch.bfloat16, stochastic_rounding=True),
}


def _lean_data():
    """bf16 params (7, 5): rank 0 holds rows 0-3, rank 1 rows 4-6; (3,) splits 2 + 1. The
    gradients of three steps, the same on every rank."""
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(7, 5, generator=gen), torch.randn(3, generator=gen)]
    grads = [[torch.randn(t.shape, generator=gen) for t in init] for _ in range(3)]
    return [t.bfloat16() for t in init], [[g.bfloat16() for g in gs] for gs in grads]


def _lean_run(kwargs, to_param):
    """Three steps of lean AdamW on _lean_data's params, each made by to_param: (params, opt)."""
    init, grads = _lean_data()
    params = [nn.Parameter(to_param(t.clone())) for t in init]
    opt = fastopt.AdamW(params, lr=1e-2, seed=5, **kwargs)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = to_param(g.clone())
        opt.step()
    return params, opt


def _lean_checks():
    """The lean settings on FSDP2's layout (Shard(0) DTensors), with the same gradients as a
    whole-tensor run gets: the state stays sharded, and the update is the whole tensor's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    out = {}
    for name, kwargs in LEAN_SCENARIOS.items():
        params, opt = _lean_run(kwargs, lambda t: distribute_tensor(t, mesh, [Shard(0)]))
        state = opt.state[params[0]]
        out[name] = {
            "params": [p.full_tensor().view(torch.int16).flatten().tolist() for p in params],
            "local_masters": [opt.master_param(p).flatten().tolist() for p in params],
            "state_types": sorted(
                {type(v).__name__ for k, v in state.items() if k not in ("step", "scales")}
            ),  # fmt: skip
            "remainder_dtype": str(state["master_remainder"].dtype),
        }
    return out


def _worker(rank, tmp):
    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD
    )
    try:
        report = {name: _run_sharded(name, rank) for name in SCENARIOS}
        report["accumulator_error"] = _accumulator_error()
        report["dtensors"] = _dtensor_checks()
        report["lean"] = _lean_checks()
    finally:
        dist.destroy_process_group()
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    # As the CLI does (see fastopt.train.cli): gloo's threads can abort the interpreter's
    # shutdown ("terminate called without an active exception", seen in CI).
    os._exit(0)


def _run_whole(scenario):
    """torch's own recipe on the whole model and batch in one process."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, foreach=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=scenario.startswith("scaler"))
    norms, flags = [], []
    for step, (x, y) in enumerate(_batches()):
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        weight = next(model.parameters())
        if step == INF_STEP and scenario.startswith("scaler"):
            weight.grad[INF_AT] = math.inf
        scaler.unscale_(opt)
        if scenario in ("clip", "clip_grad_norm_"):
            norms.append(float(nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if scenario.startswith("scaler"):
            flags.append(scaler.get_scale() < before)
        opt.zero_grad()
    return model, norms, flags


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(str(tmp),), nprocs=WORLD, join=True)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_sharded_step_matches_the_whole_model(sharded, scenario):
    model, norms, flags = _run_whole(scenario)
    for rank in range(WORLD):
        report = sharded[rank][scenario]
        for got, want in zip(report["params"], model.parameters()):
            torch.testing.assert_close(
                torch.tensor(got), want.detach().flatten(), rtol=1e-5, atol=1e-6
            )
        # The global norm of all shards, on every rank; not the norm of a rank's own shards.
        assert report["norms"] == pytest.approx(norms, rel=1e-5)
        # The inf was on rank 1's shard alone: both ranks skip, as the whole model does.
        assert report["flags"] == flags
        assert report["state_is_dtensor"]
        applied = STEPS - sum(flags)
        assert report["steps"] == [float(applied)] * len(report["steps"])
    if scenario.startswith("scaler"):
        assert flags == [step == INF_STEP for step in range(STEPS)]


def test_fsdp1_shards_refuse_a_norm_inside_the_step():
    """FSDP1 flattens params into plain per-rank shards: a norm there would be one rank's."""
    p = nn.Parameter(torch.ones(4))
    p._fsdp_flattened = True  # as FullyShardedDataParallel marks its flat parameters
    p.grad = torch.ones(4)
    with pytest.raises(RuntimeError, match="FSDP1"):
        fastopt.AdamW([p], max_grad_norm=1.0).step()
    fastopt.AdamW([p]).step()  # the elementwise update alone is right on a shard
    assert torch.all(p.detach() < 1)


def test_accumulator_refuses_dtensor_params(sharded):
    for rank in range(WORLD):
        assert "does not take DTensor params" in sharded[rank]["accumulator_error"]


@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=str)
def test_norms_of_shards_match_the_whole_tensors(sharded, norm_type):
    """Including torch's 0-"norm" (how many tensors are non-zero: counted once however many
    ranks hold non-zeros of one) and negative p with a rank holding an empty shard."""
    want = float(torch.nn.utils.get_total_norm(_full_tensors(norm_type), norm_type))
    for rank in range(WORLD):
        got = sharded[rank]["dtensors"]["norms"][str(norm_type)]
        assert got == pytest.approx(want, rel=1e-6)


def test_plain_partial_and_resharded_gradients_update_as_torch(sharded):
    init = [torch.linspace(-1, 1, 12).reshape(4, 3), torch.arange(4.0), torch.ones(4, 4)]
    grads = [torch.full((4, 3), 0.5), torch.zeros(4), torch.eye(4)]
    params = [nn.Parameter(t.clone()) for t in init]
    opt = torch.optim.AdamW(params, lr=0.1, foreach=False)
    for _ in range(2):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    for rank in range(WORLD):
        for got, want in zip(sharded[rank]["dtensors"]["params"], params):
            torch.testing.assert_close(
                torch.tensor(got), want.detach().flatten(), rtol=1e-6, atol=1e-7
            )


@pytest.mark.parametrize("scenario", LEAN_SCENARIOS)
def test_lean_settings_on_shards(sharded, scenario):
    """Masters (an int16 remainder) and bf16 moments are DTensors sharded as their params, and
    the sharded update is the whole tensors' bit for bit, stochastic rounding included: a
    shard's noise counts its elements from the whole param's first."""
    params, opt = _lean_run(LEAN_SCENARIOS[scenario], lambda t: t)
    rows = [(0, 4), (4, 7)], [(0, 2), (2, 3)]  # each rank's rows of the two params
    for rank in range(WORLD):
        report = sharded[rank]["lean"][scenario]
        assert report["state_types"] == ["DTensor"]
        assert report["remainder_dtype"] == "torch.int16"
        for got, want in zip(report["params"], params):
            got = torch.tensor(got, dtype=torch.int16).view(torch.bfloat16)
            assert torch.equal(got, want.detach().flatten())
        for i, (lo, hi) in enumerate(r[rank] for r in rows):
            got = torch.tensor(report["local_masters"][i])
            assert torch.equal(got, opt.master_param(params[i])[lo:hi].flatten())
