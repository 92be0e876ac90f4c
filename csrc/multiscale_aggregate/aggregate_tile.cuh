// Block-level building blocks of the multi-scale aggregation (DESIGN 3.3), shared by
// multiscale_aggregate.cu and lite_mla_context.cu.
//
// One block (kThreads threads) owns one group of D channels (one of q, k, v of a head)
// of one batch element and walks a chunk of spatial tiles of kTileH x kTileW positions.
// Per tile:
//   dwconv_tile     the depthwise k x k conv of the group's D channels: the tile plus its
//                   halo is staged in shared memory (fp32) kChunkC channels at a time, and
//                   each thread slides a register window along 8 positions of one row
//   pointwise       the group's (D x D) pointwise product on the fp32 tile, register-tiled
//                   (4 positions x up to 16 channels per thread), the matrix read from shared
//                   memory as [j][c] rows (a global Wp is staged there, in the halo buffer the
//                   conv no longer needs, as many rows at a time as fit)
//   gram            sum over the tile's positions of a(p, d) b(p, e) into per-thread
//                   registers (up to 8 x 8), for S = kr^T v and the pointwise weight gradient;
//                   a sum over several tiles waits in its global slot (gram_store / gram_load)
//                   while the next tiles are built, so that it costs no registers there
//
// Registers: the kernels run two blocks per SM (kMinBlocks; 16 warps of 64), so they must
// fit 128 registers per thread without spilling. The pointwise accumulators (64 floats)
// and the gram sums (72) are the largest live sets, and little else may be live beside
// them: gram sums wait in memory between tiles, conv taps are loaded a row at a time,
// and each phase computes its own indices and addresses (opaque).
// Tiles in shared memory are [position][channel] fp32 with an odd leading dimension
// D + 1, so both the position-strided reads of the products and the channel-strided
// reads of the layout-following stores are free of bank conflicts.
//
// The kernel size is a template (3, 5 or 9); other odd sizes run on the next larger one
// with their taps centred in zeros, which gives the same conv (padding k/2 vs K/2 only
// shifts where the zeros are).
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "common.h"

namespace linattn {
namespace aggregate {

constexpr int kThreads = 256;
constexpr int kTileH = 8;
constexpr int kTileW = 16;
constexpr int kTileP = kTileH * kTileW;  // positions per tile; the pointwise map needs 128
constexpr int kChunkC = 16;              // channels per halo chunk: 16 x 8 rows x 2 halves = kThreads
constexpr int kRun = 8;                  // consecutive positions of a row per thread in the conv
static_assert(kTileP == 128 && kChunkC * kTileH * (kTileW / kRun) == kThreads, "thread maps");
constexpr int kMinBlocks = 2;  // blocks per SM the kernels' registers must allow (__launch_bounds__)

// A (B, C, H, W) feature map addressed through element strides.
template <typename T>
struct Map {
  T* ptr;
  int64_t sb, sc, sh, sw;
  bool c_fast;  // channels are the densest dimension (channels_last): threads walk channels first
  bool vec;     // and kVec<T> channels from a multiple of kVec<T> are one aligned 16-byte access

