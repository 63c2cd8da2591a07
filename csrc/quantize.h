// The quantized wires of the synchronous exchange (8, 4 or 2 bits a value): block-scaled with
// error feedback, written once for the CPU and CUDA launchers.
//
// The quantizer (exact, the same on every device and in ops.reference), with L and C of the
// width (quant_levels, quant_clamp: 127 and 127, 7 and 7, 2 and 1):
//   a block is kQuantBlock consecutive elements; m = max |v| over the block (float32);
//   m < kQuantTiny (or no element): scale = 0 and every q = 0 (the residual keeps the values);
//   otherwise inv = L / m and scale = m / L (float32 divisions, correctly rounded);
//   q = clamp(rint(v * inv), -C, C) (round half to even), dequantized as q * scale.
// Values narrower than a byte are packed little-end first: value j of a block sits in byte
// j * bits / 8 at bit (j % (8 / bits)) * bits, two's complement.
// No FMA anywhere (both builds disable contraction), so every device stores the same bytes.
//
// A piece of n elements is cut among `world` owners into chunks of `chunk` elements (a multiple
// of kQuantBlock; the last chunk padded). Its wire is `world` records, record w carrying chunk w:
//   [header: kHeaderBytes, float32 flag at 0][scales: chunk / kQuantBlock float32, padded to
//    kHeaderBytes][q: chunk values, bits / 8 bytes each (packed)]
// The sender's buffer holds record w for owner w (an all-to-all sends it there); each owner sums
// the records it received, re-quantizes its chunk with its own residual and publishes one
// record (an all-gather brings every rank every owner's record), so all ranks apply the same
// bytes and their center replicas stay bit-identical.
#pragma once

#include <cstdint>
#include <type_traits>

#include "elastic_ops.h"

namespace easgd {

constexpr int kQuantBlock = 256;
constexpr int kHeaderBytes = 64;
constexpr float kQuantTiny = 7.888609052210118e-31f;  // 2^-100: below it a block sends zeros

// The widths a value may have on the wire.
EASGD_HD constexpr bool valid_quant_bits(int bits) { return bits == 8 || bits == 4 || bits == 2; }
// A block's maximum m spans `quant_levels` scales (scale = m / L) and levels are clamped to
// -C..C, C = `quant_clamp`: 8 bits L = C = 127; 4 bits L = C = 7; 2 bits L = 2, C = 1 (the levels
// -m/2, 0, m/2). Zero is exact at every width. At 2 bits, L = 1 (levels -m, 0, m) overshoots up
// to 2x on values just above m/2, and the elastic exchange with error feedback diverged on it
// at beta = 0.9 (measured); with L = 2 it does not.
EASGD_HD constexpr float quant_levels(int bits) { return bits == 2 ? 2.f : float((1 << (bits - 1)) - 1); }
EASGD_HD constexpr float quant_clamp(int bits) { return float((1 << (bits - 1)) - 1); }

struct QuantLayout {
  int64_t n = 0;       // elements of the piece
  int64_t chunk = 0;   // elements per owner (multiple of kQuantBlock)
  int64_t record = 0;  // bytes per record
  int world = 1;
  int bits = 8;        // per value on the wire

