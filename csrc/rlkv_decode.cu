// RLKV decode step in CUDA: the same function as rlkv_vllm/ops/triton_stream.py::decode_step.
//
// One launch per layer for a batch with at most one query token per row. Grid (T, P + R),
// 128 threads a block:
//   blockIdx.y <  P: paged head j = blockIdx.y of token t stores its key/value at
//                    slot_mapping[t] and copies its G query heads into q_full (the stock
//                    kernel's input); a TP padding head (paged_src < 0) gets zeros.
//   blockIdx.y >= P: ring head r attends over its Lambda window (sink first positions plus
//                    the recent last ones): earlier positions from the request's ring slot,
//                    position pos itself from this step's k/v. The G query heads' outputs go
//                    to out; then the token's key/value go to its ring row, which held
//                    pos - recent: outside this window and every later one.
// Everything is read from device buffers, so the launch is CUDA-graph capturable.
//
// Built to a fatbin by rlkv_vllm/ops/cuda_build.py (nvcc) and launched through the CUDA
// driver API (rlkv_vllm/ops/cuda_decode.py): no host code, no libtorch ABI.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// Must match rlkv_vllm/ops/cuda_decode.py::_PARAMS (field order and types).
struct DecodeParams {
  const void* q;            // [T, Hq, D]
  const void* k;            // [T, Hkv, D]
  const void* v;
  void* out;                // [T, Hq, D]
  void* key_cache;          // [blocks, block_size, P, D] view
  void* value_cache;
  const int64_t* slot_mapping;  // [>= T]
  const int32_t* paged_src;     // [P]
  void* q_full;             // [T, P * G, D] or null
  void* ring_k;             // [(slots + 1) * C, R, D]
  void* ring_v;
  const int32_t* ring_src;  // [R]
  const int32_t* qsl;       // [B + 1]
  const int32_t* seq_lens;  // [B]
  const int32_t* slot_ids;  // [B]
  int64_t stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh;
  int64_t stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch;
  int64_t stride_qft, stride_qfh, stride_rr, stride_rh;
  int64_t block_size, num_paged, num_ring, num_rows, group, sink, recent, head_dim;
  float scale;
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ uint4 load16(const void* base, int64_t elem_off, int elem_size) {
  return *reinterpret_cast<const uint4*>(reinterpret_cast<const char*>(base) + elem_off * elem_size);
}
__device__ __forceinline__ void store16(void* base, int64_t elem_off, int elem_size, uint4 x) {
  *reinterpret_cast<uint4*>(reinterpret_cast<char*>(base) + elem_off * elem_size) = x;
}

// dot(q_row, k_row) over D, reading the key row 4 bytes at a time (one bank per lane)
__device__ __forceinline__ float dot_row(const float* q, const float* k, int D) {
  float acc = 0.f;
#pragma unroll 8
  for (int d = 0; d < D; ++d) acc += q[d] * k[d];
  return acc;
}
__device__ __forceinline__ float2 pair_to_float2(__half2 x) { return __half22float2(x); }
__device__ __forceinline__ float2 pair_to_float2(__nv_bfloat162 x) { return __bfloat1622float2(x); }
template <typename T> struct Pair;
template <> struct Pair<__half> { using type = __half2; };
template <> struct Pair<__nv_bfloat16> { using type = __nv_bfloat162; };

template <typename T>  // 16-bit types: two elements per 4-byte word
__device__ __forceinline__ float dot_row(const float* q, const T* k, int D) {
  const typename Pair<T>::type* k2 = reinterpret_cast<const typename Pair<T>::type*>(k);
  float acc = 0.f;
#pragma unroll 8
  for (int d = 0; d < D / 2; ++d) {
    const float2 kf = pair_to_float2(k2[d]);
    acc += q[2 * d] * kf.x + q[2 * d + 1] * kf.y;
  }
  return acc;
}

template <typename T>
__device__ void paged_write_and_gather(const DecodeParams& p, int64_t t, int j) {
  constexpr int VEC = 16 / sizeof(T);
  const int nvec = static_cast<int>(p.head_dim) / VEC;
  const int src = p.paged_src[j];
  const uint4 zero = make_uint4(0, 0, 0, 0);
  const int64_t cache_slot = p.slot_mapping[t];
  if (cache_slot >= 0) {
    const int64_t blk = cache_slot / p.block_size, off = cache_slot % p.block_size;
    for (int i = threadIdx.x; i < 2 * nvec; i += blockDim.x) {
      const bool is_v = i >= nvec;
      const int e = (is_v ? i - nvec : i) * VEC;
      uint4 x = zero;
      if (src >= 0)
        x = is_v ? load16(p.v, t * p.stride_vt + src * p.stride_vh + e, sizeof(T))
                 : load16(p.k, t * p.stride_kt + src * p.stride_kh + e, sizeof(T));
      if (is_v)
        store16(p.value_cache, blk * p.stride_vcb + off * p.stride_vcs + j * p.stride_vch + e, sizeof(T), x);
      else
        store16(p.key_cache, blk * p.stride_kcb + off * p.stride_kcs + j * p.stride_kch + e, sizeof(T), x);
    }
  }
  if (p.q_full != nullptr) {
    const int G = static_cast<int>(p.group);
    for (int i = threadIdx.x; i < G * nvec; i += blockDim.x) {
      const int g = i / nvec, e = (i % nvec) * VEC;
      uint4 x = zero;
      if (src >= 0) x = load16(p.q, t * p.stride_qt + int64_t(src * G + g) * p.stride_qh + e, sizeof(T));
      store16(p.q_full, t * p.stride_qft + int64_t(j * G + g) * p.stride_qfh + e, sizeof(T), x);
    }
  }
}

template <typename T>
__device__ void ring_decode(const DecodeParams& p, int64_t t, int r) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int PAD = 4 / sizeof(T);  // one 4-byte bank of padding per key row
  const int D = static_cast<int>(p.head_dim), nvec = D / VEC;
  const int G = static_cast<int>(p.group);
  const int S = static_cast<int>(p.sink), W = static_cast<int>(p.recent), C = S + W;
  const int KS = D + PAD;
  const int tid = threadIdx.x, nthreads = blockDim.x;