  __device__ __forceinline__ int64_t offset(int b, int c, int h, int w) const {
    return static_cast<int64_t>(b) * sb + static_cast<int64_t>(c) * sc + static_cast<int64_t>(h) * sh +
           static_cast<int64_t>(w) * sw;
  }
};

// Channels in 16 bytes.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

template <typename T>
Map<T> make_map(const at::Tensor& t) {
  Map<T> m;
  m.ptr = reinterpret_cast<T*>(t.data_ptr());
  m.sb = t.stride(0);
  m.sc = t.stride(1);
  m.sh = t.stride(2);
  m.sw = t.stride(3);
  m.c_fast = t.size(1) > 1 && t.stride(1) < t.stride(3);
  constexpr int64_t v = kVec<T>;
  m.vec = m.c_fast && m.sc == 1 && reinterpret_cast<uintptr_t>(m.ptr) % 16 == 0 && m.sb % v == 0 && m.sh % v == 0 &&
          m.sw % v == 0;
  return m;
}

// v[j] = m(b, c + j, h, w) as fp32 for j < kVec<T>: one 16-byte load (m.vec, c a multiple of kVec<T>).
template <typename T>
__device__ __forceinline__ void load_vec(float (&v)[kVec<T>], const Map<const T>& m, int b, int c, int h, int w) {
  const uint4 raw = *reinterpret_cast<const uint4*>(m.ptr + m.offset(b, c, h, w));
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (sizeof(T) == 4) {
      v[i] = __uint_as_float(words[i]);
    } else {  // two 16-bit values, the lower channel in the low half
      v[2 * i] = static_cast<float>(T(static_cast<uint16_t>(words[i] & 0xffffu), T::from_bits()));
      v[2 * i + 1] = static_cast<float>(T(static_cast<uint16_t>(words[i] >> 16), T::from_bits()));
    }
  }
}

// The spatial tiling, and the chunk of tiles each block (blockIdx.y) walks.
struct Geometry {
  int H, W, D;
  int tiles_w, num_tiles, tiles_per_block;
};

// g's sizes through opaque() (common.h). Each phase of a tile (conv, pointwise, gram, loads
// and stores) takes the sizes, and the copies the thread index, through it.
using linattn::opaque;
__device__ __forceinline__ Geometry opaque(const Geometry& g) {
  Geometry o = g;
  o.H = opaque(g.H);
  o.W = opaque(g.W);
  o.D = opaque(g.D);
  return o;
}

__device__ __forceinline__ void chunk_tiles(const Geometry& g, int& first, int& last) {
  first = blockIdx.y * g.tiles_per_block;
  last = min(first + g.tiles_per_block, g.num_tiles);
}

__device__ __forceinline__ void tile_origin(const Geometry& g, int tile, int& h0, int& w0) {
  h0 = (tile / g.tiles_w) * kTileH;
  w0 = (tile % g.tiles_w) * kTileW;
}

__device__ __forceinline__ float relu(float x) { return x < 0.f ? 0.f : x; }  // keeps NaN

// ---- shared-memory sizes (floats) ---------------------------------------------------------

template <int K>
struct Halo {
  static constexpr int kH = kTileH + K - 1;
  static constexpr int kW = kTileW + K - 1;
  static constexpr int kPad = K / 2;
  static constexpr int kFloats = kChunkC * kH * kW;
};

// A [position][channel] tile: leading dimension D + 1.
__host__ __device__ __forceinline__ int tile_floats(int D) { return kTileP * (D + 1); }

// ---- tiles <-> global memory -----------------------------------------------------------------

// m(b, c + j, h, w) = v[j] rounded to T for j < kVec<T>: one 16-byte store (m.vec, c a multiple of kVec<T>).
template <typename T>
__device__ __forceinline__ void store_vec(const Map<T>& m, int b, int c, int h, int w, const float (&v)[kVec<T>]) {
  uint32_t words[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (sizeof(T) == 4) {
      words[i] = __float_as_uint(v[i]);
    } else {
      words[i] = static_cast<uint32_t>(T(v[2 * i]).x) | (static_cast<uint32_t>(T(v[2 * i + 1]).x) << 16);
    }
  }
  *reinterpret_cast<uint4*>(m.ptr + m.offset(b, c, h, w)) = make_uint4(words[0], words[1], words[2], words[3]);
}

// Stages channels [c0, c0 + cc) of x around the tile at (h0, w0) (a K/2 halo on every
// side) into halo[c][y][x] as fp32, zero outside the image and for c >= cc.
template <typename T, int K>
__device__ __forceinline__ void load_halo(float* halo, const Map<const T>& x, int b, int c0, int cc, int h0,
                                          int w0, const Geometry& geometry) {
  using Hl = Halo<K>;
  const Geometry g = opaque(geometry);
  constexpr int V = kVec<T>;
  if (x.vec && c0 % V == 0 && cc % V == 0) {  // channels_last: a thread's V channels of a position in one load
    for (int i = thread_index(); i < Hl::kH * Hl::kW * (kChunkC / V); i += kThreads) {
      const int cg = i % (kChunkC / V), s = i / (kChunkC / V);
      const int y = s / Hl::kW, xx = s % Hl::kW;
      const int h = h0 - Hl::kPad + y, w = w0 - Hl::kPad + xx;
      float v[V] = {};
      if (cg * V < cc && h >= 0 && h < g.H && w >= 0 && w < g.W) load_vec<T>(v, x, b, c0 + cg * V, h, w);
#pragma unroll
      for (int j = 0; j < V; ++j) halo[((cg * V + j) * Hl::kH + y) * Hl::kW + xx] = v[j];
    }
    return;
  }
  for (int i = thread_index(); i < Hl::kFloats; i += kThreads) {
    int c, y, xx;
    if (x.c_fast) {
      c = i % kChunkC;
      const int s = i / kChunkC;
      y = s / Hl::kW;
      xx = s % Hl::kW;
    } else {
      xx = i % Hl::kW;
      const int s = i / Hl::kW;
      y = s % Hl::kH;
      c = s / Hl::kH;
    }
    const int h = h0 - Hl::kPad + y, w = w0 - Hl::kPad + xx;
    float v = 0.f;
    if (c < cc && h >= 0 && h < g.H && w >= 0 && w < g.W) v = static_cast<float>(x.ptr[x.offset(b, c0 + c, h, w)]);
    halo[(c * Hl::kH + y) * Hl::kW + xx] = v;
  }
}

// Maps the i-th element of a (position, channel) walk over `channels` channels to
// (p, c), channels first when m's channels are dense so that the accesses coalesce.
template <typename T>
__device__ __forceinline__ void tile_element(const Map<T>& m, int i, int channels, int& p, int& c) {
  if (m.c_fast) {
    c = i % channels;
    p = i / channels;
  } else {
    p = i % kTileP;
    c = i / kTileP;
  }
}

// tile[p][c] = m(b, c0 + c, position p) (its ReLU when RELU), zero outside the image.
template <typename T, bool RELU = false>
__device__ __forceinline__ void load_tile(float* tile, const Map<const T>& m, int b, int c0, int h0, int w0,
                                          const Geometry& geometry) {
  const Geometry g = opaque(geometry);
  const int ld = g.D + 1;
  for (int i = thread_index(); i < kTileP * g.D; i += kThreads) {
    int p, c;
    tile_element(m, i, g.D, p, c);
    const int h = h0 + p / kTileW, w = w0 + p % kTileW;
    const float v = h < g.H && w < g.W ? static_cast<float>(m.ptr[m.offset(b, c0 + c, h, w)]) : 0.f;
    tile[p * ld + c] = RELU ? relu(v) : v;
  }
}

// m(b, c0 + c, position p) = tile[p][c] (divided by den[p] if den is given) for the
// positions inside the image.
template <typename T>
__device__ __forceinline__ void store_tile(const Map<T>& m, int b, int c0, int h0, int w0,
                                           const Geometry& geometry, const float* tile,
                                           const float* den = nullptr) {
  const Geometry g = opaque(geometry);
  const int ld = g.D + 1;
  for (int i = thread_index(); i < kTileP * g.D; i += kThreads) {
    int p, c;
    tile_element(m, i, g.D, p, c);
    const int h = h0 + p / kTileW, w = w0 + p % kTileW;
    if (h < g.H && w < g.W) {
      float v = tile[p * ld + c];
      if (den != nullptr) v = v / den[p];
      m.ptr[m.offset(b, c0 + c, h, w)] = static_cast<T>(v);
    }
  }
}

// ---- depthwise conv ------------------------------------------------------------------------

// The conv thread map: channel of the chunk, tile row, first of its kRun positions.
struct ConvThread {
  int ch, row, x0;
  __device__ __forceinline__ ConvThread()
      : ch(thread_index() / (kThreads / kChunkC)),
        row((thread_index() / (kTileW / kRun)) % kTileH),
        x0((thread_index() % (kTileW / kRun)) * kRun) {}
};

// Row i of the K x K taps of channel c from a contiguous (C, 1, k, k) weight, k <= K
// centred in zeros; flipped (w[K-1-i][K-1-j]) for the transposed conv. Zeros when !valid.
template <typename T, int K>
__device__ __forceinline__ void load_tap_row(float (&w)[K], const T* wd, int c, int k, int i, bool valid,
                                             bool flip) {
  const int off = (K - k) / 2;
  const int si = (flip ? K - 1 - i : i) - off;
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const int sj = (flip ? K - 1 - j : j) - off;
    const bool inside = valid && si >= 0 && si < k && sj >= 0 && sj < k;
    w[j] = inside ? static_cast<float>(wd[(static_cast<int64_t>(c) * k + si) * k + sj]) : 0.f;
  }
}