  EASGD_HD static int64_t scales_bytes(int64_t chunk) {
    const int64_t raw = chunk / kQuantBlock * 4;
    return (raw + kHeaderBytes - 1) / kHeaderBytes * kHeaderBytes;
  }
  EASGD_HD static QuantLayout make(int64_t n, int world, int bits = 8) {
    QuantLayout l;
    l.n = n;
    l.world = world;
    l.bits = bits;
    const int64_t per_owner = (n + world - 1) / world;
    l.chunk = per_owner < 1 ? kQuantBlock : (per_owner + kQuantBlock - 1) / kQuantBlock * kQuantBlock;
    l.record = kHeaderBytes + scales_bytes(l.chunk) + l.chunk * bits / 8;
    return l;
  }
  EASGD_HD int64_t blocks() const { return (n + kQuantBlock - 1) / kQuantBlock; }
  EASGD_HD int64_t chunk_blocks() const { return chunk / kQuantBlock; }
  EASGD_HD int64_t q_offset() const { return kHeaderBytes + scales_bytes(chunk); }
  // Record w of a buffer of `world` records, and its parts.
  EASGD_HD static float* flag(uint8_t* rec) { return reinterpret_cast<float*>(rec); }
  EASGD_HD static const float* flag(const uint8_t* rec) { return reinterpret_cast<const float*>(rec); }
  EASGD_HD float* scales(uint8_t* rec) const { return reinterpret_cast<float*>(rec + kHeaderBytes); }
  EASGD_HD const float* scales(const uint8_t* rec) const {
    return reinterpret_cast<const float*>(rec + kHeaderBytes);
  }
  // The packed values of a record, and the byte where value j of the chunk starts (j a
  // multiple of 8 / bits: a block's start always is).
  EASGD_HD uint8_t* q(uint8_t* rec) const { return rec + q_offset(); }
  EASGD_HD const uint8_t* q(const uint8_t* rec) const { return rec + q_offset(); }
  EASGD_HD int64_t q_byte(int64_t j) const { return j * bits / 8; }
};

// Packing of `Bits`-wide values: `kPerByte` a byte. get() reads value j of a packed run;
// byte() packs kPerByte int8 levels into one byte.
template <int Bits>
struct Packing {
  static constexpr int kPerByte = 8 / Bits;
  EASGD_HD static int8_t get(const uint8_t* packed, int64_t j) {
    if constexpr (Bits == 8) {
      return int8_t(packed[j]);
    } else {
      const int shift = int(j % kPerByte) * Bits;
      // the value's bits to the top of a byte, then an arithmetic shift back: sign-extended
      return int8_t(int8_t(uint8_t(packed[j / kPerByte] << (8 - Bits - shift))) >> (8 - Bits));
    }
  }
  EASGD_HD static uint8_t byte(const int8_t* q) {  // kPerByte levels into one byte
    unsigned b = 0;
    for (int k = 0; k < kPerByte; ++k) b |= (unsigned(uint8_t(q[k])) & ((1u << Bits) - 1u)) << (k * Bits);
    return uint8_t(b);
  }
};

// Calls f(std::integral_constant<int, bits>{}) with a layout's width as a compile-time value.
template <typename F>
inline void with_bits(int bits, F&& f) {
  if (bits == 4) f(std::integral_constant<int, 4>{});
  else if (bits == 2) f(std::integral_constant<int, 2>{});
  else f(std::integral_constant<int, 8>{});
}

// |v| as the bits of a float with the sign cleared: for these, the order of the bits is the
// order of the values (an Inf above every finite value, a NaN above an Inf), so a block's
// maximum is an integer max, which vectorizes (a float max reduction does not, under IEEE
// rules). A block holding a NaN gets a NaN maximum, hence scale 0 (its sender is withdrawn).
EASGD_HD uint32_t abs_bits(float v) { return float_bits(v) & 0x7fffffffu; }

// The block's scale and reciprocal from its absolute maximum.
struct BlockScale {
  float scale = 0.f, inv = 0.f;
};

EASGD_HD BlockScale block_scale(float absmax, float levels) {
  BlockScale s;
  if (absmax >= kQuantTiny && absmax <= 3.4028234663852886e38f) {  // finite and not tiny (NaN fails)
    s.inv = levels / absmax;
    s.scale = absmax / levels;
  }
  return s;
}

EASGD_HD float round_half_even(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);
#else
  return __builtin_rintf(v);  // the default rounding mode: to nearest, ties to even
#endif
}

// q for v; a NaN (a block with a non-finite value: the sender is withdrawn anyway) becomes 0.
EASGD_HD int8_t quantize(float v, float inv, float levels) {
  float t = round_half_even(v * inv);
  t = t > levels ? levels : t;
  t = t < -levels ? -levels : t;
  t = t == t ? t : 0.f;
  return int8_t(t);
}

EASGD_HD float dequantize(int8_t q, float scale) { return float(q) * scale; }

// A value's level at `Bits` (see quant_levels), from the block's inverse scale.
template <int Bits>
EASGD_HD int8_t quantize_level(float v, float inv) {
  return quantize(v, inv, quant_clamp(Bits));
}

