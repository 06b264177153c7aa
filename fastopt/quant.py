"""8-bit moments, block by block: the oracle the kernels of ``state_dtype="int8"`` will follow.

**Format.** Each block of ``BLOCK`` consecutive elements shares a power-of-two scale, kept as
its exponent in one int8 (as the OCP microscaling formats do), and each element is one byte:

* ``exp_avg``: an fp8 E4M3 code (sign, 4 exponent bits of bias 7, 3 mantissa bits, subnormals;
  codes 0x79-0x7E unused, 0x7F NaN) of the value times 2**-scale, rounded to nearest even:
  relative error at most 2**-4 for every value within 2**13 of its block's largest, and non-zero
  above 2**-17 of it.
* ``exp_avg_sq``: the same for its square root, unsigned E4M4 (4 exponent bits of bias 7, 4
  mantissa bits, subnormals; 0xFF NaN): the step needs sqrt(v) anyway, so storing it costs no
  extra square root; the denominator's relative error is at most 2**-5 for v within 2**26 of
  its block's largest, and v stays non-zero above 2**-36 of it, so a small v beside a large
  one does not flush to zero, which would turn its update into m / eps.

The scale is floor(log2(block max)) - 7, clamped to [-100, 120], so the block's largest
magnitude lands in [128, 256) and no scaled or restored value is an fp32 subnormal (whose
handling differs between devices). Multiplying by a power of two is exact: every backend
gets these bits with integer operations and exact scalings alone, no division and no lookup
table. bench/int8_maps.py measured why this map and ``BLOCK``, and why the step rounds the
codes stochastically (``noise16``): rounded to nearest, exp_avg_sq's running average stops
growing once a step's increment is under half a code's step (bench/RESULTS.md).

:class:`QuantizedMoment` is how a state dict carries a moment's codes and scales: a tensor of
the moment's shape and dtype fp32 whose every operation sees the dequantized values, so
torch.optim.AdamW loads it as the moment it stands for, while fastopt takes the codes back.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

__all__ = [
    "BLOCK",
    "QuantizedMoment",
    "SCALE_MAX",
    "SCALE_MIN",
    "block_scales",
    "dcp_chunks",
    "dcp_write_items",
    "dequantize_m",
    "dequantize_v",
    "quantize_m",
    "quantize_v",
]

# Elements per block. 32 as in the OCP MX formats; bench/int8_maps.py compares others.
BLOCK = 32
# The scale exponent's range: 2**-100 keeps every restored value an fp32 normal.
SCALE_MIN, SCALE_MAX = -100, 120
# The largest finite code's magnitude after scaling is 256 (a block's max rounds up to it).
_M_NAN, _V_NAN = 0x7F, 0xFF


def _bits(x: Tensor) -> Tensor:
    return x.contiguous().view(torch.int32).long() & 0xFFFFFFFF


def _from_bits(b: Tensor) -> Tensor:
    return (b & 0xFFFFFFFF).to(torch.int64).to(torch.int32).view(torch.float32)


def _pad(x: Tensor, block: int, value: float = 0.0) -> Tensor:
    """x (1-D) padded to whole blocks, as rows of ``block``."""
    n = x.numel()
    rows = -(-n // block)
    out = torch.full((rows * block,), value, dtype=x.dtype, device=x.device)
    out[:n] = x
    return out.view(rows, block)


def block_scales(magnitudes: Tensor) -> Tensor:
    """The int8 scale exponent of each block (row) of non-negative fp32 ``magnitudes``, NaN
    counted as 0: floor(log2(max)) - 7, clamped to [SCALE_MIN, SCALE_MAX]."""
    finite_or_inf = torch.where(magnitudes == magnitudes, magnitudes, 0.0)
    top = finite_or_inf.amax(dim=1)
    exponent = ((_bits(top) >> 23) & 0xFF) - 127  # floor(log2) of a normal; -127 for 0
    return (exponent - 7).clamp(SCALE_MIN, SCALE_MAX).to(torch.int8)


def _pow2(e: Tensor) -> Tensor:
    """2.0**e as fp32, for integer e in [-126, 127], exactly."""
    return _from_bits((e.long() + 127) << 23)


def _encode(a: Tensor, mantissa_bits: int, noise16: Tensor | None = None) -> Tensor:
    """Non-negative fp32 ``a`` (at most 256, or inf/NaN) to the unsigned float code with 4
    exponent bits of bias 7 and ``mantissa_bits``: the magnitude bits of E4M3 (3) or of E4M4
    (4). Rounded to nearest even, or with ``noise16`` (integers in [0, 2**16)) stochastically:
    up with probability equal to the distance from the code below in units of the step
    between the two, resolved to 2**-16 of it (the bits below are dropped)."""
    shift = 23 - mantissa_bits
    b = _bits(a)
    if noise16 is None:
        normal = (b + ((1 << (shift - 1)) - 1) + ((b >> shift) & 1)) >> shift
    else:
        normal = (b + (noise16.long() << (shift - 16))) >> shift
    normal = normal - ((127 - 7) << mantissa_bits)
    # Below 2**-6, the subnormal codes k * 2**-(6 + mantissa_bits): a * 2**(6 + mantissa_bits)
    # rounded to the nearest integer, ties to even (2**23 aligns the fp32 sum's ulp to 1), or
    # a * 2**(22 + mantissa_bits) truncated (the scaling is exact; the value is below 2**20)
    # plus the noise, over 2**16.
    if noise16 is None:
        scaled = a * float(2 ** (6 + mantissa_bits))
        sub = ((scaled + 2.0**23) - 2.0**23).long()
    else:
        fixed = (a * float(2 ** (22 + mantissa_bits))).long()
        sub = (fixed + noise16.long()) >> 16
    return torch.where(a < 2.0**-6, sub, normal)


def _decode(code: Tensor, mantissa_bits: int) -> Tensor:
    """The magnitude of an unsigned float code (inverse of _encode for finite codes)."""
    code = code.long()
    exponent = code >> mantissa_bits
    mantissa = code & ((1 << mantissa_bits) - 1)
    normal = _from_bits(((exponent + 127 - 7) << 23) | (mantissa << (23 - mantissa_bits)))
    sub = mantissa.to(torch.float32) * float(2.0 ** -(6 + mantissa_bits))
    return torch.where(exponent == 0, sub, normal)


def _noise_rows(noise16: Tensor | None, block: int) -> Tensor | None:
    return None if noise16 is None else _pad(noise16.reshape(-1).long(), block)


def quantize_m(
    x: Tensor, block: int = BLOCK, noise16: Tensor | None = None, scale: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """fp32 ``x`` (any shape) to (uint8 codes of x's shape, int8 scale per block), rounded to
    nearest even, or stochastically with ``noise16`` (x's shape, integers in [0, 2**16)).
    ``scale``: the blocks' scales, given (a block cut by a shard boundary takes the whole
    block's), instead of x's own."""
    flat = x.reshape(-1).to(torch.float32)
    rows = _pad(flat, block)
    scale = block_scales(rows.abs()) if scale is None else scale.to(torch.int8)
    y = rows * _pow2(-scale.long()).unsqueeze(1)  # exact: a power of two, no subnormal
    magnitude = _encode(y.abs(), 3, _noise_rows(noise16, block))
    sign = (_bits(y) >> 31) << 7
    code = torch.where(torch.isfinite(y), sign | magnitude, _M_NAN)
    return code.reshape(-1)[: flat.numel()].to(torch.uint8).view(x.shape), scale


def dequantize_m(code: Tensor, scale: Tensor, block: int = BLOCK) -> Tensor:
    """uint8 ``code`` and int8 ``scale`` (per block) to fp32 of code's shape."""
    flat = code.reshape(-1).long()
    rows = _pad(flat, block)
    magnitude = _decode(rows & 0x7F, 3)
    value = torch.where((rows & 0x80) != 0, -magnitude, magnitude)
    value = torch.where((rows & 0x7F) == _M_NAN, float("nan"), value)
    value = value * _pow2(scale.long()).unsqueeze(1)
    return value.reshape(-1)[: flat.numel()].view(code.shape)


def quantize_v(
    root: Tensor, block: int = BLOCK, noise16: Tensor | None = None, scale: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``root`` = sqrt(exp_avg_sq), non-negative fp32 (any shape), to (uint8 codes, int8 scale
    per block), rounded and scaled as quantize_m's."""
    flat = root.reshape(-1).to(torch.float32)
    rows = _pad(flat, block)
    scale = block_scales(rows) if scale is None else scale.to(torch.int8)
    y = rows * _pow2(-scale.long()).unsqueeze(1)
    code = torch.where(torch.isfinite(y), _encode(y, 4, _noise_rows(noise16, block)), _V_NAN)
    return code.reshape(-1)[: flat.numel()].to(torch.uint8).view(root.shape), scale


def dequantize_v(code: Tensor, scale: Tensor, block: int = BLOCK) -> Tensor:
    """exp_avg_sq from its codes and scales: the restored square root, squared."""
    flat = code.reshape(-1).long()
    rows = _pad(flat, block)
    root = _decode(rows, 4)
    root = torch.where(rows == _V_NAN, float("nan"), root) * _pow2(scale.long()).unsqueeze(1)
    return (root * root).reshape(-1)[: flat.numel()].view(code.shape)


class QuantizedMoment(Tensor):
    """A moment held as 8-bit ``codes`` (uint8, the moment's shape) and per-block ``scales``
    (int8): ``kind`` "m" for exp_avg's codes, "v" for exp_avg_sq's (and max_exp_avg_sq's).

    It presents itself as the fp32 tensor it stands for: any torch operation on it (``.to``,
    arithmetic, ``torch.equal``) runs on :meth:`dequantize`'s result. Saved with torch.save it
    keeps the codes (about a byte per element); ``torch.load(weights_only=True)`` reads it
    back once fastopt is imported.
    """

    codes: Tensor
    scales: Tensor
    kind: str

    @staticmethod
    def __new__(cls, codes: Tensor, scales: Tensor, kind: str):
        if kind not in ("m", "v"):
            raise ValueError(f"QuantizedMoment: kind must be 'm' or 'v', got {kind!r}")
        if codes.dtype != torch.uint8 or scales.dtype != torch.int8:
            raise ValueError(
                f"QuantizedMoment: codes must be uint8 and scales int8, got {codes.dtype} and "
                f"{scales.dtype}"
            )
        if scales.numel() != -(-codes.numel() // BLOCK):
            raise ValueError(
                f"QuantizedMoment: {codes.numel()} codes need {-(-codes.numel() // BLOCK)} "
                f"scales, got {scales.numel()}"
            )
        self = Tensor._make_wrapper_subclass(cls, codes.shape, dtype=torch.float32,
                                             device=codes.device)  # fmt: skip
        self.codes, self.scales, self.kind = codes, scales.reshape(-1), kind
        return self

    def dequantize(self) -> Tensor:
        """The fp32 moment (exp_avg, or exp_avg_sq: the restored square root squared)."""
        restore = dequantize_m if self.kind == "m" else dequantize_v
        return restore(self.codes, self.scales)

    # Python-level functions and methods are taken here, before torch's own handling: a no-op
    # ``.to(torch.float32)`` would otherwise return this tensor itself, and torch.optim.AdamW
    # would then update a temporary in place at every step. Metadata reads pass through.
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if func is Tensor.clone and not kwargs:  # a copy of the same moment, still 8-bit
            source = args[0]
            return QuantizedMoment(source.codes.clone(), source.scales.clone(), source.kind)
        return func(*tree_map(_plain, args), **tree_map(_plain, kwargs))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return func(*tree_map(_plain, args), **tree_map(_plain, kwargs or {}))

    def __reduce_ex__(self, protocol):
        return _rebuild_quantized_moment, (self.codes, self.scales, self.kind)

    # torch.distributed.checkpoint saves and loads the codes, not the fp32 values (which would
    # be 4x the bytes, and re-quantized on load): the state dict's ``scales`` entry carries
    # the scales beside them.
    def __create_write_items__(self, fqn: str, obj) -> list:
        return dcp_write_items(fqn, self.codes, (0,) * self.codes.dim(), self.codes.shape)

    def __create_chunk_list__(self) -> list:
        return dcp_chunks(self.codes, (0,) * self.codes.dim())

    def __get_tensor_shard__(self, index) -> Tensor:
        return self.codes

    def __deepcopy__(self, memo):
        return QuantizedMoment(self.codes.clone(), self.scales.clone(), self.kind)

    def __repr__(self) -> str:
        return (f"QuantizedMoment(kind={self.kind!r}, shape={tuple(self.shape)}, "
                f"device={self.device})")  # fmt: skip


def _plain(x):
    return x.dequantize() if isinstance(x, QuantizedMoment) else x


_METADATA = frozenset({
    Tensor.shape.__get__, Tensor.dtype.__get__, Tensor.device.__get__, Tensor.ndim.__get__,
    Tensor.requires_grad.__get__, Tensor.layout.__get__, Tensor.size, Tensor.dim, Tensor.numel,
    Tensor.is_floating_point, Tensor.is_complex, Tensor.element_size,
})  # fmt: skip


def _rebuild_quantized_moment(codes: Tensor, scales: Tensor, kind: str) -> QuantizedMoment:
    return QuantizedMoment(codes, scales, kind)


# Checkpoints holding 8-bit moments load with torch.load(weights_only=True).
torch.serialization.add_safe_globals([_rebuild_quantized_moment])


def dcp_chunks(local: Tensor, offsets: tuple[int, ...]) -> list:
    """torch.distributed.checkpoint's description of ``local`` as the chunk of a larger
    tensor at ``offsets`` (none for an empty one)."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    if local.numel() == 0:
        return []
    return [ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=local.shape)]


def dcp_write_items(fqn: str, local: Tensor, offsets: tuple[int, ...], size) -> list:
    """torch.distributed.checkpoint's write request for ``local``, the chunk at ``offsets`` of
    a tensor of ``size`` saved under ``fqn``."""
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

    return [
        WriteItem(
            index=MetadataIndex(fqn, chunk.offsets),
            type=WriteItemType.SHARD,
            tensor_data=TensorWriteData(
                chunk=chunk,
                properties=TensorProperties.create_from_tensor(local),
                size=torch.Size(size),
            ),
        )  # fmt: skip
        for chunk in dcp_chunks(local, offsets)
    ]