// acc[j] += sum_{i, jj} w[i][jj] halo_c[row + i][x0 + j + jj] for the thread's kRun
// positions, tap_row(i, w) filling w with the taps of kernel row i: one register window of
// kRun + K - 1 values per conv row. The taps are loaded a row at a time, and at K = 9 the
// rows are a loop: unrolled, the scheduler fetches all 81 taps ahead, which needs more
// registers than kMinBlocks leaves.
template <int K, typename TapRow>
__device__ __forceinline__ void conv_rows(float (&acc)[kRun], const float* halo_c, const ConvThread& t,
                                          TapRow&& tap_row) {
  using Hl = Halo<K>;
  constexpr int kRowUnroll = K <= 5 ? K : 1;
#pragma unroll kRowUnroll
  for (int i = 0; i < K; ++i) {
    float w[K];
    tap_row(i, w);
    float win[kRun + K - 1];
    const float* src = halo_c + (t.row + i) * Hl::kW + t.x0;
#pragma unroll
    for (int j = 0; j < kRun + K - 1; ++j) win[j] = src[j];
#pragma unroll
    for (int jj = 0; jj < K; ++jj) {
#pragma unroll
      for (int j = 0; j < kRun; ++j) acc[j] = fmaf(w[jj], win[j + jj], acc[j]);
    }
  }
}

