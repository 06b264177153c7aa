"""The parallelism strategies' three calls. DDP across real processes (bit-exact resume, the
CLI under torchrun) is tests/test_ddp.py; here a one-process gloo group checks the wrapping."""

import contextlib
import socket

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from fastopt.train.parallel import DataParallel, SingleProcess, choose_strategy


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