// Where a quantized exchange's contribution comes from. `given`: any rule's, computed by the rule
// itself into a float32 buffer (x); the apply then de-quantizes the owners' sum into that buffer
// (x again) for the rule's own apply, and feeds the residual back from keep (the contribution as
// sent). `elastic` and `downpour` are fused specializations of it for two rules, which compute
// and apply in the same pass: EASGD's d = alpha (x - c) (x then loses d), DOWNPOUR's
// v = x - x_last (x and x_last then take the new center).
enum class QuantRule : int { elastic = 0, downpour = 1, given = 2 };

// Sends (per block): v = d + residual; quantize into record (owner, block); d kept for a
// delayed apply where `keep` is given. Reports a non-finite v. `given`: d = x (float32).
struct QuantizedSendArgs {
  const void* x = nullptr; DType x_dtype = DType::f32;
  const float* center = nullptr;       // elastic
  const void* x_last = nullptr;        // downpour (x's dtype)
  const float* residual = nullptr;
  float* keep = nullptr;               // optional: d as computed now, for a delayed apply
  uint8_t* records = nullptr;          // world records
  QuantLayout layout;
  QuantRule rule = QuantRule::elastic;
  float alpha = 0.f;
  float* nonfinite = nullptr;
};

// header of every record = *me_bad; if set, every scale and q = 0 (the rank sends nothing).
struct PublishRecordsArgs {
  uint8_t* records = nullptr;
  QuantLayout layout;
  const float* me_bad = nullptr;
};

// The owner's sum: s = sum_w deq(received record w) + server residual; the record it publishes
// holds quantize(s) and, in its header, how many ranks flagged. The server residual keeps
// s - deq(q) unless the exchange is skipped (policy skip and a rank flagged).
struct QuantizedReduceArgs {
  const uint8_t* received = nullptr;   // world records of this owner's chunk
  uint8_t* own = nullptr;              // one record
  float* server_residual = nullptr;    // chunk elements
  QuantLayout layout;
  OnNonFinite policy = OnNonFinite::skip;
};

// Applies (per element): S = deq(gathered); d = keep or recomputed; the worker's residual
// becomes d + residual - deq(what it sent); EASGD: x -= d, c += S; DOWNPOUR: c += S,
// x = x_last = c; `given`: x (float32) = S, d = keep, no center. Guarded by the verdict in the
// gathered header like the float apply.
struct QuantizedApplyArgs {
  void* x = nullptr; DType x_dtype = DType::f32;
  float* center = nullptr;
  void* x_last = nullptr;
  float* residual = nullptr;
  const float* keep = nullptr;
  const uint8_t* sent = nullptr;       // this rank's records (as sent)
  const uint8_t* gathered = nullptr;   // every owner's record
  QuantLayout layout;
  QuantRule rule = QuantRule::elastic;
  float alpha = 0.f;
  const float* me_bad = nullptr;
  OnNonFinite policy = OnNonFinite::skip;
  float* verdict = nullptr;
};

// ---- per-block bodies (one CPU thread, or one GPU warp lane's share, calls them) ---------------

// One element of the quantized apply: the owners' sum S, the d this rank computed (kept or
// recomputed), its residual r and what its own record carried (own): the new x (EASGD: x - d;
// DOWNPOUR: the new center), center and residual. A non-finite S leaves x and c alone there; a
// reset rank takes the new center and keeps its residual.
struct QuantApplied {
  float x, c, r;
};

template <QuantRule R>
EASGD_HD QuantApplied quant_apply_element(float xf, float cf, float r, float d, float S, float own, bool reset) {
  const bool kept = non_finite(S);
  const float c_new = select(kept, cf, cf + S);
  const float x_new = R == QuantRule::elastic ? select(reset, c_new, select(kept, xf, xf - d))
                                              : select(kept, xf, c_new);
  return {x_new, c_new, select(reset, r, (d + r) - own)};
}

// The element's owner record, block of its chunk and index in it.
struct Place {
  int64_t owner, block, index;
};

EASGD_HD Place place(const QuantLayout& l, int64_t i) {
  const int64_t owner = i / l.chunk, j = i - owner * l.chunk;
  return {owner, j / kQuantBlock, j};
}

}  // namespace easgd