// conv_rows with the taps of load_tap_row(wd, c, k, i, valid, flip).
template <typename T, int K>
__device__ __forceinline__ void conv_run(float (&acc)[kRun], const float* halo_c, const T* wd, int c, int k,
                                         bool valid, bool flip, const ConvThread& t) {
  conv_rows<K>(acc, halo_c, t, [&](int i, float(&w)[K]) { load_tap_row<T, K>(w, wd, c, k, i, valid, flip); });
}

// taps[c][i][:] (fp32, K x K a channel) = load_tap_row's row i of channel c0 + c, c < channels (for conv_rows from
// shared memory; every thread must call it).
template <typename T, int K>
__device__ __forceinline__ void stage_taps(float* taps, const T* wd, int c0, int channels, int k) {
  for (int r = thread_index(); r < channels * K; r += kThreads) {  // r: row r % K of channel r / K
    float w[K];
    load_tap_row<T, K>(w, wd, c0 + r / K, k, r % K, true, false);
#pragma unroll
    for (int j = 0; j < K; ++j) taps[r * K + j] = w[j];
  }
}

// tile[p][c] = dwconv(x)[c0 + c] + bd at the tile's positions, for the group's D
// channels starting at c0 (positions outside the image get whatever the zero padding
// gives). When x0.ptr is set, also copies x itself there (the identity branch of the
// output). Begins and ends with a barrier, so the tile and the halo may be read or
// overwritten by anyone before and after. (x0 comes by value: a pointer to a kernel
// argument would put a copy of it on the stack.)
// SHARED_TAPS: the group's taps come from `taps` (stage_taps of its D channels) instead of wd.
template <typename T, int K, bool SHARED_TAPS = false>
__device__ void dwconv_tile(float* tile, float* halo, const Map<const T>& x, int b, int c0, int h0, int w0,
                            const Geometry& geometry, const T* wd, const T* bd, int k, const Map<T> x0,
                            const float* taps = nullptr) {
  using Hl = Halo<K>;
  const Geometry g = opaque(geometry);
  const int ld = g.D + 1;
  const ConvThread t;
  for (int cc0 = 0; cc0 < g.D; cc0 += kChunkC) {
    const int cc = min(kChunkC, g.D - cc0);
    __syncthreads();  // the previous chunk's conv is done with the halo
    load_halo<T, K>(halo, x, b, c0 + cc0, cc, h0, w0, g);
    __syncthreads();
    if (x0.ptr != nullptr) {
      for (int i = thread_index(); i < kTileP * cc; i += kThreads) {
        int p, c;
        tile_element(x0, i, cc, p, c);
        const int r = p / kTileW, s = p % kTileW;
        if (h0 + r < g.H && w0 + s < g.W) {
          x0.ptr[x0.offset(b, c0 + cc0 + c, h0 + r, w0 + s)] =
              static_cast<T>(halo[(c * Hl::kH + r + Hl::kPad) * Hl::kW + s + Hl::kPad]);
        }
      }
    }
    if (t.ch < cc) {
      const int c = c0 + cc0 + t.ch;
      const float bias = bd != nullptr ? static_cast<float>(bd[c]) : 0.f;
      float acc[kRun];
#pragma unroll
      for (int j = 0; j < kRun; ++j) acc[j] = bias;
      if constexpr (SHARED_TAPS) {
        const float* mine = taps + (cc0 + t.ch) * K * K;
        conv_rows<K>(acc, halo + t.ch * Hl::kH * Hl::kW, t, [&](int i, float(&w)[K]) {
#pragma unroll
          for (int j = 0; j < K; ++j) w[j] = mine[i * K + j];
        });
      } else {
        conv_run<T, K>(acc, halo + t.ch * Hl::kH * Hl::kW, wd, c, k, true, false, t);
      }
#pragma unroll
      for (int j = 0; j < kRun; ++j) tile[(t.row * kTileW + t.x0 + j) * ld + cc0 + t.ch] = acc[j];
    }
  }
  __syncthreads();
}

