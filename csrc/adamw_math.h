// The AdamW update rule, written once for host and device.
//
// The CPU kernel (csrc/cpu/) and the CUDA kernels (csrc/cuda/) both call these functions, so
// the CPU tests exercise the very arithmetic the GPU runs. Everything here is plain scalar
// fp32 code: the callers load and convert storage dtypes, and handle vectors and tails.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FASTOPT_HD __host__ __device__ __forceinline__
#else
#define FASTOPT_HD inline
#endif

namespace fastopt {

FASTOPT_HD bool finite(float x) {
#if defined(__CUDA_ARCH__)
  return isfinite(x);
#else
  return std::isfinite(x);
#endif
}

// torch.nn.utils.clip_grad_norm_ divides by (norm + 1e-6); kept so clipped steps match it.
constexpr float kClipEps = 1e-6f;

// Per-step constants of one tensor's update, computed once per tensor (CPU) or per block
// (CUDA) rather than per element.
struct AdamWCoeffs {
  float decay;            // 1 - lr * weight_decay: decoupled weight decay
  // exp_avg = lerp(exp_avg, g, w) with w = 1 - beta1, in torch's two forms: from exp_avg,
  // m + w * (g - m), when w < 0.5; from the gradient, g + (w - 1) * (g - m), otherwise. The
  // first form cancels when |g| << |m| and w is large (beta1 <= 0.5: 2.4e-2 relative error
  // at beta1 = 0), which is why torch switches. (w - 1) * x is -((1 - w) * x) exactly, so
  // this is torch's g - (g - m) * (1 - w) to the bit.
  float lerp_coef;    // w, or w - 1
  bool lerp_from_m;   // w < 0.5
  float beta2;
  float one_minus_beta2;
  float step_size;        // lr / (1 - beta1^step)
  float inv_bc2_sqrt;     // 1 / sqrt(1 - beta2^step)
  float eps;
  float grad_coef;        // unscale * clip * accumulation factor, negated for maximize
};

// The factor every stored gradient is multiplied by: grad_factor / grad_scale, times the
// clip factor when clipping is on. grad_norm is the norm of the gradients as stored (still
// scaled), so the true norm is grad_norm * coef. Null pointers mean "absent".
FASTOPT_HD float grad_coefficient(const float* grad_scale, const float* grad_norm,
                                  float max_grad_norm, float grad_factor) {
  float coef = grad_factor;
  if (grad_scale != nullptr) coef = coef / *grad_scale;
  if (grad_norm != nullptr && max_grad_norm > 0.f) {
    const float clip = max_grad_norm / (*grad_norm * coef + kClipEps);
    if (clip < 1.f) coef = coef * clip;
  }
  return coef;
}

// Bias corrections in double, as torch computes them from a Python float: in fp32,
// 1 - 0.999f^1 is off by 1.3e-5 relative because 0.999f itself is inexact.
FASTOPT_HD AdamWCoeffs adamw_coeffs(double lr, double beta1, double beta2, double weight_decay,
                                    double eps, double step, float grad_coef, bool maximize) {
  AdamWCoeffs c;
  c.decay = static_cast<float>(1.0 - lr * weight_decay);
  // w in fp32 first, as torch passes its Python-float weight to an fp32 lerp; w - 1 is then
  // exact (Sterbenz) for every w >= 0.5.
  const float w = static_cast<float>(1.0 - beta1);
  c.lerp_from_m = w < 0.5f;
  c.lerp_coef = c.lerp_from_m ? w : w - 1.f;
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  c.step_size = static_cast<float>(lr / (1.0 - pow(beta1, step)));
  c.inv_bc2_sqrt = static_cast<float>(1.0 / sqrt(1.0 - pow(beta2, step)));
  c.eps = static_cast<float>(eps);
  // -(g * c) == g * (-c) exactly in IEEE arithmetic, so maximize costs nothing per element.
  c.grad_coef = maximize ? -grad_coef : grad_coef;
  return c;
}

// One element's update, in the order of torch.optim.AdamW's for-loop implementation so fp32
// results agree with it to rounding. vmax is read and written only when kAmsgrad.
// `root` receives sqrt of the second moment the denominator used (vmax when kAmsgrad): 8-bit
// states store that square root, so the step takes it from here instead of a second sqrt.
template <bool kAmsgrad>
FASTOPT_HD void adamw_math(float& p, float grad, float& m, float& v, float& vmax,
                           const AdamWCoeffs& c, float& root) {
  const float g = grad * c.grad_coef;
  p = p * c.decay;
  m = (c.lerp_from_m ? m : g) + c.lerp_coef * (g - m);  // torch's lerp(m, g, 1 - beta1)
  v = v * c.beta2 + c.one_minus_beta2 * (g * g);
  float second = v;
  if (kAmsgrad) {
    vmax = vmax > v ? vmax : v;
    second = vmax;
  }
  // A multiply by the reciprocal instead of torch's division: one division per element
  // instead of two (1 ulp apart), which took the CPU kernel from compute-bound to par.
  root = sqrtf(second);
  const float denom = root * c.inv_bc2_sqrt + c.eps;
  p = p - c.step_size * (m / denom);
}

template <bool kAmsgrad>
FASTOPT_HD void adamw_math(float& p, float grad, float& m, float& v, float& vmax,
                           const AdamWCoeffs& c) {
  float root;
  adamw_math<kAmsgrad>(p, grad, m, v, vmax, c, root);
}

// ---- Rounding into 16-bit storage: fastopt/rounding.py is the oracle and explains why. ----

FASTOPT_HD uint32_t f32_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
#endif
}

