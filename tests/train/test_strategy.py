"""The parallelism strategies' three calls. DDP across real processes (bit-exact resume, the
CLI under torchrun) is tests/train/test_ddp.py; here a one-process gloo group checks the
wrapping."""

import contextlib
import socket

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from fastopt.train.strategy import DataParallel, SingleProcess, choose_strategy


def test_one_process_is_the_model_as_given():
    strategy = choose_strategy()
    assert isinstance(strategy, SingleProcess) and strategy.name == "single"
    model = nn.Linear(3, 2)
    wrapped, raw = strategy.wrap(model, torch.device("cpu"))
    assert wrapped is model and raw is model
    assert isinstance(strategy.backward_context(model, last=False), contextlib.nullcontext)
    t = torch.ones(3)
    strategy.reduce([t])
    assert t.tolist() == [1.0, 1.0, 1.0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_data_parallel_wraps_in_ddp_and_skips_the_sync_but_on_the_last_micro_batch():
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        strategy = DataParallel()
        model = nn.Linear(3, 2)
        wrapped, raw = strategy.wrap(model, torch.device("cpu"))
        assert isinstance(wrapped, DDP) and raw is model and wrapped.module is model
        again, raw_again = strategy.wrap(wrapped, torch.device("cpu"))  # given wrapped: kept
        assert again is wrapped and raw_again is model
        with strategy.backward_context(wrapped, last=False):
            assert not wrapped.require_backward_grad_sync
        with strategy.backward_context(wrapped, last=True):
            assert wrapped.require_backward_grad_sync
        # a DDP model given in one process keeps its no_sync too
        assert not isinstance(SingleProcess().backward_context(wrapped, last=False),
                              contextlib.nullcontext)  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_fsdp2_units_are_the_blocks_or_the_children_that_hold_parameters():
    """Which submodules fully_shard makes units of their own (the root takes the rest)."""
    from fastopt.train.gpt import build_model
    from fastopt.train.strategy import shard_units

    gpt = build_model(vocab_size=11, block_size=8, n_layer=3, n_head=2, n_embd=8)
    assert shard_units(gpt) == list(gpt.blocks)
    mlp = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2))
    assert shard_units(mlp) == [mlp[0], mlp[2]]  # GELU holds no parameter
    tied = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 3), nn.Linear(4, 5, bias=False))
    tied[2].weight = tied[0].weight  # a parameter belongs to one unit: both stay in the root's
    assert shard_units(tied) == [tied[1]]


def test_a_run_from_before_the_parallel_key_keeps_its_fingerprint():
    """run.json of a run made before ``parallel`` existed: its default must not change the
    fingerprint, or such runs would no longer resume."""
    import hashlib
    import json

    from fastopt.train.config import NOT_FINGERPRINTED, TrainConfig, fingerprint, pinned_config

    cfg = TrainConfig(job="mlp")
    old = {k: v for k, v in pinned_config(cfg).items() if k not in (*NOT_FINGERPRINTED, "parallel")}
    later = (
        "master_weights",
        "state_dtype",
        "min_8bit_size",
        "stochastic_rounding",
        "offload",
        "overlap",
    )
    old["optimizer"] = {k: v for k, v in old["optimizer"].items() if k not in later}  # newer keys
    blob = json.dumps({"config": old, "extra": {}}, sort_keys=True, default=str)
    assert fingerprint(cfg) == hashlib.sha256(blob.encode()).hexdigest()[:16]
    assert fingerprint(TrainConfig(job="mlp", parallel="fsdp2")) != fingerprint(cfg)