// ---- products on fp32 tiles ---------------------------------------------------------------------

// The pointwise thread map: positions p = lane + 32 * pp (pp < 4), output channels
// c = warp + 8 * i (i < 16, c < D).
constexpr int kPwRows = kTileP / 32;
constexpr int kPwCols = 16;
using PwAcc = float[kPwRows][kPwCols];

__device__ __forceinline__ int pw_row(int pp) { return threadIdx.x % 32 + 32 * pp; }
__device__ __forceinline__ int pw_col(int i) { return threadIdx.x / 32 + (kThreads / 32) * i; }
// How many of the thread's columns are < D: pw_col(i) < D exactly when i < pw_cols(D), a
// test against one register (not one column index per i).
__device__ __forceinline__ int pw_cols(int D) { return (D - pw_col(0) + kThreads / 32 - 1) / (kThreads / 32); }

__device__ __forceinline__ void pointwise_zero(PwAcc& acc) {
#pragma unroll
  for (int pp = 0; pp < kPwRows; ++pp)
#pragma unroll
    for (int i = 0; i < kPwCols; ++i) acc[pp][i] = 0.f;
}

// acc(p, c) += sum_{j0 <= j < j1} m[(j - j0) * ldm + c] * tile[p][j], j increasing, with m
// a shared [j][c] matrix. c is uniform across each warp (m is a broadcast load), and the
// thread's columns are fixed offsets from one row pointer: no address registers per column.
__device__ __forceinline__ void pointwise_rows(PwAcc& acc, const float* tile, int D, int j0, int j1,
                                               const float* m, int ldm) {
  const int ld = D + 1;
  const int cols = pw_cols(D);
  const float* mrow = m + pw_col(0);
  for (int j = j0; j < j1; ++j, mrow += ldm) {
    float a[kPwRows];
#pragma unroll
    for (int pp = 0; pp < kPwRows; ++pp) a[pp] = tile[pw_row(pp) * ld + j];
#pragma unroll
    for (int i = 0; i < kPwCols; ++i) {
      if (i < cols) {
        const float mv = mrow[pw_col(i) - pw_col(0)];
#pragma unroll
        for (int pp = 0; pp < kPwRows; ++pp) acc[pp][i] = fmaf(mv, a[pp], acc[pp][i]);
      }
    }
  }
}

// acc(p, c) = sum_{j < D} W(c, j) * tile[p][j], j increasing, for a (D x D) matrix W in
// global memory: w[c * D + j], or w[j * D + c] when TRANSPOSED. W is staged as fp32 [j][c]
// rows in `scratch` (scratch_floats of shared memory that nobody else uses until the
// caller's next barrier), as many rows at a time as fit; every thread must call it.
template <bool TRANSPOSED, typename T>
__device__ __forceinline__ void pointwise(PwAcc& acc, const float* tile, int group, const T* w, float* scratch,
                                          int scratch_floats) {
  const int D = opaque(group);
  const int ldm = D + 1;  // odd: the transposing writes are free of bank conflicts
  const int rows = min(D, scratch_floats / ldm);
  pointwise_zero(acc);
  for (int j0 = 0; j0 < D; j0 += rows) {
    const int n = min(rows, D - j0);
    if (j0 > 0) __syncthreads();  // everyone is done with the previous rows
    // a warp per row of w, its lanes along the row (coalesced); neither divisions nor
    // unrolled loads: they would need registers here, where acc is live
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (TRANSPOSED) {
#pragma unroll 1
      for (int r = warp; r < n; r += kThreads / 32)
#pragma unroll 1
        for (int c = lane; c < D; c += 32) scratch[r * ldm + c] = static_cast<float>(w[(j0 + r) * D + c]);
    } else {
#pragma unroll 1
      for (int c = warp; c < D; c += kThreads / 32)
#pragma unroll 1
        for (int r = lane; r < n; r += 32) scratch[r * ldm + c] = static_cast<float>(w[c * D + j0 + r]);
    }
    __syncthreads();
    pointwise_rows(acc, tile, D, j0, j0 + n, scratch, ldm);
  }
}

