// LiteMLA's context (DESIGN 3.3): multi-scale aggregation fused into ReLU linear
// attention, CUDA kernels, launchers and op registration.
//
// For scale s and head h the aggregated q, k, v are groups 3h, 3h+1, 3h+2 of
//   y_s = Wp_s (dwconv_k(qkv) + bd_s) + bp_s   (kernels/multiscale_aggregate.py)
// and output head (1+s)*heads + h is their ReLU linear attention (DESIGN 3.1):
//   S = sum_n relu(k_n)^T v_n,  z = sum_n relu(k_n),  out_n = relu(q_n) S / (relu(q_n) . z + eps)
// and the heads over qkv itself (out[:, :heads*dim]) are the same attention of q, k, v read as they
// are. The aggregated tensor never reaches memory: per scale,
//   state_kernel  grid (B*heads, chunks of spatial tiles, 2 for the first scale, else 1): recomputes
//                 k, v tile by tile (aggregate_tile.cuh; blockIdx.z 0 of the first scale's grid reads
//                 qkv's own heads instead) and reduces the chunk's S, z (in registers over a tile, in
//                 its slot between tiles) -> fp32 partials, one slot per block
//   out_kernel    same grid: sums the partials of its (b, h) in a fixed order (so results are
//                 deterministic), recomputes q tile by tile and writes out
// so every head of the output is written by this op's kernels, qkv's own heads in the first scale's
// launches.
//
// Layout contract: qkv and out (B, *, H, W) with any strides; weights and biases
// contiguous, qkv's dtype.
//
// fp16/bf16 at group size 32 on sm_80 and later (the SAM encoders' LiteMLA) run mma_kernel instead: the same
// tiles and depthwise stencil (aggregate_tile.cuh, fp32 FMAs; the head's taps staged in shared memory up to
// 5 x 5), but the products on tensor cores (WMMA 16x16x16, fp32 accumulation) over tiles in qkv's dtype, and
// one pass where B*heads blocks fill the GPU:
//   pointwise   the stencil's tile rounded to the dtype times Wp^T (as eager PyTorch rounds the depthwise
//               conv's output before the 1x1 conv; fp16 positions at 2^15 or over scaled into its range first,
//               the scale undone in fp32), then its bias, ReLU and the image mask, rounded again
//   state       S += relu(k)^T v, in registers (each warp one 16x16 block of S over half the positions), z in
//               fp32 from the same rounded relu(k)
//   output      relu(q) S': S rounded to the dtype column by column as S' = S / 2^e, 2^e the power of two
//               just above the column's largest |S| (fp16's range would not hold S itself), the 2^e put back
//               in fp32 with the division by relu(q) . z + eps
// A block of the one pass reduces its head's S over the whole map in registers, then writes the output;
// split over the map, its state pass writes fp32 partials and its output pass sums them (as above).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <mutex>
#include <unordered_map>

#include "common.h"
#include "multiscale_aggregate/aggregate_tile.cuh"

#define CTX_OP "lite_mla_context"  // the op named in error messages

