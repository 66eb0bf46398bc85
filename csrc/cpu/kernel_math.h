// Scalar helpers shared by the per-ISA CPU kernels: exact loads of bf16/fp16 logits, a
// vectorisable exp, and round-to-nearest-even stores back to the 16-bit types.
//
// Included by translation units that are compiled once per instruction set (RANKOPS_ISA);
// everything lands in that ISA's namespace, so the builds never share a symbol. The code is
// branch-free (bitwise blends rather than ternaries) so that GCC vectorises the loops that
// call it on every ISA, SSE2 included.
#pragma once
#include <cstdint>
#include <type_traits>

#ifndef RANKOPS_ISA
#error "RANKOPS_ISA must name the instruction set this translation unit is built for"
#endif

namespace rankops {
namespace cpu {
namespace RANKOPS_ISA {
namespace {

inline float bits_to_float(uint32_t b) { return __builtin_bit_cast(float, b); }
inline uint32_t float_to_bits(float f) { return __builtin_bit_cast(uint32_t, f); }

// bf16 is the top half of an fp32: the upcast is exact.
inline float load_value(const uint16_t* p, std::true_type /*is_bf16*/) {
  return bits_to_float(static_cast<uint32_t>(*p) << 16);
}
// fp16 -> fp32, exact, branch-free so it vectorises: shifting the 15 magnitude bits into an
// fp32 bit pattern and multiplying by 2^112 rebias the exponent (15 -> 127) and normalises
// subnormals in one step; inf/NaN (exponent all ones) get the fp32 all-ones exponent instead.
inline float load_value(const uint16_t* p, std::false_type /*is_bf16*/) {
  const uint32_t h = *p;
  const uint32_t magnitude = (h & 0x7fffu) << 13;
  const uint32_t sign = (h & 0x8000u) << 16;
  const float scaled = bits_to_float(magnitude) * 0x1p112f;
  const uint32_t special = magnitude | 0x7f800000u;
  // A bitwise blend rather than a ternary, so that SSE2/AVX2 builds vectorise it too.
  const uint32_t is_special = 0u - static_cast<uint32_t>((h & 0x7c00u) == 0x7c00u);
  const uint32_t bits = (is_special & special) | (~is_special & float_to_bits(scaled));
  return bits_to_float(bits | sign);
}
inline float load_value(const float* p, std::false_type) { return *p; }

// exp(x) for x in [-87, 88] (x is a logit minus the row's reference value). Cody-Waite
// reduction x = n ln2 + r, |r| <= ln2/2, then a degree-6 minimax polynomial for exp(r)
// (Cephes' expf coefficients, about 1 ulp), then the 2^n scale built in the exponent bits.
// Clamping below at -87 keeps 2^n a normal number: such terms are 38 orders of magnitude under
// the reference term. NaN propagates (NaN < c is false), which the non-finite check relies on.
// The clamp is a bitwise blend: written as a ternary, GCC (without -ffast-math) if-converts it
// only for AVX-512 and leaves the SSE2/AVX2 loops scalar.
inline float exp_bounded(float x) {
  const uint32_t below = 0u - static_cast<uint32_t>(x < -87.0f);
  x = bits_to_float((below & float_to_bits(-87.0f)) | (~below & float_to_bits(x)));
  // Adding 1.5 * 2^23 rounds x*log2(e) to the nearest integer, which lands in the low
  // mantissa bits; subtracting it back gives that integer as a float.
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  const int32_t n_int = static_cast<int32_t>(float_to_bits(shifted)) - 0x4B400000;
  float r = x - n * 0.693359375f;   // ln2 split in a short high part (exact product) ...
  r = r - n * -2.12194440e-4f;      // ... and the remainder
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const float scale = bits_to_float(static_cast<uint32_t>(n_int + 127) << 23);
  return y * scale;
}

// fp32 -> bf16, round to nearest even: add half an ulp of the kept part (minus one when the
// kept part is even, so ties go to even) and truncate. NaN stays a quiet NaN.
inline void store_value(uint16_t* p, float f, std::true_type /*is_bf16*/) {
  const uint32_t b = float_to_bits(f);
  const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
  const uint32_t is_nan = 0u - static_cast<uint32_t>((b & 0x7fffffffu) > 0x7f800000u);
  *p = static_cast<uint16_t>((is_nan & ((b >> 16) | 0x40u)) | (~is_nan & rounded));
}
// fp32 -> fp16, round to nearest even, in three candidates blended by range:
//  - normal results: rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits;
//    a carry out of the mantissa rolls into the exponent, up to inf at 65520 and above;
//  - subnormal results (|f| < 2^-14): adding 0.5 lines the fp16 subnormal grid up with the
//    fp32 mantissa's last bit, so the FPU's own rounding does the work;
//  - |f| >= 65536, inf and NaN: inf, or a quiet NaN.
inline void store_value(uint16_t* p, float f, std::false_type /*is_bf16*/) {
  const uint32_t b = float_to_bits(f);
  const uint32_t sign = (b >> 16) & 0x8000u;
  const uint32_t mag = b & 0x7fffffffu;
  const uint32_t normal = (mag + 0xc8000fffu + ((mag >> 13) & 1u)) >> 13;  // 0xc8000000 = -112 << 23
  const uint32_t subnormal = float_to_bits(bits_to_float(mag) + 0.5f) - 0x3f000000u;
  const uint32_t special = 0x7c00u | ((0u - static_cast<uint32_t>(mag > 0x7f800000u)) & 0x0200u);
  const uint32_t is_small = 0u - static_cast<uint32_t>(mag < 0x38800000u);
  const uint32_t is_big = 0u - static_cast<uint32_t>(mag >= 0x47800000u);
  const uint32_t h = (is_big & special) | (~is_big & ((is_small & subnormal) | (~is_small & normal)));
  *p = static_cast<uint16_t>(h | sign);
}
inline void store_value(float* p, float f, std::false_type) { *p = f; }

}  // namespace
}  // namespace RANKOPS_ISA
}  // namespace cpu
}  // namespace rankops