// The gram thread map: rows d = t % 16 + 16 * i, columns e = t / 16 + 16 * j (i, j < 8).
constexpr int kGram = 8;
using GramAcc = float[kGram][kGram];

__device__ __forceinline__ int gram_row(int i) { return threadIdx.x % 16 + 16 * i; }
__device__ __forceinline__ int gram_col(int j) { return threadIdx.x / 16 + 16 * j; }
// gram_row(i) < D exactly when i < gram_rows(D), gram_col(j) < D when j < gram_cols(D)
// (see pw_cols).
__device__ __forceinline__ int gram_rows(int D) { return (D - gram_row(0) + 15) / 16; }
__device__ __forceinline__ int gram_cols(int D) { return (D - gram_col(0) + 15) / 16; }

// r(d, e) += sum_p a[p][d] * b[p][e] and col(d) += sum_p a[p][d] over the tile's
// positions in order (every thread sums col for its rows; callers keep one column's).
__device__ __forceinline__ void gram(GramAcc& r, float (&col)[kGram], const float* a, const float* b, int group) {
  const int D = opaque(group);
  const int ld = D + 1, rows = gram_rows(D), cols = gram_cols(D);
  for (int p = 0; p < kTileP; ++p) {
    float av[kGram], bv[kGram];
#pragma unroll
    for (int i = 0; i < kGram; ++i) {
      av[i] = i < rows ? a[p * ld + gram_row(i)] : 0.f;
      bv[i] = i < cols ? b[p * ld + gram_col(i)] : 0.f;
    }
#pragma unroll
    for (int i = 0; i < kGram; ++i) {
      if (16 * i < D) {
        col[i] += av[i];
#pragma unroll
        for (int j = 0; j < kGram; ++j)
          if (16 * j < D) r[i][j] = fmaf(av[i], bv[j], r[i][j]);
      }
    }
  }
}

__device__ __forceinline__ void gram_zero(GramAcc& r, float (&col)[kGram]) {
#pragma unroll
  for (int i = 0; i < kGram; ++i) {
    col[i] = 0.f;
#pragma unroll
    for (int j = 0; j < kGram; ++j) r[i][j] = 0.f;
  }
}

// dst[d * D + e] = r(d, e), dst[D * D + d] = col(d) (from the threads whose gram_col(0) is 0).
__device__ __forceinline__ void gram_store(const GramAcc& r, const float (&col)[kGram], float* dst, int group) {
  const int D = opaque(group);
  const int rows = gram_rows(D), cols = gram_cols(D);
#pragma unroll
  for (int i = 0; i < kGram; ++i) {
    const int d = gram_row(i);
    if (i >= rows) continue;
#pragma unroll
    for (int j = 0; j < kGram; ++j) {
      if (j < cols) dst[d * D + gram_col(j)] = r[i][j];
    }
    if (gram_col(0) == 0) dst[D * D + d] = col[i];
  }
}

// r, col back from what this thread's gram_store wrote to src; what it did not write
// (past D, and col where gram_col(0) != 0) is zero, and no gram_store reads it back.
__device__ __forceinline__ void gram_load(GramAcc& r, float (&col)[kGram], const float* src, int group) {
  const int D = opaque(group);
  const int rows = gram_rows(D), cols = gram_cols(D);
  gram_zero(r, col);
#pragma unroll
  for (int i = 0; i < kGram; ++i) {
    const int d = gram_row(i);
    if (i >= rows) continue;
#pragma unroll
    for (int j = 0; j < kGram; ++j) {
      if (j < cols) r[i][j] = src[d * D + gram_col(j)];
    }
    if (gram_col(0) == 0) col[i] = src[D * D + d];
  }
}