namespace linattn {
namespace {

using namespace aggregate;

// Whether this block serves qkv's own heads: blockIdx.z 0 of a grid with two (the first scale's).
__device__ __forceinline__ bool raw_heads() { return blockIdx.z + 1 < gridDim.z; }

// The (relu'd when RELU) tile of channel group c0: qkv's own for the raw heads (loaded as it is),
// else its aggregation at this scale. Begins and ends with a barrier, as aggregate_tile.
template <typename T, int K, bool RELU>
__device__ __forceinline__ void source_tile(bool raw, float* tile, float* halo, const Map<const T>& x, int b, int c0,
                                            int h0, int w0, const Geometry& g, const T* wd, const T* bd,
                                            const T* wp, const T* bp, int k) {
  if (raw) {
    __syncthreads();  // the tile's previous readers are done
    load_tile<T, RELU>(tile, x, b, c0, h0, w0, g);
    __syncthreads();
  } else {
    aggregate_tile<T, K, RELU>(tile, halo, x, b, c0, h0, w0, g, wd, bd, wp, bp, k, Map<T>{});
  }
}

// The fp32 partials of blocks (blockIdx.z, bh): `splits` slots of D * D + D.
__device__ __forceinline__ int64_t parts_offset(int bh, int splits, int D) {
  return (static_cast<int64_t>(blockIdx.z) * gridDim.x + bh) * splits * (D * D + D);
}

// S (D x D, [d][e]) and z (D) of one chunk of tiles of head (b, h) -> parts slot (z, bh, chunk),
// where the running sums also wait between tiles (see gram_load).
template <typename T, int K>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    state_kernel(float* parts, const Map<const T> x, const T* wd, const T* bd, const T* wp, const T* bp, int k,
                 int heads, const Geometry g) {
  extern __shared__ float4 smem4[];
  float* halo = reinterpret_cast<float*>(smem4);
  float* ks = halo + Halo<K>::kFloats;  // relu(k) tile [p][d]
  float* vs = ks + tile_floats(g.D);    // v tile [p][e]

  const int D = g.D;
  const bool raw = raw_heads();
  const int b = blockIdx.x / heads, h = blockIdx.x % heads;
  const int ck = (3 * h + 1) * D, cv = ck + D;
  float* part = parts + parts_offset(blockIdx.x, gridDim.y, D) + static_cast<int64_t>(blockIdx.y) * (D * D + D);
  int first, last;
  chunk_tiles(g, first, last);  // never empty (num_splits): every part gets written
  for (int t = first; t < last; ++t) {
    int h0, w0;
    tile_origin(g, t, h0, w0);
    source_tile<T, K, true>(raw, ks, halo, x, b, ck, h0, w0, g, wd, bd, wp, bp, k);
    source_tile<T, K, false>(raw, vs, halo, x, b, cv, h0, w0, g, wd, bd, wp, bp, k);
    GramAcc s;
    float z[kGram];
    if (t == first) {
      gram_zero(s, z);
    } else {
      gram_load(s, z, part, D);
    }
    gram(s, z, ks, vs, D);  // positions outside the image are zero in both tiles
    gram_store(s, z, part, D);
  }
}

// out's channels c_out + [h*D, (h+1)*D) (this scale's heads; [h*D, (h+1)*D) for qkv's own) of one
// chunk of tiles of head (b, h), from the partial S, z of all `splits` chunks of (b, h).
template <typename T, int K>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    out_kernel(const Map<T> out, int c_out, const float* parts, int splits, float eps, const Map<const T> x,
               const T* wd, const T* bd, const T* wp, const T* bp, int k, int heads, const Geometry g) {
  extern __shared__ float4 smem4[];
  const int D = g.D;
  float* halo = reinterpret_cast<float*>(smem4);
  float* qs = halo + Halo<K>::kFloats;  // relu(q) tile [p][d], then relu(q) S [p][e]
  float* st = qs + tile_floats(D);      // S [d][e], leading dimension D + 1
  float* z = st + D * (D + 1);          // [d]
  float* den = z + D;                   // [p]

  const bool raw = raw_heads();
  const int b = blockIdx.x / heads, h = blockIdx.x % heads;
  const float* src = parts + parts_offset(blockIdx.x, splits, D);
  for (int i = threadIdx.x; i < D * D + D; i += kThreads) {
    float sum = 0.f;
    for (int s = 0; s < splits; ++s) sum += src[static_cast<int64_t>(s) * (D * D + D) + i];
    if (i < D * D) {
      st[(i / D) * (D + 1) + i % D] = sum;
    } else {
      z[i - D * D] = sum;
    }
  }
  // (aggregate_tile begins with a barrier: st and z are complete before their first use;
  // den is written after it, and read after the barriers that follow)

  int first, last;
  chunk_tiles(g, first, last);
  for (int t = first; t < last; ++t) {
    int h0, w0;
    tile_origin(g, t, h0, w0);
    source_tile<T, K, true>(raw, qs, halo, x, b, 3 * h * D, h0, w0, g, wd, bd, wp, bp, k);
    const int Dq = opaque(D);  // (see opaque)
    for (int p = threadIdx.x; p < kTileP; p += kThreads) {
      float dot = 0.f;
      for (int d = 0; d < Dq; ++d) dot = fmaf(qs[p * (Dq + 1) + d], z[d], dot);
      den[p] = dot + eps;
    }
    PwAcc acc;
    pointwise_zero(acc);
    pointwise_rows(acc, qs, Dq, 0, Dq, st, Dq + 1);  // (e, d) -> S[d][e]
    __syncthreads();  // den, and everyone is done reading qs: it becomes the relu(q) S tile
    const int Do = opaque(D), cols = pw_cols(Do);
#pragma unroll
    for (int pp = 0; pp < kPwRows; ++pp) {
#pragma unroll
      for (int i = 0; i < kPwCols; ++i) {
        if (i < cols) qs[pw_row(pp) * (Do + 1) + pw_col(i)] = acc[pp][i];
      }
    }
    __syncthreads();
    // out = relu(q) S / den, divided in the store: the IEEE division has a slow-path call,
    // which costs registers where the 64 accumulators are live, and few there
    store_tile(out, b, (raw ? 0 : c_out) + h * D, h0, w0, g, qs, den);
  }
}

// ---- tensor cores: fp16/bf16, group size 32 ------------------------------------------------------

namespace wmma = nvcuda::wmma;

constexpr int kMmaD = 32;          // the group size mma_kernel serves
constexpr int kLdt = kMmaD + 8;    // leading dimension of its dtype tiles (a multiple of 8, as WMMA needs)
constexpr int kLds = kMmaD + 4;    // of its fp32 tiles (a multiple of 4)
constexpr int kWarps = kThreads / 32;
// blocks an SM (its registers: 56-78 at ptxas's own choice; on sm_90 its shared memory too)
constexpr int kMmaBlocks = 3;
static_assert(kTileP == 16 * kWarps && kThreads == 2 * kTileP && kMmaD % 16 == 0 && kLdt % 8 == 0 && kLds % 4 == 0,
              "a warp per 16 positions of a tile, two threads a position; 16x16 blocks; 16-byte rows");

// The WMMA element type of qkv's dtype, and the rounding to it.
template <typename T>
struct MmaType;
template <>
struct MmaType<at::Half> {
  using type = __half;
  static __device__ __forceinline__ type round(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ float widen(type x) { return __half2float(x); }
  static __device__ __forceinline__ uint32_t bits(type x) { return __half_as_ushort(x); }
};
template <>
struct MmaType<at::BFloat16> {
  using type = __nv_bfloat16;
  static __device__ __forceinline__ type round(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ float widen(type x) { return __bfloat162float(x); }
  static __device__ __forceinline__ uint32_t bits(type x) { return __bfloat16_as_ushort(x); }
};

// v[j] = src[j], j < 8: two 16-byte shared loads (src 16-byte aligned; a row of 8 fp32 products per thread, four
// threads a row of kLds, whose scalar loads would hit one bank four times a warp).
__device__ __forceinline__ void load8(float (&v)[8], const float* src) {
  const float4 a = reinterpret_cast<const float4*>(src)[0], b = reinterpret_cast<const float4*>(src)[1];
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

// dst[j] = v[j] rounded to the dtype, j < 8: one 16-byte shared store (dst 16-byte aligned).
template <typename T>
__device__ __forceinline__ void store8(typename MmaType<T>::type* dst, const float (&v)[8]) {
  using M = MmaType<T>;
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) w[i] = M::bits(M::round(v[2 * i])) | (M::bits(M::round(v[2 * i + 1])) << 16);
  *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
}

template <typename E, typename Layout>
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, E, Layout>;
template <typename E, typename Layout>
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, E, Layout>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// mma_kernel's shared memory, in bytes from the start; every WMMA operand 32-byte aligned.
template <int K>
struct MmaSmem {
  // fp32 scratch: the stencil's halo, or a tile of products [p][c] (kLds), or the state's two halves of S
  // (kLds) and eight partial z, then its sum [d][e] (kMmaD) and z
  static constexpr int kScratchFloats = std::max({Halo<K>::kFloats, kTileP * kLds,
                                                  2 * kMmaD * kLds + kWarps * kMmaD + kMmaD * kMmaD + kMmaD});
  static constexpr size_t kScratch = 0;
  static constexpr size_t kConv = kScratch + sizeof(float) * kScratchFloats;  // the stencil's fp32 tile (D + 1)
  static constexpr size_t kTileA = kConv + sizeof(float) * kTileP * (kMmaD + 1);  // relu(k) or relu(q), dtype
  static constexpr size_t kTileB = kTileA + 2 * kTileP * kLdt;                    // v
  static constexpr size_t kWp = kTileB + 2 * kTileP * kLdt;                       // Wp of q, k, v: [c][j]
  static constexpr size_t kS = kWp + 2 * 3 * kMmaD * kLdt;                        // S' [d][e]
  static constexpr size_t kScale = kS + 2 * kMmaD * kLdt;                         // 2^e per column of S
  static constexpr size_t kZ = kScale + sizeof(float) * kMmaD;
  static constexpr size_t kDen = kZ + sizeof(float) * kMmaD;  // relu(q) . z + eps per position
  // the head's depthwise taps (stage_taps) up to 5 x 5; at 9 x 9 (31 KB) they would cost H100 and A100 a block
  // an SM and overflow sm_86's 99 KB a block, and come from global memory (load_tap_row)
  static constexpr bool kSharedTaps = K <= 5;
  static constexpr size_t kTaps = kDen + sizeof(float) * kTileP;
  static constexpr size_t kBytes = kTaps + (kSharedTaps ? sizeof(float) * 3 * kMmaD * K * K : 0);
  static_assert(kConv % 32 == 0 && kTileA % 32 == 0 && kTileB % 32 == 0 && kWp % 32 == 0 && kS % 32 == 0,
                "WMMA operands must be 32-byte aligned");
};

// products[p][c] (kLds, fp32) = sum_j a[p][j] B(j, c) at the warp's 16 positions of a tile, for a (kMmaD x
// kMmaD) matrix B in the dtype, read as LAYOUT (row_major: B(j, c) at b[j * kLdt + c]; col_major: b[c * kLdt + j]).
template <typename LAYOUT, typename E>
__device__ __forceinline__ void rows_product(float* products, const E* a, const E* b) {
  const int warp = threadIdx.x / 32;
  FragC acc[kMmaD / 16];
#pragma unroll
  for (int n = 0; n < kMmaD / 16; ++n) wmma::fill_fragment(acc[n], 0.f);
#pragma unroll
  for (int s = 0; s < kMmaD / 16; ++s) {
    FragA<E, wmma::row_major> fa;
    wmma::load_matrix_sync(fa, a + 16 * warp * kLdt + 16 * s, kLdt);
#pragma unroll
    for (int n = 0; n < kMmaD / 16; ++n) {
      FragB<E, LAYOUT> fb;
      const bool rows = std::is_same_v<LAYOUT, wmma::row_major>;
      wmma::load_matrix_sync(fb, b + (rows ? 16 * s * kLdt + 16 * n : 16 * n * kLdt + 16 * s), kLdt);
      wmma::mma_sync(acc[n], fa, fb, acc[n]);
    }
  }
#pragma unroll
  for (int n = 0; n < kMmaD / 16; ++n) {
    wmma::store_matrix_sync(products + 16 * warp * kLds + 16 * n, acc[n], kLds, wmma::mem_row_major);
  }
}

// dst[p][c] (kLdt, dtype) = the group's tile at channel c0: qkv's own (raw) or its aggregation, relu'd
// when RELU, zero at positions outside the image. Begins and ends with a barrier.
template <typename T, int K, bool RELU>
__device__ void mma_source_tile(typename MmaType<T>::type* dst, bool raw, float* scratch, float* conv,
                                const typename MmaType<T>::type* wp_s, const float* taps, const Map<const T>& x,
                                int b, int c0, int h0, int w0, const Geometry& geometry, const T* wd, const T* bd,
                                const T* bp, int k) {
  using M = MmaType<T>;
  __syncthreads();  // the tiles' previous readers are done
  const Geometry g = opaque(geometry);
  if (raw && x.vec) {  // channels_last: a thread's kVec<T> channels of a position in one load
    constexpr int V = kVec<T>;
    for (int i = thread_index(); i < kTileP * (kMmaD / V); i += kThreads) {
      const int cg = i % (kMmaD / V), p = i / (kMmaD / V);
      const int h = h0 + p / kTileW, w = w0 + p % kTileW;
      float v[V] = {};
      if (h < g.H && w < g.W) load_vec<T>(v, x, b, c0 + cg * V, h, w);
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = RELU ? relu(v[j]) : v[j];
      store8<T>(dst + p * kLdt + cg * V, v);
    }
  } else if (raw) {
    for (int i = thread_index(); i < kTileP * kMmaD; i += kThreads) {
      int p, c;
      tile_element(x, i, kMmaD, p, c);
      const int h = h0 + p / kTileW, w = w0 + p % kTileW;
      const float v = h < g.H && w < g.W ? static_cast<float>(x.ptr[x.offset(b, c0 + c, h, w)]) : 0.f;
      dst[p * kLdt + c] = M::round(RELU ? relu(v) : v);
    }
  }
  if (raw) {
    __syncthreads();
    return;
  }
  dwconv_tile<T, K, MmaSmem<K>::kSharedTaps>(conv, scratch, x, b, c0, h0, w0, g, wd, bd, k, Map<T>{},
                                              taps);  // ends with a barrier
  // (a thread's 8 channels of a position: conv's odd leading dimension keeps its reads free of bank conflicts;
  // every thread takes kPer of them, the same ones in both loops)
  constexpr int kPer = kTileP * (kMmaD / 8) / kThreads;
  static_assert(kPer * kThreads == kTileP * (kMmaD / 8));
  float back[kPer];  // the power of two each position's products are scaled back by (fp16; else 1)
#pragma unroll
  for (int n = 0; n < kPer; ++n) {
    const int i = thread_index() + n * kThreads, p = i / (kMmaD / 8), c = (i % (kMmaD / 8)) * 8;
    float v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = conv[p * (kMmaD + 1) + c + j];
    back[n] = 1.f;
    if constexpr (std::is_same_v<T, at::Half>) {
      // positions at 2^15 or over enter the product scaled by a power of two into fp16's range (exact): the
      // depthwise conv may exceed it where the aggregated tensor does not (eager PyTorch's fp16 tensor between
      // the two convs overflows there). A position's four threads (adjacent lanes) share its largest |value|.
      float m = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) m = fmaxf(m, fabsf(v[j]));
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
      const int shift = max(static_cast<int>(__float_as_uint(m) >> 23) - 127 - 14, 0);
      const float scale = __uint_as_float(static_cast<unsigned>(127 - shift) << 23);
      back[n] = __uint_as_float(static_cast<unsigned>(127 + shift) << 23);
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] *= scale;
    }
    store8<T>(dst + p * kLdt + c, v);
  }
  __syncthreads();
  rows_product<wmma::col_major>(scratch, dst, wp_s);  // B(j, c) = Wp[c][j]: wp_s's [c][j] rows, column-major
  __syncthreads();
#pragma unroll
  for (int n = 0; n < kPer; ++n) {
    const int i = thread_index() + n * kThreads, p = i / (kMmaD / 8), c = (i % (kMmaD / 8)) * 8;
    const bool inside = h0 + p / kTileW < g.H && w0 + p % kTileW < g.W;
    float v[8];
    load8(v, scratch + p * kLds + c);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      float y = v[j] * back[n] + (bp != nullptr ? static_cast<float>(bp[c0 + c + j]) : 0.f);
      if (RELU) y = relu(y);
      v[j] = inside ? y : 0.f;
    }
    store8<T>(dst + p * kLdt + c, v);
  }
  __syncthreads();
}

enum class MmaPass { kOne, kState, kOut };

// Head (b, h) at one scale (blockIdx.z 0 of the first scale's grid: qkv's own heads) over its chunk of tiles:
//   kOne    S and z over the whole map (one chunk), then the output
//   kState  S and z of the chunk -> its fp32 partial slot (D * D + D, as state_kernel's)
//   kOut    S and z summed over the `splits` partial slots of (b, h), then the chunk's output
template <typename T, int K, MmaPass PASS>
__global__ void __launch_bounds__(kThreads, kMmaBlocks)
    mma_kernel(const Map<T> out, int c_out, float* parts, int splits, float eps, const Map<const T> x, const T* wd,
               const T* bd, const T* wp, const T* bp, int k, int heads, const Geometry g) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using M = MmaType<T>;
  using E = typename M::type;
  using L = MmaSmem<K>;
  extern __shared__ __align__(128) unsigned char smem_mma[];
  float* scratch = reinterpret_cast<float*>(smem_mma + L::kScratch);
  float* conv = reinterpret_cast<float*>(smem_mma + L::kConv);
  E* ta = reinterpret_cast<E*>(smem_mma + L::kTileA);
  E* tb = reinterpret_cast<E*>(smem_mma + L::kTileB);
  E* wp_s = reinterpret_cast<E*>(smem_mma + L::kWp);
  E* st = reinterpret_cast<E*>(smem_mma + L::kS);
  float* scale = reinterpret_cast<float*>(smem_mma + L::kScale);
  float* zs = reinterpret_cast<float*>(smem_mma + L::kZ);
  float* den = reinterpret_cast<float*>(smem_mma + L::kDen);
  float* taps = reinterpret_cast<float*>(smem_mma + L::kTaps);  // q's, k's, v's [c][K][K] (kSharedTaps)