FASTOPT_HD float bits_f32(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
#endif
}

// lowbias32 (Chris Wellons): the counter-based hash behind the stochastic-rounding noise.
FASTOPT_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

// Two noise words per element: (param << 16 | exp_avg) and (exp_avg_sq << 16 | max_exp_avg_sq).
constexpr uint32_t kStreamParamMoment1 = 0;
constexpr uint32_t kStreamMoments2 = 1;

// A 64-bit seed folded to 32 bits (rounding.seed_key).
FASTOPT_HD uint32_t seed_key(uint64_t seed) {
  return mix32(static_cast<uint32_t>(seed) ^ mix32(static_cast<uint32_t>(seed >> 32)));
}

// One tensor's noise key at one step (rounding.noise_key); `step` is the count after it.
FASTOPT_HD uint32_t noise_key(uint32_t seed32, uint32_t position, uint32_t step, uint32_t stream) {
  uint32_t k = mix32(seed32 ^ position);
  k = mix32(k ^ step);
  return mix32(k ^ stream);
}

// The key of the elements [2**32 * hi, 2**32 * (hi + 1)) of a tensor (rounding.element_noise):
// the element's noise word is then mix32(key ^ low 32 bits of its index).
FASTOPT_HD uint32_t noise_key_for_high_word(uint32_t key, uint32_t hi) {
  return hi == 0 ? key : key ^ mix32(hi);
}

// fp32 to bf16 bits, rounded up in magnitude with probability (distance to the bf16 below) /
// ulp, from 16 noise bits. NaN stays NaN.
FASTOPT_HD uint16_t bf16_stochastic(float x, uint32_t noise16) {
  const uint32_t top = (f32_bits(x) + noise16) >> 16;
  return x != x ? uint16_t{0x7FC0} : static_cast<uint16_t>(top);
}

// An fp32 master into bf16 bits (the master rounded to nearest even) and an int16 remainder,
// an exact tie first moved one ulp the way it rounds (rounding.split_master).
FASTOPT_HD void split_master(float x, uint16_t& param_bits, int16_t& remainder) {
  uint32_t b = f32_bits(x);
  const bool tie = (b & 0xFFFFu) == 0x8000u;
  const bool up = ((b >> 16) & 1u) != 0;
  b = tie ? (up ? b + 1u : b - 1u) : b;
  const uint32_t top = (b + 0x8000u) >> 16;
  const bool nan = x != x;
  param_bits = nan ? uint16_t{0x7FC0} : static_cast<uint16_t>(top);
  remainder = nan ? int16_t{0} : static_cast<int16_t>(static_cast<uint16_t>(b - (top << 16)));
}

// The fp32 master of bf16 bits and their int16 remainder (rounding.join_master).
FASTOPT_HD float join_master(uint16_t param_bits, int16_t remainder) {
  return bits_f32((static_cast<uint32_t>(param_bits) << 16) +
                  static_cast<uint32_t>(static_cast<int32_t>(remainder)));
}

// ---- 8-bit moments: fastopt/quant.py is the oracle and explains the format. ----
// A block of kQuantBlock elements shares a power-of-two scale 2**s (s an int8); exp_avg is an
// E4M3 code of m * 2**-s, exp_avg_sq an unsigned E4M4 code of sqrt(v) * 2**-s. Codes are
// always rounded stochastically from 16 noise bits (bench/int8_maps.py: rounded to nearest,
// exp_avg_sq's running average stalls). Integer operations and exact power-of-two scalings
// only, so every backend produces the same bytes.
constexpr int kQuantBlock = 32;
constexpr int kScaleMin = -100;
constexpr int kScaleMax = 120;
constexpr uint32_t kCodeNanM = 0x7F;  // with either sign bit
constexpr uint32_t kCodeNanV = 0xFF;