// The aggregated group: tile[p][c] = (Wp (dwconv(x) + bd) + bp)[c0 + c], relu'd if RELU,
// zero at positions outside the image (so sums over the tile are sums over the image).
template <typename T, int K, bool RELU>
__device__ void aggregate_tile(float* tile, float* halo, const Map<const T>& x, int b, int c0, int h0, int w0,
                               const Geometry& g, const T* wd, const T* bd, const T* wp, const T* bp, int k,
                               const Map<T> x0) {
  dwconv_tile<T, K>(tile, halo, x, b, c0, h0, w0, g, wd, bd, k, x0);  // ends with a barrier: halo is free
  PwAcc acc;
  pointwise<false>(acc, tile, g.D, wp + static_cast<int64_t>(c0) * g.D, halo, Halo<K>::kFloats);
  __syncthreads();  // everyone is done reading the conv tile and halo: the conv tile becomes the output tile
  const Geometry gt = opaque(g);
  const int ld = gt.D + 1, cols = pw_cols(gt.D);
  bool inside[kPwRows];
#pragma unroll
  for (int pp = 0; pp < kPwRows; ++pp) {
    const int p = pw_row(pp);
    inside[pp] = h0 + p / kTileW < gt.H && w0 + p % kTileW < gt.W;
  }
  // column by column: one bias value live at a time
#pragma unroll
  for (int i = 0; i < kPwCols; ++i) {
    if (i < cols) {
      const int c = pw_col(i);
      const float bias = bp != nullptr ? static_cast<float>(bp[c0 + c]) : 0.f;
#pragma unroll
      for (int pp = 0; pp < kPwRows; ++pp) {
        float y = acc[pp][i] + bias;
        if (RELU) y = relu(y);
        tile[pw_row(pp) * ld + c] = inside[pp] ? y : 0.f;
      }
    }
  }
  __syncthreads();
}

// ---- host side ----------------------------------------------------------------------------------

// Tiles of the H x W map, split into chunks so that about `blocks_per_sm` blocks per SM run
// over the `rows` block rows; a chunk of tiles shares one block's partial sums.
inline Geometry plan(int64_t rows, int64_t H, int64_t W, int64_t D, int blocks_per_sm = 8) {
  Geometry g;
  g.H = static_cast<int>(H);
  g.W = static_cast<int>(W);
  g.D = static_cast<int>(D);
  g.tiles_w = static_cast<int>((W + kTileW - 1) / kTileW);
  const int64_t tiles = ((H + kTileH - 1) / kTileH) * g.tiles_w;
  TORCH_CHECK(tiles <= std::numeric_limits<int>::max(), "linattn: feature map of ", H, " x ", W, " is too large");
  g.num_tiles = static_cast<int>(tiles);
  const int64_t target = blocks_per_sm * static_cast<int64_t>(device_attribute(cudaDevAttrMultiProcessorCount));
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>((target + rows - 1) / rows, tiles));
  g.tiles_per_block = static_cast<int>((tiles + splits - 1) / splits);
  return g;
}

inline int num_splits(const Geometry& g) { return (g.num_tiles + g.tiles_per_block - 1) / g.tiles_per_block; }