  const int64_t row = max(min(t, p.num_rows - 1), int64_t(0));
  const int64_t seq_len = p.seq_lens[row];
  const int q_len = p.qsl[row + 1] - p.qsl[row];
  const int64_t slot = p.slot_ids[row];
  const bool real = t < p.num_rows && q_len > 0 && seq_len > 0;
  const int64_t kvh = p.ring_src[r];
  T* out = reinterpret_cast<T*>(p.out);
  const int64_t out_base = t * p.stride_ot + kvh * G * p.stride_oh;
  if (!real) {  // CUDA-graph padding: zeros, no writes
    for (int i = tid; i < G * D; i += nthreads)
      out[out_base + (i / D) * p.stride_oh + i % D] = from_float<T>(0.f);
    return;
  }
  const int64_t pos = seq_len - 1;

  // [C][KS] keys (rows padded by one bank), [C][D] values, [G][D] scaled queries, [G][C]
  // scores; each part starts 16-byte aligned (must match cuda_decode.smem_bytes)
  extern __shared__ __align__(16) unsigned char smem[];
  const size_t ks_bytes = (size_t(C) * KS * sizeof(T) + 15) & ~size_t(15);
  const size_t vs_bytes = size_t(C) * D * sizeof(T);
  T* ks = reinterpret_cast<T*>(smem);
  T* vs = reinterpret_cast<T*>(smem + ks_bytes);
  float* qs = reinterpret_cast<float*>(smem + ks_bytes + vs_bytes);
  float* ps = qs + G * D;

