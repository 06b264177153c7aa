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
from fastopt.offload import HostCopies
from fastopt.quant import BLOCK
from fastopt.sharded import first_index

pytest.importorskip("torch.distributed.fsdp")

WORLD = 2
STEPS = 5
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
    # Each rank's shards' state offloaded, its update through host copies of the local shards
    # (forced here: on CPU params offload keeps the state where it is), cut blocks included.
    "master-int8-offload": dict(master_weights=True, state_dtype="int8", offload=True),
}
# settings for bf16 params (else fp32)
BF16 = {"master", "sr", "master-int8", "sr-int8", "master-int8-offload"}


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
        if SETTINGS[setting].get("offload"):  # from the second step: the host-copy path
            for plan in opt._planner._plans.values():
                for bucket in plan.buckets:
                    bucket.host = bucket.host or HostCopies()
    if SETTINGS[setting].get("offload"):
        hosts = [b.host for plan in opt._planner._plans.values() for b in plan.buckets]
        assert hosts and all(h.params for h in hosts)  # the host copies were used
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
    # As the CLI does (see fastopt.train.cli): gloo's threads can abort the interpreter's
    # shutdown ("terminate called without an active exception", seen in CI).
    os._exit(0)


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


# ------------------------------------------------------------------ distributed checkpoints
DCP_SETTING = dict(master_weights=True, state_dtype="int8", min_8bit_size=0, seed=3, lr=1e-2)


def _dcp_build(to_param):
    init, _ = _data("master-int8")
    module = nn.ParameterList([nn.Parameter(to_param(t.clone())) for t in init])
    return module, fastopt.AdamW(module, backend="cpu", **DCP_SETTING)


def _dcp_steps(module, opt, grads, to_param):
    for gs in grads:
        for p, g in zip(module, gs):
            p.grad = to_param(g.clone())
        opt.step()


def _dcp_save(module, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    state = {"model": get_model_state_dict(module), "optim": get_optimizer_state_dict(module, opt)}
    dcp.save(state, checkpoint_id=path)


def _dcp_resume(path, to_param, grads):
    """A fresh module and optimizer (stepped once, so that loading replaces a state) loaded
    from ``path`` through torch's API, then stepped with ``grads``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    module, opt = _dcp_build(to_param)
    _dcp_steps(module, opt, grads[:1], to_param)
    state = {"model": get_model_state_dict(module), "optim": get_optimizer_state_dict(module, opt)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(module, state["model"])
    set_optimizer_state_dict(module, opt, state["optim"])
    _dcp_steps(module, opt, grads, to_param)
    return module, opt


def _dcp_report(module, opt, whole):
    report = {"params": [], "state": []}
    for p in module:
        report["params"].append(whole(p))
        state = opt.state[p]
        report["state"].append({k: whole(state[k]) for k in _state_keys(state)})
        report["state"][-1]["step"] = float(state["step"])
    return report


def _dcp_worker(rank, tmp):
    """On 2 ranks: train 3 steps and save, then 2 more; resume that checkpoint, and the one a
    single process saved, and step the same 2."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    try:
        mesh = init_device_mesh("cpu", (WORLD,))

        def shard(t):
            return distribute_tensor(t, mesh, [Shard(0)])

        _, grads = _data("master-int8")
        module, opt = _dcp_build(shard)
        _dcp_steps(module, opt, grads[:3], shard)
        _dcp_save(module, opt, f"{tmp}/two_ranks")
        _dcp_steps(module, opt, grads[3:], shard)
        report = {"uninterrupted": _dcp_report(module, opt, _whole)}
        for name in ("two_ranks", "one_process"):
            resumed = _dcp_resume(f"{tmp}/{name}", shard, grads[3:])
            report[f"from_{name}"] = _dcp_report(*resumed, _whole)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    # As the CLI does (see fastopt.train.cli): gloo's threads can abort the interpreter's
    # shutdown ("terminate called without an active exception", seen in CI).
    os._exit(0)


def _plain_whole(t):
    return _bits(t)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """Checkpoints of 3 steps written by one process and by 2 ranks, each resumed on 1 and on
    2, then stepped twice more; and the uninterrupted runs."""
    tmp = tmp_path_factory.mktemp("dcp")
    _, grads = _data("master-int8")
    module, opt = _dcp_build(lambda t: t)
    _dcp_steps(module, opt, grads[:3], lambda t: t)
    _dcp_save(module, opt, f"{tmp}/one_process")
    _dcp_steps(module, opt, grads[3:], lambda t: t)
    runs = {"one process": _dcp_report(module, opt, _plain_whole)}
    mp.spawn(_dcp_worker, args=(str(tmp),), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        report = json.loads((tmp / f"rank{rank}.json").read_text())
        for name, run in report.items():
            runs[f"2 ranks (rank {rank}): {name}"] = run
    for name in ("one_process", "two_ranks"):
        runs[f"one process: from_{name}"] = _dcp_report(
            *_dcp_resume(str(tmp / name), lambda t: t, grads[3:]), _plain_whole
        )
    return runs, tmp


def test_dcp_resume_is_bit_exact_on_the_same_or_another_number_of_ranks(resumed):
    """torch's API (get/set_optimizer_state_dict, dcp.save/dcp.load) carries the 8-bit codes,
    block scales and masters' remainders themselves, so a checkpoint written on 1 process or
    2 ranks resumes on either, and the run goes on as if never interrupted, bit for bit."""
    runs, _ = resumed
    want = runs.pop("one process")
    assert len(runs) == 2 * 3 + 2
    for name, run in runs.items():
        assert run == want, name


def test_dcp_folder_of_8bit_states_with_masters_is_compact(resumed, tmp_path):
    """The optimizer's part of a checkpoint: bf16 params with masters and 8-bit moments (codes,
    scales, remainders: about 4.06 bytes per param) against fp32 AdamW's 8, as DCP writes
    them, metadata included. The issue's bar: at most 0.55x."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    def folder_bytes(dtype, **kwargs):
        torch.manual_seed(0)
        module = nn.ParameterList([nn.Parameter(torch.randn(s).to(dtype)) for s in
                                   ((512, 256), (256, 512), (70, 50))])  # fmt: skip
        opt = fastopt.AdamW(module, lr=1e-2, backend="cpu", min_8bit_size=0, **kwargs)
        for p in module:
            p.grad = torch.ones_like(p)
        opt.step()
        path = tmp_path / str(kwargs)
        dcp.save({"optim": get_optimizer_state_dict(module, opt)}, checkpoint_id=str(path))
        return sum(f.stat().st_size for f in path.iterdir())

    lean = folder_bytes(torch.bfloat16, master_weights=True, state_dtype="int8")
    fp32 = folder_bytes(torch.float32)
    assert lean / fp32 <= 0.55
    assert lean / fp32 == pytest.approx((2 + 2 + 2 / 32) / 8, rel=0.05)