// Launches kernel on the current stream with smem bytes of dynamic shared memory,
// opting in above 48 KiB (large group sizes and kernels); `op` names the op in errors.
template <typename Kernel, typename... Args>
void launch(const char* op, Kernel kernel, dim3 grid, size_t smem, Args... args) {
  if (smem > 48 * 1024) {
    const size_t optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
    TORCH_CHECK(smem <= optin, "linattn.", op, " (cuda): this group size and kernel size need ", smem,
                " bytes of shared memory per block, this GPU allows ", optin,
                "; use a smaller group size or another backend");
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LINATTN_LAUNCH(kernel, grid, kThreads, smem, stream)(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls f with std::integral_constant<int, K> for the compiled kernel size that runs k.
template <typename F>
void dispatch_ksize(int64_t k, F&& f) {
  if (k <= 3) {
    f(std::integral_constant<int, 3>{});
  } else if (k == 5) {
    f(std::integral_constant<int, 5>{});
  } else {
    f(std::integral_constant<int, 9>{});
  }
}

// ---- argument checks ----------------------------------------------------------------------------

// Checks with the op's name (a runtime string here: two ops share these).
#define AGG_CHECK(cond, ...) TORCH_CHECK_VALUE((cond), "linattn.", op, " (cuda): ", __VA_ARGS__)
#define AGG_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE((cond), "linattn.", op, " (cuda): ", __VA_ARGS__)

// One list of per-scale weights or biases: device, dtype, contiguity, shape (sizes).
// Entries are named from index `first` on.
inline void check_list(const char* op, const char* name, at::TensorList list, const at::Tensor& qkv,
                       at::IntArrayRef sizes, const char* layout, size_t first = 0) {
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& t = list[i];
    const size_t s = first + i;
    AGG_CHECK(t.device() == qkv.device(), name, "[", s, "] must be on qkv's device ", qkv.device(), ", got ",
              t.device());
    AGG_CHECK_TYPE(t.scalar_type() == qkv.scalar_type(), name, "[", s, "] must have qkv's dtype ",
                   qkv.scalar_type(), ", got ", t.scalar_type());
    AGG_CHECK(t.sizes() == sizes, name, "[", s, "] must be ", layout, " = ", sizes, ", got ", t.sizes());
    AGG_CHECK(t.is_contiguous(), name, "[", s, "] must be contiguous");
  }
}

// The aggregation's arguments; returns the group size D.
inline int64_t check_aggregation(const char* op, const at::Tensor& qkv, at::TensorList dw_weights,
                                 at::TensorList pw_weights, int64_t heads, at::TensorList dw_biases,
                                 at::TensorList pw_biases) {
  AGG_CHECK(qkv.dim() == 4, "qkv must be 4-D (B, 3*heads*D, H, W), got shape ", qkv.sizes());
  AGG_CHECK(qkv.is_cuda(), "qkv must be a CUDA tensor, got device ", qkv.device());
  AGG_CHECK_TYPE(qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kHalf ||
                     qkv.scalar_type() == at::kBFloat16,
                 "qkv must be float32, float16 or bfloat16, got ", qkv.scalar_type());
  const int64_t C = qkv.size(1);
  AGG_CHECK(heads >= 1 && C % (3 * heads) == 0, "heads must be >= 1 and divide qkv's channels (", C,
            ") into 3*heads groups, got ", heads);
  const int64_t D = C / (3 * heads);
  AGG_CHECK(D >= 1 && D <= 128, "group size C/(3*heads) must be in [1, 128], got ", D);
  const size_t S = dw_weights.size();
  AGG_CHECK(S >= 1 && pw_weights.size() == S, "dw_weights and pw_weights need one entry per scale, got ", S,
            " and ", pw_weights.size());
  for (size_t s = 0; s < S; ++s) {
    const at::Tensor& wd = dw_weights[s];
    const int64_t k = wd.dim() == 4 ? wd.size(3) : 0;
    AGG_CHECK(k % 2 == 1 && k <= 9, "dw_weights[", s, "] must be (C, 1, k, k) with k odd <= 9, got shape ",
              wd.sizes());
    check_list(op, "dw_weights", dw_weights.slice(s, 1), qkv, {C, 1, k, k}, "(C, 1, k, k)", s);
  }
  check_list(op, "pw_weights", pw_weights, qkv, {C, D, 1, 1}, "(C, D, 1, 1)");
  AGG_CHECK(dw_biases.empty() || dw_biases.size() == S, "dw_biases needs no entry or one per scale, got ",
            dw_biases.size(), " for ", S, " scales");
  AGG_CHECK(pw_biases.empty() || pw_biases.size() == S, "pw_biases needs no entry or one per scale, got ",
            pw_biases.size(), " for ", S, " scales");
  check_list(op, "dw_biases", dw_biases, qkv, {C}, "(C,)");
  check_list(op, "pw_biases", pw_biases, qkv, {C}, "(C,)");
  AGG_CHECK(qkv.size(2) <= (1 << 24) && qkv.size(3) <= (1 << 24), "feature map ", qkv.size(2), " x ",
            qkv.size(3), " is too large");
  AGG_CHECK(qkv.size(0) * 3 * heads <= std::numeric_limits<int>::max(), "B * 3 * heads is too large");
  return D;
}

// The output must not overlap its inputs: blocks write while others still read.
inline void check_no_overlap(const char* op, const at::Tensor& out, const char* out_name, const at::Tensor& in,
                             const char* in_name) {
  const at::MemOverlapStatus status = at::get_overlap_status(out, in);
  TORCH_CHECK_VALUE(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, "linattn.",
                    op, " (cuda): ", out_name, " must not share memory with ", in_name);
}

template <typename T>
const T* data_or_null(at::TensorList list, size_t s) {
  return list.empty() ? nullptr : reinterpret_cast<const T*>(list[s].data_ptr());
}

}  // namespace aggregate
}  // namespace linattn