  const bool raw = raw_heads();
  const int b = blockIdx.x / heads, h = blockIdx.x % heads;
  const int warp = threadIdx.x / 32;
  if (!raw) {  // the head's three pointwise matrices, [c][j] rows of the (C, D) weight, and its depthwise taps
    for (int i = thread_index(); i < 3 * kMmaD * kMmaD; i += kThreads) {
      const int r = i / kMmaD;
      wp_s[r * kLdt + i % kMmaD] = M::round(static_cast<float>(wp[static_cast<int64_t>(3 * h * kMmaD) * kMmaD + i]));
    }
    if constexpr (L::kSharedTaps) stage_taps<T, K>(taps, wd, 3 * h * kMmaD, 3 * kMmaD, k);
  }  // (read after mma_source_tile's first barrier)
  int first, last;
  chunk_tiles(g, first, last);
  // S and z, summed into [d][e] and z at `sum` (D * D + D floats)
  float* sum = scratch + 2 * kMmaD * kLds + kWarps * kMmaD;
  if constexpr (PASS != MmaPass::kOut) {
    // warp w: S's 16x16 block (w % 4) over the positions of half w / 4 of each tile; thread t: z[t % 32] over
    // the 16 positions t / 32
    const int bi = (warp % 4) / 2, bj = warp % 2, half = warp / 4;
    FragC sacc;
    wmma::fill_fragment(sacc, 0.f);
    float zacc = 0.f;
    for (int t = first; t < last; ++t) {
      int h0, w0;
      tile_origin(g, t, h0, w0);
      mma_source_tile<T, K, true>(ta, raw, scratch, conv, wp_s + kMmaD * kLdt, taps + kMmaD * K * K, x, b,
                                  (3 * h + 1) * kMmaD, h0, w0, g, wd, bd, bp, k);
      mma_source_tile<T, K, false>(tb, raw, scratch, conv, wp_s + 2 * kMmaD * kLdt, taps + 2 * kMmaD * K * K, x,
                                   b, (3 * h + 2) * kMmaD, h0, w0, g, wd, bd, bp, k);
#pragma unroll
      for (int s = 0; s < kTileP / 32; ++s) {
        const int p0 = half * (kTileP / 2) + 16 * s;
        FragA<E, wmma::col_major> kt;  // A(d, p) = relu(k)[p][d]
        FragB<E, wmma::row_major> v;
        wmma::load_matrix_sync(kt, ta + p0 * kLdt + 16 * bi, kLdt);
        wmma::load_matrix_sync(v, tb + p0 * kLdt + 16 * bj, kLdt);
        wmma::mma_sync(sacc, kt, v, sacc);
      }
      const int d = threadIdx.x % kMmaD, p0 = (threadIdx.x / kMmaD) * (kTileP / kWarps);
#pragma unroll 4
      for (int p = p0; p < p0 + kTileP / kWarps; ++p) zacc += M::widen(ta[p * kLdt + d]);
    }
    __syncthreads();  // the last tile's products are done with scratch
    wmma::store_matrix_sync(scratch + half * kMmaD * kLds + 16 * bi * kLds + 16 * bj, sacc, kLds,
                            wmma::mem_row_major);
    scratch[2 * kMmaD * kLds + threadIdx.x] = zacc;  // [t / 32][t % 32]
    __syncthreads();
    float* dst = PASS == MmaPass::kState
                     ? parts + parts_offset(blockIdx.x, gridDim.y, kMmaD) +
                           static_cast<int64_t>(blockIdx.y) * (kMmaD * kMmaD + kMmaD)
                     : sum;
    for (int i = threadIdx.x; i < kMmaD * kMmaD + kMmaD; i += kThreads) {
      float v = 0.f;
      if (i < kMmaD * kMmaD) {
        const int d = i / kMmaD, e = i % kMmaD;
        v = scratch[d * kLds + e] + scratch[kMmaD * kLds + d * kLds + e];
      } else {
#pragma unroll
        for (int w = 0; w < kWarps; ++w) v += scratch[2 * kMmaD * kLds + w * kMmaD + i - kMmaD * kMmaD];
      }
      dst[i] = v;
    }
    if constexpr (PASS == MmaPass::kState) return;
  } else {
    const float* src = parts + parts_offset(blockIdx.x, splits, kMmaD);
    for (int i = threadIdx.x; i < kMmaD * kMmaD + kMmaD; i += kThreads) {
      float v = 0.f;
      for (int s = 0; s < splits; ++s) v += src[static_cast<int64_t>(s) * (kMmaD * kMmaD + kMmaD) + i];
      sum[i] = v;
    }
  }
  __syncthreads();
  // S' = S / 2^e by columns, rounded; 2^e just above the column's largest |S| (1 where that is 0 or not finite)
  if (threadIdx.x < kMmaD) {
    const int e = threadIdx.x;
    float m = 0.f;
    for (int d = 0; d < kMmaD; ++d) m = fmaxf(m, fabsf(sum[d * kMmaD + e]));
    int ex = 0;
    if (m > 0.f && isfinite(m)) frexpf(m, &ex);
    scale[e] = ldexpf(1.f, min(ex, 127));  // (2^128 is not a float: S' then stays below 2)
    zs[e] = sum[kMmaD * kMmaD + e];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kMmaD * kMmaD; i += kThreads) {
    st[(i / kMmaD) * kLdt + i % kMmaD] = M::round(sum[i] / scale[i % kMmaD]);
  }
  for (int t = first; t < last; ++t) {
    int h0, w0;
    tile_origin(g, t, h0, w0);
    mma_source_tile<T, K, true>(ta, raw, scratch, conv, wp_s, taps, x, b, 3 * h * kMmaD, h0, w0, g, wd, bd, bp, k);
    {  // den: two threads a position, 16 channels each
      const int p = threadIdx.x / 2, d0 = (threadIdx.x % 2) * (kMmaD / 2);
      float dot = 0.f;
#pragma unroll
      for (int d = d0; d < d0 + kMmaD / 2; ++d) dot = fmaf(M::widen(ta[p * kLdt + d]), zs[d], dot);
      dot += __shfl_xor_sync(0xffffffffu, dot, 1);
      if (threadIdx.x % 2 == 0) den[p] = dot + eps;
    }
    rows_product<wmma::row_major>(scratch, ta, st);
    __syncthreads();
    const Geometry go = opaque(g);
    const int c1 = (raw ? 0 : c_out) + h * kMmaD;
    if (out.vec) {  // channels_last: a thread's kVec<T> channels of a position in one store
      constexpr int V = kVec<T>;
      for (int i = thread_index(); i < kTileP * (kMmaD / V); i += kThreads) {
        const int c = (i % (kMmaD / V)) * V, p = i / (kMmaD / V);
        const int hh = h0 + p / kTileW, ww = w0 + p % kTileW;
        if (hh < go.H && ww < go.W) {
          float v[V];
          load8(v, scratch + p * kLds + c);
#pragma unroll
          for (int j = 0; j < V; ++j) v[j] = v[j] * scale[c + j] / den[p];
          store_vec<T>(out, b, c1 + c, hh, ww, v);
        }
      }
    } else {
      for (int i = thread_index(); i < kTileP * kMmaD; i += kThreads) {
        int p, c;
        tile_element(out, i, kMmaD, p, c);
        const int hh = h0 + p / kTileW, ww = w0 + p % kTileW;
        if (hh < go.H && ww < go.W) {
          out.ptr[out.offset(b, c1 + c, hh, ww)] = static_cast<T>(scratch[p * kLds + c] * scale[c] / den[p]);
        }
      }
    }
  }
#else
  __trap();  // the launcher takes this kernel on sm_80 and later only
#endif
}

