"""The cut-block path of 8-bit shards (fastopt/blocks.py) on every backend and device: two
shards of each param, stepped by two threads as two ranks would (a shard's whole blocks
through the backend's kernel, its cut blocks' pieces through the reference, their scales
combined by an all-reduce stood in for here), against the whole params stepped by the same
backend. Bit for bit: codes, every block's scale, params and masters. With gloo and real
DTensors this runs on the cpu backend in tests/test_fsdp_int8.py; this is the same path on
the device backends, where one machine has one GPU."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import BACKENDS

from fastopt import blocks
from fastopt.backends import backend_ops
from fastopt.quant import BLOCK
from fastopt.step_args import Hyper, Lean

SHAPES = [(70, 50), (50, 70), (64, 32), (7, 5), (3,)]
STEPS = 3
RANKS = 2


class _TwoThreads:
    """dist.all_reduce(MAX) between the threads that stand for the ranks."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(RANKS)
        self.buffers: dict[int, torch.Tensor] = {}
        self.local = threading.local()

    def all_reduce(self, tensor, op=None, group=None):
        self.buffers[self.local.rank] = tensor.clone()
        self.barrier.wait()
        combined = torch.stack([self.buffers[r] for r in range(RANKS)]).amax(dim=0)
        self.barrier.wait()
        tensor.copy_(combined)


def _rows(shape, rank):
    """The rank's rows of a param of ``shape`` as FSDP2 splits dim 0 (torch.chunk)."""
    size = shape[0]
    chunk = -(-size // RANKS)
    return min(rank * chunk, size), min((rank + 1) * chunk, size)


def _data(device, dtype):
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in SHAPES] for _ in range(STEPS)]
    return [t.to(device) for t in init], [[g.to(device) for g in gs] for gs in grads]


def _state(params, master, scale_columns):
    """Zero 8-bit state for ``params``: codes, scales of ``scale_columns[i]`` blocks, masters."""
    codes = [[torch.zeros_like(p, dtype=torch.uint8) for p in params] for _ in range(2)]
    scales = [torch.zeros((2, n), dtype=torch.int8, device=p.device)
              for p, n in zip(params, scale_columns)]  # fmt: skip
    masters = [torch.zeros_like(p, dtype=torch.int16) for p in params] if master else []
    steps = [torch.zeros((), device=p.device) for p in params]
    return codes, scales, masters, steps


HYPER = Hyper(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=1e-2, eps=1e-8)


@pytest.mark.parametrize("master", [False, True], ids=["fp32", "bf16-master"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_cut_blocks_of_two_shards_are_the_whole_params_blocks(backend, device, master,
                                                              monkeypatch):  # fmt: skip
    ops = backend_ops(backend)
    dtype = torch.bfloat16 if master else torch.float32
    init, grads = _data(device, dtype)
    positions = list(range(len(SHAPES)))

    # The whole params, by the backend alone.
    whole = [t.clone() for t in init]
    (m, v), scales, masters, steps = _state(whole, master, [-(-t.numel() // BLOCK) for t in whole])
    lean = Lean(masters=masters, seed=9, positions=positions, scales=scales)
    for gs in grads:
        ops.adamw_step(whole, gs, m, v, [], steps, HYPER, lean)

    group = _TwoThreads()
    monkeypatch.setattr(blocks.dist, "all_reduce", group.all_reduce)
    results, errors, kernel = {}, [], threading.Lock()

    def rank_run(rank):
        try:
            group.local.rank = rank
            width = [t.numel() // t.shape[0] for t in init]
            spans = [_rows(t.shape, rank) for t in init]
            firsts = [lo * w for (lo, _), w in zip(spans, width)]
            params = [t[lo:hi].clone() for t, (lo, hi) in zip(init, spans)]
            layouts = []
            for t, p, first, w in zip(init, params, firsts, width):
                bounds = [_rows(t.shape, r)[0] * w for r in range(RANKS)]
                layout = blocks.ShardBlocks(first, p.numel(), t.numel(), bounds, None)
                layouts.append(layout if layout.slots else None)
            body_blocks = [lay.body_blocks if lay else -(-p.numel() // BLOCK)
                           for lay, p in zip(layouts, params)]  # fmt: skip
            (cm, cv), body, cmasters, csteps = _state(params, master, body_blocks)
            cut = [torch.zeros((2, len(lay.pieces)), dtype=torch.int8, device=device)
                   if lay else None for lay in layouts]  # fmt: skip
            cuts = blocks.CutBlocks(layouts)
            for gs in grads:
                local = [g[lo:hi] for g, (lo, hi) in zip(gs, spans)]
                shard_lean = Lean(masters=cmasters, seed=9, positions=positions,
                                  first_indices=firsts, scales=body)  # fmt: skip
                lists = [params, local, cm, cv, [], cmasters]
                (p, g, a, b, c), counts, body_lean = cuts.split(lists, csteps, cut, HYPER,
                                                                shard_lean)  # fmt: skip
                with kernel:  # one kernel at a time (Triton's interpreter is not thread-safe)
                    ops.adamw_step(p, g, a, b, c, counts, HYPER, body_lean)
            results[rank] = (spans, firsts, layouts, params, cm, cv, body, cut, cmasters, csteps)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=rank_run, args=(r,)) for r in range(RANKS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]

    cut_blocks = 0
    for rank in range(RANKS):
        spans, firsts, layouts, params, cm, cv, body, cut, cmasters, csteps = results[rank]
        for i, (lo, hi) in enumerate(spans):
            assert torch.equal(params[i], whole[i][lo:hi])
            assert torch.equal(cm[i], m[i][lo:hi]) and torch.equal(cv[i], v[i][lo:hi])
            if master:
                assert torch.equal(cmasters[i], masters[i][lo:hi])
            assert float(csteps[i]) == STEPS
            layout = layouts[i]
            start = firsts[i] + (layout.body[0] if layout else 0)
            if body[i].numel():
                assert torch.equal(body[i], scales[i][:, start // BLOCK :][:, : body[i].shape[1]])
            for column, (a, _, _) in enumerate(layout.pieces if layout else ()):
                block = (firsts[i] + a) // BLOCK
                assert torch.equal(cut[i][:, column], scales[i][:, block])
                cut_blocks += 1
    assert cut_blocks == 2 * 4  # 70x50, 50x70, 7x5 and 3 cut a block each; 64x32 does not