  // candidate c: sink c (valid if c <= pos), or recent position pos - W + 1 + (c - S) (valid if >= S)
  auto cand_pos = [&](int c) -> int64_t { return c < S ? int64_t(c) : pos - W + 1 + (c - S); };
  auto cand_valid = [&](int c, int64_t cp) -> bool { return c < S ? cp <= pos : cp >= S; };

  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int i = tid; i < 2 * C * nvec; i += nthreads) {
    const bool is_v = i >= C * nvec;
    const int ii = is_v ? i - C * nvec : i;
    const int c = ii / nvec, e = (ii % nvec) * VEC;
    const int64_t cp = cand_pos(c);
    uint4 x = zero;
    if (cand_valid(c, cp)) {
      if (cp == pos) {  // this step's token
        x = is_v ? load16(p.v, t * p.stride_vt + kvh * p.stride_vh + e, sizeof(T))
                 : load16(p.k, t * p.stride_kt + kvh * p.stride_kh + e, sizeof(T));
      } else {
        const int64_t ring_pos = cp < S ? cp : S + (cp - S) % W;
        const int64_t rr = (slot * C + ring_pos) * p.stride_rr + r * p.stride_rh + e;
        x = load16(is_v ? p.ring_v : p.ring_k, rr, sizeof(T));
      }
    }
    if (is_v) {
      *reinterpret_cast<uint4*>(vs + c * D + e) = x;
    } else {  // padded rows are 4-byte aligned only
      uint32_t* dst = reinterpret_cast<uint32_t*>(ks + c * KS + e);
      dst[0] = x.x; dst[1] = x.y; dst[2] = x.z; dst[3] = x.w;
    }
  }
  const T* qg = reinterpret_cast<const T*>(p.q);
  for (int i = tid; i < G * D; i += nthreads) {
    const int g = i / D, d = i % D;
    qs[i] = to_float(qg[t * p.stride_qt + (kvh * G + g) * p.stride_qh + d]) * p.scale;
  }
  __syncthreads();

  // scores: a warp takes one query head and 32 consecutive candidates (padded key rows
  // put the 32 lanes in 32 different banks)
  const int CP = (C + 31) & ~31;
  for (int item = tid; item < G * CP; item += nthreads) {
    const int g = item / CP, c = item % CP;
    if (c >= C) continue;
    float s = -INFINITY;
    if (cand_valid(c, cand_pos(c))) s = dot_row(qs + g * D, ks + c * KS, D);
    ps[g * C + c] = s;
  }
  __syncthreads();

  // softmax per query head, one warp each
  const int lane = tid & 31, warp = tid >> 5, nwarps = nthreads >> 5;
  for (int g = warp; g < G; g += nwarps) {
    float m = -INFINITY;
    for (int c = lane; c < C; c += 32) m = fmaxf(m, ps[g * C + c]);
    for (int o = 16; o; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float sum = 0.f;
    for (int c = lane; c < C; c += 32) {
      const float e = ps[g * C + c] == -INFINITY ? 0.f : expf(ps[g * C + c] - m);
      ps[g * C + c] = e;
      sum += e;
    }
    for (int o = 16; o; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    for (int c = lane; c < C; c += 32) ps[g * C + c] *= inv;
  }
  __syncthreads();

  for (int i = tid; i < G * D; i += nthreads) {
    const int g = i / D, d = i % D;
    const float* pr = ps + g * C;
    float acc = 0.f;
    for (int c = 0; c < C; ++c) acc += pr[c] * to_float(vs[c * D + d]);
    out[out_base + g * p.stride_oh + d] = from_float<T>(acc);
  }

  // the token's key/value into its ring row (every read of the ring happened before the
  // first barrier; the row held pos - W, which no window of pos or later contains)
  const int64_t ring_pos = pos < S ? pos : S + (pos - S) % W;
  const int64_t rr = (slot * C + ring_pos) * p.stride_rr + r * p.stride_rh;
  for (int i = tid; i < 2 * nvec; i += nthreads) {
    const bool is_v = i >= nvec;
    const int e = (is_v ? i - nvec : i) * VEC;
    const uint4 x = is_v ? load16(p.v, t * p.stride_vt + kvh * p.stride_vh + e, sizeof(T))
                         : load16(p.k, t * p.stride_kt + kvh * p.stride_kh + e, sizeof(T));
    store16(is_v ? p.ring_v : p.ring_k, rr + e, sizeof(T), x);
  }
}

template <typename T>
__device__ __forceinline__ void decode_step(const DecodeParams& p) {
  const int64_t t = blockIdx.x;
  const int j = blockIdx.y;
  if (j < p.num_paged)
    paged_write_and_gather<T>(p, t, j);
  else
    ring_decode<T>(p, t, j - static_cast<int>(p.num_paged));
}

extern "C" __global__ void __launch_bounds__(128) rlkv_decode_step_f32(const DecodeParams p) {
  decode_step<float>(p);
}
extern "C" __global__ void __launch_bounds__(128) rlkv_decode_step_f16(const DecodeParams p) {
  decode_step<__half>(p);
}
extern "C" __global__ void __launch_bounds__(128) rlkv_decode_step_bf16(const DecodeParams p) {
  decode_step<__nv_bfloat16>(p);
}