// ---- host side --------------------------------------------------------------------------------

template <int K>
struct SharedBytes {
  static size_t state(int D) { return (Halo<K>::kFloats + 2 * tile_floats(D)) * sizeof(float); }
  static size_t out(int D) {
    return (Halo<K>::kFloats + tile_floats(D) + D * (D + 1) + D + kTileP) * sizeof(float);
  }
};

// Whether mma_kernel serves a call: fp16/bf16 at group size kMmaD, built for sm_80 or later (a build whose
// code for this GPU is older PTX has only its trap). Asked of the runtime once per device and dtype.
template <typename T>
bool use_mma(int64_t D) {
  if constexpr (std::is_same_v<T, float>) {
    return false;
  } else {
    if (D != kMmaD) return false;
    static std::mutex mutex;
    static std::unordered_map<int, bool> known;  // device -> its answer
    const int device = c10::cuda::current_device();
    const std::lock_guard<std::mutex> lock(mutex);
    const auto found = known.find(device);
    if (found != known.end()) return found->second;
    cudaFuncAttributes attributes;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, mma_kernel<T, 3, MmaPass::kOne>));
    return known[device] = attributes.ptxVersion >= 80;  // the __CUDA_ARCH__ its code was compiled for
  }
}

// mma_kernel's blocks an SM at the call's largest kernel size: kMmaBlocks, or as many as the shared memory holds
// with the driver's 1 KB a block (on sm_80 two).
int mma_blocks_per_sm(at::TensorList dw_weights) {
  size_t bytes = 0;
  for (const at::Tensor& wd : dw_weights) {
    dispatch_ksize(wd.size(3), [&](auto kc) { bytes = std::max(bytes, MmaSmem<decltype(kc)::value>::kBytes); });
  }
  const size_t room = device_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor) / (bytes + 1024);
  return static_cast<int>(std::min<size_t>(kMmaBlocks, room));
}