// 2**e as fp32 for integer e in [-126, 127], exactly.
FASTOPT_HD float pow2(int e) { return bits_f32(static_cast<uint32_t>(e + 127) << 23); }

// The magnitude bits a block's maximum is taken over: |x|'s bits, NaN counted as 0 (integer
// order is float order for non-negative floats, and integer maxima vectorise).
FASTOPT_HD int32_t magnitude_bits(float x) {
  const auto b = static_cast<int32_t>(f32_bits(x) & 0x7FFFFFFFu);
  return b > 0x7F800000 ? 0 : b;
}

// A block's scale exponent from the largest magnitude_bits: floor(log2(max)) - 7, clamped.
FASTOPT_HD int block_scale(int32_t max_bits) {
  const int e = static_cast<int>(max_bits >> 23) - 127 - 7;
  return e < kScaleMin ? kScaleMin : (e > kScaleMax ? kScaleMax : e);
}

// Non-negative finite a (at most 256; callers pass 0 for inf and NaN) to the unsigned float code with 4 exponent bits of bias 7
// and kMant mantissa bits, rounded up with probability (distance from the code below) / step.
template <int kMant>
FASTOPT_HD uint32_t encode_unsigned(float a, uint32_t noise16) {
  const uint32_t normal = ((f32_bits(a) + (noise16 << (7 - kMant))) >> (23 - kMant)) -
                          (uint32_t{127 - 7} << kMant);
  // Below 2**-6 the subnormal codes k * 2**-(6 + kMant): a * 2**(22 + kMant) is exact and
  // under 2**20, truncated, plus the noise, over 2**16.
  const auto fixed = static_cast<uint32_t>(static_cast<int32_t>(a * static_cast<float>(1 << (22 + kMant))));
  const uint32_t sub = (fixed + noise16) >> 16;
  return a < 0.015625f ? sub : normal;
}

// The magnitude of an unsigned code (encode_unsigned's inverse on codes).
template <int kMant>
FASTOPT_HD float decode_unsigned(uint32_t code) {
  const uint32_t exponent = code >> kMant;
  const uint32_t mantissa = code & ((1u << kMant) - 1u);
  const float normal = bits_f32(((exponent + 127 - 7) << 23) | (mantissa << (23 - kMant)));
  const float sub = static_cast<float>(mantissa) * (1.f / static_cast<float>(1 << (6 + kMant)));
  return exponent == 0 ? sub : normal;
}

// exp_avg: m * 2**-scale to its E4M3 code (sign bit 7); inf and NaN to the NaN code.
FASTOPT_HD uint8_t encode_m(float m, float inv_scale, uint32_t noise16) {
  const float y = m * inv_scale;
  const uint32_t sign = (f32_bits(y) >> 31) << 7;
  const bool ok = finite(y);
  const uint32_t code = sign | encode_unsigned<3>(ok ? (y < 0.f ? -y : y) : 0.f, noise16);
  return static_cast<uint8_t>(ok ? code : kCodeNanM);
}

FASTOPT_HD float decode_m(uint32_t code, float scale) {
  const float magnitude = decode_unsigned<3>(code & 0x7Fu);
  const float value = (code & 0x80u) != 0 ? -magnitude : magnitude;
  return ((code & 0x7Fu) == kCodeNanM ? bits_f32(0x7FC00000u) : value) * scale;
}

// exp_avg_sq: its square root times 2**-scale to the E4M4 code; inf and NaN to the NaN code.
FASTOPT_HD uint8_t encode_v(float root, float inv_scale, uint32_t noise16) {
  const float y = root * inv_scale;
  const bool ok = finite(y);
  return static_cast<uint8_t>(ok ? encode_unsigned<4>(ok ? y : 0.f, noise16) : kCodeNanV);
}

// exp_avg_sq from its code: the restored square root, squared.
FASTOPT_HD float decode_v(uint32_t code, float scale) {
  const float root = (code == kCodeNanV ? bits_f32(0x7FC00000u) : decode_unsigned<4>(code)) * scale;
  return root * root;
}

// Dynamic loss-scale update: torch._amp_update_scale_'s rule. The scale never grows past the
// fp32 range into inf.
FASTOPT_HD void update_scale(float* scale, int32_t* growth_tracker, float found_inf,
                             float growth_factor, float backoff_factor,
                             int64_t growth_interval) {
  if (found_inf != 0.f) {
    *scale = *scale * backoff_factor;
    *growth_tracker = 0;
    return;
  }
  const int32_t successful = *growth_tracker + 1;
  if (successful >= growth_interval) {
    const float grown = *scale * growth_factor;
    if (finite(grown)) *scale = grown;
    *growth_tracker = 0;
  } else {
    *growth_tracker = successful;
  }
}

}  // namespace fastopt
