"""Every precision setting on FSDP2's layout (params and gradients as Shard(0) DTensors over
two gloo ranks) against one process holding the whole tensors, bit for bit: params, masters,
moments, and for 8-bit moments the codes and every block's scale, with shapes whose shard
boundaries cut the whole param's 32-element blocks (50x70, 70x50, 7x5, 3) and one whose do
not (64x32)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastopt
from fastopt.blocks import shard_blocks
from fastopt.quant import BLOCK
from fastopt.sharded import first_index

pytest.importorskip("torch.distributed.fsdp")

WORLD = 2
STEPS = 3
SHAPES = [(70, 50), (50, 70), (64, 32), (7, 5), (3,)]
SETTINGS = {
    "fp32": dict(),
    "bf16-moments": dict(state_dtype=torch.bfloat16),
    "master": dict(master_weights=True, state_dtype=torch.bfloat16),
    "sr": dict(stochastic_rounding=True, state_dtype=torch.bfloat16),
    "int8": dict(state_dtype="int8"),
    "int8-amsgrad": dict(state_dtype="int8", amsgrad=True),
    "master-int8": dict(master_weights=True, state_dtype="int8"),
    "sr-int8": dict(stochastic_rounding=True, state_dtype="int8"),
}
BF16 = {"master", "sr", "master-int8", "sr-int8"}  # settings for bf16 params (else fp32)


def _data(setting):
    gen = torch.Generator().manual_seed(7)
    dtype = torch.bfloat16 if setting in BF16 else torch.float32
    init = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in SHAPES] for _ in range(STEPS)]
    return init, grads


def _run(setting, to_param):
    init, grads = _data(setting)
    params = [nn.Parameter(to_param(t.clone())) for t in init]
    opt = fastopt.AdamW(params, lr=1e-2, seed=11, min_8bit_size=0, backend="cpu",
                        **SETTINGS[setting])  # fmt: skip
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = to_param(g.clone())
        opt.step()
    return params, opt


def _bits(t):
    t = t.detach().flatten()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).tolist()
    if t.dtype == torch.float32:
        return t.view(torch.int32).tolist()
    return t.tolist()


def _whole(t):
    """The bits of a Shard(0) DTensor's whole tensor, flattened: the ranks' shards in order."""
    parts = [None] * WORLD
    dist.all_gather_object(parts, _bits(t.to_local()))
    return [x for part in parts for x in part]


def _state_keys(state):
    return sorted(k for k in state if k not in ("step", "scales", "cut_scales"))


def _worker(rank, tmp):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        report = {}
        for setting in SETTINGS:
            params, opt = _run(setting, lambda t: distribute_tensor(t, mesh, [Shard(0)]))
            entry = {"params": [_whole(p) for p in params], "state": [],
                     "blocks": []}  # fmt: skip
            for p in params:
                state = opt.state[p]
                entry["state"].append({k: _whole(state[k]) for k in _state_keys(state)})
                entry["state"][-1]["step"] = float(state["step"])
                layout = shard_blocks(p)
                entry["blocks"].append({
                    "body_first": first_index(p) + (layout.body[0] if layout else 0),
                    "scales": state["scales"].tolist() if "scales" in state else None,
                    "pieces": [[layout.first + a, layout.first + b] for a, b, _ in layout.pieces]
                    if layout else [],
                    "cut_scales": state["cut_scales"].tolist() if "cut_scales" in state else None,
                })  # fmt: skip
            report[setting] = entry
    finally:
        dist.destroy_process_group()
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp_int8")
    mp.spawn(_worker, args=(str(tmp),), nprocs=WORLD, join=True)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("setting", SETTINGS)
def test_sharded_update_is_the_whole_tensors_bit_for_bit(sharded, setting):
    params, opt = _run(setting, lambda t: t)
    for rank in range(WORLD):
        report = sharded[rank][setting]
        assert report["params"] == [_bits(p) for p in params]
        for got, p in zip(report["state"], params):
            state = opt.state[p]
            assert got.pop("step") == float(state["step"]) == STEPS
            assert got == {k: _bits(state[k]) for k in _state_keys(state)}


@pytest.mark.parametrize("setting", [s for s in SETTINGS if "int8" in s])
def test_sharded_block_scales_are_the_whole_params(sharded, setting):
    """Each rank's body scales are the whole param's blocks there, and the scale of a block a
    shard boundary cuts is the whole block's on both ranks that hold a part of it."""
    params, opt = _run(setting, lambda t: t)
    cut_blocks = 0
    for rank in range(WORLD):
        for blocks, p in zip(sharded[rank][setting]["blocks"], params):
            whole = opt.state[p]["scales"]
            first = blocks["body_first"]
            body = torch.tensor(blocks["scales"], dtype=torch.int8)
            if body.numel():
                assert first % BLOCK == 0
                assert torch.equal(body, whole[:, first // BLOCK : first // BLOCK + body.shape[1]])
            for column, (start, _) in enumerate(blocks["pieces"]):
                got = torch.tensor(blocks["cut_scales"], dtype=torch.int8)[:, column]
                assert torch.equal(got, whole[:, start // BLOCK])
                cut_blocks += 1
    # 70x50 and 50x70 split at element 1750, 7x5 at 20, (3,) at 2: each a cut block seen from
    # both sides; 64x32 splits on a block boundary.
    assert cut_blocks == 2 * 4


def test_non_dim0_sharding_of_8bit_states_is_refused():
    """A shard that is not a range of the whole param cannot keep its blocks: one line says
    so, naming the placement (checked here without a process group: the layout alone)."""
    from fastopt.blocks import _shard_dim

    class Fake:
        placements = ("Shard(dim=1)",)
        shape = (4, 4)

        def dim(self):
            return 2

    class Placement:
        dim = 1

        def is_replicate(self):
            return False

        def is_shard(self):
            return True

        def __repr__(self):
            return "Shard(dim=1)"

    Fake.placements = (Placement(),)
    with pytest.raises(ValueError, match=r"sharded along dim 0 only .*Shard\(dim=1\)"):
        _shard_dim(Fake())


def _dcp_worker(rank, tmp):
    """FSDP2 + bf16 params with masters and 8-bit moments (rows of 50 and 70 elements cut
    blocks): get_optimizer_state_dict, dcp.save, then dcp.load + set_optimizer_state_dict into
    a fresh model and optimizer, which then steps."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD
    )
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.fsdp import fully_shard

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(50, 70), nn.Linear(70, 50)).bfloat16()
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
        opt = fastopt.AdamW(model.parameters(), lr=1e-2, master_weights=True, state_dtype="int8",
                            min_8bit_size=0, backend="cpu")  # fmt: skip
        return model, opt

    def train(model, opt, steps):
        gen = torch.Generator().manual_seed(rank)
        for _ in range(steps):
            x = torch.randn(4, 50, generator=gen).bfloat16()
            model(x).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()

    try:
        model, opt = build()
        train(model, opt, 2)
        saved = get_optimizer_state_dict(model, opt)
        dcp.save({"optim": saved}, checkpoint_id=f"{tmp}/checkpoint")
        fresh_model, fresh = build()
        train(fresh_model, fresh, 1)  # a state to be replaced
        loaded = get_optimizer_state_dict(fresh_model, fresh)
        dcp.load({"optim": loaded}, checkpoint_id=f"{tmp}/checkpoint")
        set_optimizer_state_dict(fresh_model, fresh, loaded)
        again = get_optimizer_state_dict(fresh_model, fresh)
        report = {"moments": [], "cut_scales": []}
        for key, entry in saved["state"].items():
            for name in ("exp_avg", "exp_avg_sq"):
                want = entry[name].to_local()
                got = again["state"][key][name].to_local()
                report["moments"].append([want.flatten().tolist(), got.flatten().tolist()])
        for p in fresh.param_groups[0]["params"]:
            state = fresh.state[p]
            report["cut_scales"].append(state["cut_scales"].tolist() if "cut_scales" in state
                                        else None)  # fmt: skip
        train(fresh_model, fresh, 1)
        report["stepped"] = float(fresh.state[fresh.param_groups[0]["params"][0]]["step"])
    finally:
        dist.destroy_process_group()
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


def test_dcp_checkpoint_of_sharded_8bit_states_loads_in_the_portable_form(tmp_path):
    """torch's distributed checkpoint API on FSDP2 with 8-bit moments: the state dict carries
    each moment as an fp32 DTensor (the portable form), and loading quantizes it back to
    nearest in the whole param's blocks, so the moments come back within the 8-bit format's
    error and a cut block's scale is the same on both ranks."""
    mp.spawn(_dcp_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for report in reports:
        assert report["stepped"] == 3.0
        for want, got in report["moments"]:
            want, got = torch.tensor(want), torch.tensor(got)
            # Codes of 3 mantissa bits (exp_avg) or of v's root with 4, rounded twice (saved,
            # then loaded to nearest): within 2**-3 relative, or far below the largest value.
            assert torch.all(
                (got - want).abs() <= 2.0**-3 * want.abs() + 2.0**-12 * want.abs().max()
            )
    # The tail block of rank 0's shard is the head block of rank 1's: one scale.
    for p_index, (first, second) in enumerate(zip(*(r["cut_scales"] for r in reports))):
        assert first is not None and second is not None, p_index
        assert [row[-1] for row in first] == [row[0] for row in second]