template <typename T>
void forward(const at::Tensor& qkv, at::TensorList dw_weights, at::TensorList pw_weights, int64_t heads,
             int64_t D, float eps, at::TensorList dw_biases, at::TensorList pw_biases, const at::Tensor& out) {
  const int64_t B = qkv.size(0), H = qkv.size(2), W = qkv.size(3);
  const bool mma = use_mma<T>(D);
  // the first scale's grids also serve qkv's own heads (blockIdx.z 0), with partials of their own; mma_kernel
  // splits the map only where its 2 * B * heads blocks would leave SMs with room for more
  const Geometry g = mma ? plan(2 * B * heads, H, W, D, mma_blocks_per_sm(dw_weights)) : plan(B * heads, H, W, D);
  const int splits = num_splits(g);
  const at::Tensor parts = mma && splits == 1 ? at::Tensor()
                                              : at::empty({2 * B * heads * splits * (D * D + D)},
                                                          qkv.options().dtype(at::kFloat));
  float* part = parts.defined() ? parts.data_ptr<float>() : nullptr;
  const Map<const T> x = make_map<const T>(qkv);
  const Map<T> o = make_map<T>(out);
  for (size_t s = 0; s < dw_weights.size(); ++s) {
    const dim3 grid(static_cast<unsigned>(B * heads), static_cast<unsigned>(splits), s == 0 ? 2u : 1u);
    const int c_out = static_cast<int>((1 + s) * heads * D);
    const int k = static_cast<int>(dw_weights[s].size(3)), nh = static_cast<int>(heads);
    const T* wd = reinterpret_cast<const T*>(dw_weights[s].data_ptr());
    const T* wp = reinterpret_cast<const T*>(pw_weights[s].data_ptr());
    const T* bd = data_or_null<T>(dw_biases, s);
    const T* bp = data_or_null<T>(pw_biases, s);
    dispatch_ksize(k, [&](auto kc) {
      constexpr int K = decltype(kc)::value;
      if constexpr (!std::is_same_v<T, float>) {
        if (mma) {
          const size_t smem = MmaSmem<K>::kBytes;
          if (splits == 1) {
            launch(CTX_OP, mma_kernel<T, K, MmaPass::kOne>, grid, smem, o, c_out, part, 1, eps, x, wd, bd, wp, bp, k,
                   nh, g);
          } else {
            launch(CTX_OP, mma_kernel<T, K, MmaPass::kState>, grid, smem, o, c_out, part, splits, eps, x, wd, bd,
                   wp, bp, k, nh, g);
            launch(CTX_OP, mma_kernel<T, K, MmaPass::kOut>, grid, smem, o, c_out, part, splits, eps, x, wd, bd, wp,
                   bp, k, nh, g);
          }
          return;
        }
      }
      launch(CTX_OP, state_kernel<T, K>, grid, SharedBytes<K>::state(g.D), part, x, wd, bd, wp, bp, k, nh, g);
      launch(CTX_OP, out_kernel<T, K>, grid, SharedBytes<K>::out(g.D), o, c_out, static_cast<const float*>(part),
             splits, eps, x, wd, bd, wp, bp, k, nh, g);
    });
  }
}

