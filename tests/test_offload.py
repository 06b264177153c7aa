"""AdamW(offload=True): state in host memory, the update on the CPU kernel, the result the
non-offloaded step's bit for bit. On a machine without a GPU the params are on the host and
offload must change nothing; the host-copy path (params and gradients copied down, updated,
copied up) is forced here on CPU tensors too, and runs for real on CUDA in the GPU cases."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import HAS_CUDA, OFFLOAD_BF16, OFFLOAD_SETTINGS

import fastopt
from fastopt.offload import HostCopies

SETTINGS, BF16 = OFFLOAD_SETTINGS, OFFLOAD_BF16
GPU = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def _model(setting, device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 70), torch.nn.Tanh(), torch.nn.Linear(70, 3))
    return model.to(device=device, dtype=torch.bfloat16 if setting in BF16 else torch.float32)


def _train(model, opt, steps=4, scaler=None, inf_at=2, force_host=False):
    gen = torch.Generator().manual_seed(1)
    device = next(model.parameters()).device
    for step in range(steps):
        x = torch.randn(16, 40, generator=gen).to(device, next(model.parameters()).dtype)
        loss = model(x).float().pow(2).mean()
        opt.zero_grad()
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler is not None and step == inf_at:
            next(model.parameters()).grad[0, 0] = float("inf")
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if force_host:  # after the first step made the plan: its buckets copy through the host
            for plan in opt._planner._plans.values():
                for bucket in plan.buckets:
                    bucket.host = bucket.host or HostCopies()


def _same(a, b, opt_a, opt_b):
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p.cpu(), q.cpu())
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key].cpu(), sb[key].cpu()), key


def _pair(setting, device, scaler=False, force_host=False, backend="auto"):
    runs = []
    for offload in (False, True):
        model = _model(setting, device)
        opt = fastopt.AdamW(model.parameters(), lr=1e-2, seed=3, offload=offload,
                            backend=backend, **SETTINGS[setting])  # fmt: skip
        loss_scaler = fastopt.LossScaler(init_scale=2.0**8) if scaler else None
        _train(model, opt, scaler=loss_scaler, force_host=force_host and offload)
        runs.append((model, opt))
    return runs


@pytest.mark.parametrize("setting", SETTINGS)
def test_offload_changes_nothing_for_params_on_the_host(setting):
    (a, opt_a), (b, opt_b) = _pair(setting, "cpu")
    _same(a, b, opt_a, opt_b)
    assert opt_b.param_groups[0]["offload"] is True


@pytest.mark.parametrize("setting", SETTINGS)
def test_the_host_copy_path_updates_as_the_step_on_the_params(setting):
    """Params and gradients copied into host buffers, updated there, copied back: the same
    bits as the update on the params themselves (a loss scaler's skipped step included)."""
    (a, opt_a), (b, opt_b) = _pair(setting, "cpu", scaler=True, force_host=True, backend="cpu")
    _same(a, b, opt_a, opt_b)
    hosts = [bk.host for plan in opt_b._planner._plans.values() for bk in plan.buckets]
    assert hosts and all(h is not None and h.params for h in hosts)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(offload="yes"), "Invalid offload: 'yes'"),
        (dict(offload=True, backend="cuda"), "offload=True runs the update on the host's CPU"),
        (dict(offload=True, backend="reference"), "backend='reference' is not"),
    ],
)
def test_bad_offload_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fastopt.AdamW([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_an_offloaded_state_dict_round_trips_exactly():
    model = _model("int8-master", "cpu")
    opt = fastopt.AdamW(model.parameters(), lr=1e-2, offload=True, seed=3,
                        **SETTINGS["int8-master"])  # fmt: skip
    _train(model, opt, steps=2)
    twin = copy.deepcopy(model)
    again = fastopt.AdamW(twin.parameters(), lr=1e-2, offload=True, seed=3,
                          **SETTINGS["int8-master"])  # fmt: skip
    again.load_state_dict(copy.deepcopy(opt.state_dict()))  # as saved (torch's aliases)
    _train(model, opt, steps=2)
    _train(twin, again, steps=2)
    _same(model, twin, opt, again)


@GPU
@pytest.mark.gpu
@pytest.mark.parametrize("scaler", [False, True], ids=["plain", "loss-scaler"])
@pytest.mark.parametrize("setting", SETTINGS)
def test_offloaded_cuda_params_update_as_without_offload(setting, scaler):
    (a, opt_a), (b, opt_b) = _pair(setting, "cuda", scaler=scaler)
    _same(a, b, opt_a, opt_b)
    for state in opt_b.state.values():
        for value in state.values():
            assert value.device.type == "cpu"
            assert value.dim() == 0 or value.is_pinned()
    assert opt_b.state_nbytes() == opt_a.state_nbytes()
    assert all(p.is_cuda for p in b.parameters())


@GPU
@pytest.mark.gpu
def test_backend_cpu_names_the_update_of_offloaded_cuda_params_not_their_norm():
    """backend="cpu" with offload: the update on the host, the norm and skip flag of the
    gradients on the GPU by its own kernels, as with backend="auto"."""
    runs = []
    for backend in ("auto", "cpu"):
        model = _model("clip", "cuda")
        opt = fastopt.AdamW(model.parameters(), lr=1e-2, offload=True, backend=backend,
                            **SETTINGS["clip"])  # fmt: skip
        _train(model, opt, scaler=fastopt.LossScaler(init_scale=2.0**8))
        runs.append((model, opt))
    _same(runs[0][0], runs[1][0], runs[0][1], runs[1][1])


@GPU
@pytest.mark.gpu
def test_an_offloaded_cuda_state_dict_loads_back_into_host_memory():
    (a, opt_a), (b, opt_b) = _pair("int8-master", "cuda")
    again = fastopt.AdamW(b.parameters(), lr=1e-2, offload=True, seed=3,
                          **SETTINGS["int8-master"])  # fmt: skip
    again.load_state_dict(copy.deepcopy(opt_b.state_dict()))
    for p in b.parameters():
        for key, value in again.state[p].items():
            assert value.device.type == "cpu", key
            assert torch.equal(value, opt_b.state[p][key]), key


def test_params_on_a_device_the_host_cannot_copy_from_are_a_one_line_error():
    p = torch.nn.Parameter(torch.zeros(3, device="meta"))
    p.grad = torch.zeros(3, device="meta")
    opt = fastopt.AdamW([p], offload=True)
    with pytest.raises(ValueError, match="the host cannot copy from params on meta"):
        opt.step()


@GPU
@pytest.mark.gpu
@pytest.mark.parametrize("setting", ["plain", "clip", "int8-master"])
def test_fsdp2_shards_offload_their_state_on_one_gpu(setting):
    """FSDP2 on a one-rank mesh of the GPU: each shard's state in pinned host memory (a
    DTensor of the GPU mesh with a host shard), the update through host copies; the params as
    without offload, bit for bit, and a state_dict that loads back into host memory."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29533", rank=0,
                                world_size=1)  # fmt: skip
    try:
        runs = []
        for offload in (False, True):
            model = _model(setting, "cuda")
            for layer in model:
                if any(True for _ in layer.parameters()):
                    fully_shard(layer)
            fully_shard(model)
            opt = fastopt.AdamW(model.parameters(), lr=1e-2, seed=3, offload=offload,
                                **SETTINGS[setting])  # fmt: skip
            _train(model, opt)
            runs.append((model, opt))
        (a, opt_a), (b, opt_b) = runs
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p.to_local(), q.to_local())
            for key, value in opt_b.state[q].items():
                shard = value.to_local() if hasattr(value, "to_local") else value
                assert shard.device.type == "cpu", key
                assert shard.dim() == 0 or shard.is_pinned(), key
        again = fastopt.AdamW(b.parameters(), lr=1e-2, seed=3, offload=True,
                              **SETTINGS[setting])  # fmt: skip
        again.load_state_dict(copy.deepcopy(opt_b.state_dict()))
        for q in b.parameters():
            for key, value in again.state[q].items():
                shard = value.to_local() if hasattr(value, "to_local") else value
                assert shard.device.type == "cpu", key
    finally:
        if started:
            dist.destroy_process_group()