void lite_mla_context_fwd_cuda(const at::Tensor& qkv, at::TensorList dw_weights, at::TensorList pw_weights,
                               int64_t heads, int64_t dim, double eps, at::TensorList dw_biases,
                               at::TensorList pw_biases, const at::Tensor& out) {
  const int64_t D = check_aggregation(CTX_OP, qkv, dw_weights, pw_weights, heads, dw_biases, pw_biases);
  LINATTN_CHECK(CTX_OP, dim == D, "dim must equal qkv's channels / (3*heads) = ", D, ", got ", dim);
  const int64_t B = qkv.size(0), H = qkv.size(2), W = qkv.size(3);
  const int64_t S = static_cast<int64_t>(dw_weights.size());
  CHECK_DIM(CTX_OP, out, 4, "(B, (1+S)*heads*dim, H, W)");
  CHECK_SAME_DEVICE(CTX_OP, out, qkv);
  CHECK_SAME_DTYPE(CTX_OP, out, qkv);
  CHECK_SHAPE(CTX_OP, out, B, (1 + S) * heads * D, H, W);
  CHECK_NO_INTERNAL_OVERLAP(CTX_OP, out);
  check_no_overlap(CTX_OP, out, "out", qkv, "qkv");
  if (B * H * W == 0) return;
  const c10::cuda::CUDAGuard guard(qkv.device());
  const float eps32 = static_cast<float>(eps);
  LINATTN_DISPATCH_FLOATING(qkv.scalar_type(), CTX_OP, [&] {
    forward<scalar_t>(qkv, dw_weights, pw_weights, heads, D, eps32, dw_biases, pw_biases, out);
  });
}

}  // namespace
}  // namespace linattn

TORCH_LIBRARY_FRAGMENT(linattn, m) {
  m.def(
      "lite_mla_context_fwd_cuda(Tensor qkv, Tensor[] dw_weights, Tensor[] pw_weights, int heads, int dim, "
      "float eps, Tensor[] dw_biases, Tensor[] pw_biases, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(linattn, CUDA, m) { m.impl("lite_mla_context_fwd_cuda", &linattn::lite_mla_context_fwd_cuda); }
