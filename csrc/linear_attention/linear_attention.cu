// ReLU linear attention (DESIGN 3.1, 3.2): CUDA kernels, launchers and op registration.
//
// Per (batch b, head h), with kr = relu(k), qr = relu(q), all sums in fp32:
//   forward   S = sum_m kr_m^T v_m (D x E),  z = sum_m kr_m (D)
//             den_n = qr_n . z + eps,  out_n = qr_n S / den_n
//   backward  a_n = g_n / den_n,  c_n = -(g_n . out_n) / den_n
//             dq_n = q_n > 0 ? S a_n + z c_n : 0
//             dS = sum_n qr_n^T a_n,  dz = sum_n qr_n c_n
//             dk_m = k_m > 0 ? dS v_m + dz : 0,  dv_m = kr_m dS
//
// Layout contract: q, k (B, H, N, D), v, out, grad_out (B, H, N, E) with any strides,
// read and written through them. The hot case is the packed LiteMLA layout (q, k, v,
// out are views of a (B, G*3*D, H*W) tensor, so N is the contiguous dimension); a
// plain contiguous tensor has D contiguous. Both are coalesced: tiles of N rows go
// through shared memory, and the thread-to-element map follows the contiguous dim.
//
// Kernels (grid: blockIdx.x = b*H + h, blockIdx.y = a chunk of consecutive N tiles):
//   kv_state_kernel   S, z of one chunk           -> fp32 partials in a workspace
//   sum_partials      partials of all chunks      -> S, z (only when there are several)
//   fwd_out_kernel    out of a chunk, from S, z
//   bwd_dq_kernel     dq of a chunk, and its dS, dz partials (recomputing out)
//   bwd_dkv_kernel    dk, dv of a chunk, from dS, dz
// Every sum has a fixed order (no atomics), so results are deterministic.
//
// A block (128 threads; 256 for BX = 128) walks the tiles of its chunk, kRows = 2048 / BX
// rows each: it stages a tile in shared memory as fp32 while the next one is loaded into
// registers, and computes with register-tiled fp32 FMAs (TileGemm); S or dS stays in
// shared memory for the whole chunk. Chunks per (b, h) are chosen (plan) so that about
// 8 blocks per SM are launched. __launch_bounds__ hold every kernel to the registers of
// 16 resident warps per SM (Config::kMinBlocks; bwd_dq fewer above BX = 32, see
// kMinBlocksDq), unspilled.
//
// Templates: the scalar type (float, half, bfloat16) and BX, the head dim padded to
// 32, 64 or 128 (both D and E are padded to it; the padding is zeros in shared memory).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

#include "common.h"

#define LA_OP "relu_linear_attention"  // the op named in error messages

namespace linattn {
namespace {

// ---- configuration -------------------------------------------------------------------

// Sizes for one head-dim bucket BX. A tile is kRows rows of N by BX columns (2048
// elements); shared-memory tiles are fp32 with leading dimension kLd = BX + 4, which
// keeps rows 16-byte aligned and makes float4 accesses that walk down rows
// conflict-free (kLd % 32 == 4).
template <int BX>
struct Config {
  static_assert(BX == 32 || BX == 64 || BX == 128, "head-dim bucket");
  static constexpr int kThreads = BX == 128 ? 256 : 128;
  // Blocks per SM that the kernels' registers must allow (__launch_bounds__): 16 warps of
  // 64, i.e. at most 128 registers per thread.
  static constexpr int kMinBlocks = 16 * 32 / kThreads;
  // bwd_dq holds dS (8 floats a thread at BX = 32, 32 and 64 above) through its loop,
  // beside the tile products and the next tiles' loads: above BX = 32 it fits 12 warps
  // (8 at BX = 128) without spilling, not 16.
  static constexpr int kMinBlocksDq = BX == 32 ? kMinBlocks : 12 * 32 / kThreads;
  static constexpr int kRows = 2048 / BX;
  static constexpr int kLd = BX + 4;
  static constexpr int kTileFloats = kRows * kLd;  // one (kRows x BX) row tile
  static constexpr int kStateFloats = BX * kLd;    // one (BX x BX) state matrix (S or dS)
};

// A (B, H, N, X) tensor as the kernels see it: element strides and the access order.
template <typename T>
struct Operand {
  T* ptr;
  int64_t stride_b, stride_h, stride_n, stride_x;
  bool n_fast;  // N is the contiguous dimension: consecutive threads take consecutive rows

  __device__ T* head(int b, int h) const {
    return ptr + static_cast<int64_t>(b) * stride_b + static_cast<int64_t>(h) * stride_h;
  }
};

struct Sizes {
  int H, N, D, E;
  int num_tiles;        // ceil(N / kRows)
  int tiles_per_block;  // tiles of one chunk (blockIdx.y)
};

__device__ __forceinline__ float relu(float x) { return x < 0.f ? 0.f : x; }  // keeps NaN

// ---- global <-> shared tiles -------------------------------------------------------------

// Moves the rows [n0, n0 + kRows) of one head's (N, X) matrix between global memory
// and a shared fp32 tile s[r * kLd + x] (x < BX; zeros outside the matrix). A thread
// handles kChunks groups of 4 consecutive x. With n_fast, consecutive threads take
// consecutive rows (coalesced when N is contiguous), otherwise consecutive groups of
// x in one row (coalesced when X is contiguous); the shared side is one float4 either
// way. Loads go to registers first (load, then stage), so a loop can fetch the next
// tile while it computes on the current one.
template <typename T, int BX>
struct TileIO {
  using C = Config<BX>;
  static constexpr int kChunks = C::kRows * BX / 4 / C::kThreads;
  static_assert(kChunks * 4 * C::kThreads == C::kRows * BX, "tile split");

  using Regs = T[kChunks][4];

  static __device__ __forceinline__ void chunk(int c, bool n_fast, int& r, int& x) {
    if (n_fast) {
      r = c % C::kRows;
      x = 4 * (c / C::kRows);
    } else {
      r = c / (BX / 4);
      x = 4 * (c % (BX / 4));
    }
  }

  // Fetches rows [n0, n0 + kRows) of m (base = m.head(b, h)) into registers.
  static __device__ __forceinline__ void load(Regs& regs, const Operand<const T>& m, const T* base, int n0,
                                              int N, int X) {
    const int tid = thread_index();  // (see opaque)
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      int r, x;
      chunk(tid + i * C::kThreads, m.n_fast, r, x);
      const int n = n0 + r;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t offset =
            static_cast<int64_t>(n) * m.stride_n + static_cast<int64_t>(x + j) * m.stride_x;
        regs[i][j] = (n < N && x + j < X) ? base[offset] : static_cast<T>(0.f);
      }
    }
  }

  // Converts what load fetched from m to fp32 (relu applied if RELU) into s.
  template <bool RELU>
  static __device__ __forceinline__ void stage(float* s, const Regs& regs, const Operand<const T>& m) {
    const int tid = thread_index();
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      int r, x;
      chunk(tid + i * C::kThreads, m.n_fast, r, x);
      float4 f = make_float4(static_cast<float>(regs[i][0]), static_cast<float>(regs[i][1]),
                             static_cast<float>(regs[i][2]), static_cast<float>(regs[i][3]));
      if (RELU) {
        f = make_float4(relu(f.x), relu(f.y), relu(f.z), relu(f.w));
      }
      *reinterpret_cast<float4*>(s + r * C::kLd + x) = f;
    }
  }

  // Writes s (rows < N, columns < X) to the rows [n0, n0 + kRows) of m, cast to T.
  static __device__ __forceinline__ void store(const Operand<T>& m, T* base, int n0, int N, int X,
                                               const float* s) {
    const int tid = thread_index();
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      int r, x;
      chunk(tid + i * C::kThreads, m.n_fast, r, x);
      const int n = n0 + r;
      if (n < N) {
        const float4 f = *reinterpret_cast<const float4*>(s + r * C::kLd + x);
        const float v[4] = {f.x, f.y, f.z, f.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (x + j < X) {
            base[static_cast<int64_t>(n) * m.stride_n + static_cast<int64_t>(x + j) * m.stride_x] =
                static_cast<T>(v[j]);
          }
        }
      }
    }
  }
};

// ---- block products on shared tiles ------------------------------------------------------

// C(m, x) = sum_{k < K} A(k, m) * B(k, x) for an (M x X) result over the block's
// threads, operands in shared memory with leading dimension kLd. An operand is
// k-major when stored A[k * kLd + m] and k-minor when stored A[m * kLd + k]. Each
// thread accumulates a TM x 4 register tile, reading float4s: along m (its rows are
// contiguous) for a k-major operand, along k (its rows are strided) for a k-minor one.
// Both are free of bank conflicts with kLd % 32 == 4. The k order is fixed.
template <int BX, int M, int X, int K, bool A_KMAJOR, bool B_KMAJOR>
struct TileGemm {
  using C = Config<BX>;
  static constexpr int TX = 4;
  static constexpr int kColThreads = X / TX;  // consecutive threads, at most a warp
  static constexpr int kRowThreads = C::kThreads / kColThreads;
  static constexpr int TM = M / kRowThreads;
  static_assert(kColThreads <= 32 && 32 % kColThreads == 0, "column threads within a warp");
  static_assert(TM * kRowThreads == M && (TM == 1 || TM == 2 || TM % 4 == 0), "row split");
  static_assert(K % 4 == 0, "k steps of 4");

  using Acc = float[TM][TX];

  static __device__ __forceinline__ int row_thread() { return threadIdx.x / kColThreads; }
  static __device__ __forceinline__ int col_thread() { return threadIdx.x % kColThreads; }
  // The m of the thread's i-th row and the x of its j-th column.
  static __device__ __forceinline__ int row(int i) {
    return A_KMAJOR ? row_thread() * TM + i : row_thread() + kRowThreads * i;
  }
  static __device__ __forceinline__ int col(int j) {
    return B_KMAJOR ? col_thread() * TX + j : col_thread() + kColThreads * j;
  }

  static __device__ __forceinline__ void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TX; ++j) acc[i][j] = 0.f;
  }

  // f[kk][w] = operand(k + kk, w-th owned index) of a k-major operand, for kk < KS.
  template <int W, int KS>
  static __device__ __forceinline__ void fetch_rows(float (&f)[KS][W], const float* s, int k, int first) {
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      const float* p = s + (k + kk) * C::kLd + first;
      if constexpr (W % 4 == 0) {
#pragma unroll
        for (int w = 0; w < W; w += 4) {
          const float4 t = *reinterpret_cast<const float4*>(p + w);
          f[kk][w] = t.x;
          f[kk][w + 1] = t.y;
          f[kk][w + 2] = t.z;
          f[kk][w + 3] = t.w;
        }
      } else if constexpr (W == 2) {
        const float2 t = *reinterpret_cast<const float2*>(p);
        f[kk][0] = t.x;
        f[kk][1] = t.y;
      } else {
        f[kk][0] = p[0];
      }
    }
  }

  // f[kk][w] = operand(k + kk, w-th owned index), for kk < 4.
  template <int W, bool KMAJOR>
  static __device__ __forceinline__ void fetch(float (&f)[4][W], const float* s, int k, int first, int step) {
    if constexpr (KMAJOR) {
      fetch_rows<W, 4>(f, s, k, first);
    } else {
#pragma unroll
      for (int w = 0; w < W; ++w) {
        const float4 t = *reinterpret_cast<const float4*>(s + (first + w * step) * C::kLd + k);
        f[0][w] = t.x;
        f[1][w] = t.y;
        f[2][w] = t.z;
        f[3][w] = t.w;
      }
    }
  }

  static __device__ __forceinline__ void run(Acc& acc, const float* A, const float* B) {
    const int a_first = A_KMAJOR ? row_thread() * TM : row_thread();
    const int b_first = B_KMAJOR ? col_thread() * TX : col_thread();
#pragma unroll 2
    for (int k = 0; k < K; k += 4) {
      float b[4][TX];
      fetch<TX, B_KMAJOR>(b, B, k, b_first, kColThreads);
      if constexpr (A_KMAJOR) {
        // A a k at a time: its TM values (up to 16) for 4 k's would not fit beside a
        // (TM x 4) accumulator in the 128 registers of kMinBlocks
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          float a[1][TM];
          fetch_rows<TM, 1>(a, A, k + kk, a_first);
#pragma unroll
          for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TX; ++j) acc[i][j] = fmaf(a[0][i], b[kk][j], acc[i][j]);
        }
      } else {
        float a[4][TM];
        fetch<TM, false>(a, A, k, a_first, kRowThreads);
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
#pragma unroll
          for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TX; ++j) acc[i][j] = fmaf(a[kk][i], b[kk][j], acc[i][j]);
      }
    }
  }

  // Sum of v over the kColThreads threads that share the thread's rows (a butterfly:
  // every one of them gets the same bits).
  static __device__ __forceinline__ float row_sum(float v) {
#pragma unroll
    for (int offset = kColThreads / 2; offset > 0; offset /= 2) {
      v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
  }
};

// ---- small block helpers ------------------------------------------------------------------

// This thread's share of the column sums of a row tile, sum_r w[r] * s[r][x] (w = 1
// when null): column x = tid % BX, rows tid / BX + (threads / BX) * j.
template <int BX>
__device__ __forceinline__ float column_partial(const float* s, const float* w) {
  using C = Config<BX>;
  constexpr int kGroups = C::kThreads / BX;
  const int x = threadIdx.x % BX;
  float sum = 0.f;
#pragma unroll 4
  for (int r = threadIdx.x / BX; r < C::kRows; r += kGroups) {
    sum = w ? fmaf(w[r], s[r * C::kLd + x], sum) : sum + s[r * C::kLd + x];
  }
  return sum;
}

// Adds up the column_partial of all threads and writes columns < count to dst.
// scratch: kThreads floats of shared memory nobody else is using now.
template <int BX>
__device__ __forceinline__ void column_finish(float part, float* scratch, float* dst, int count) {
  using C = Config<BX>;
  scratch[threadIdx.x] = part;
  __syncthreads();
  if (threadIdx.x < count) {
    float sum = 0.f;
#pragma unroll
    for (int g = 0; g < C::kThreads / BX; ++g) sum += scratch[g * BX + threadIdx.x];
    dst[threadIdx.x] = sum;
  }
}

// den[r] = qs[r] . z + eps for the rows r < rows of a tile (qs, z zero-padded to BX),
// and 1 for the padding rows past N, which then give 0 (not 0/0 when eps = 0).
template <int BX>
__device__ __forceinline__ void row_denominators(float* den, const float* qs, const float* z, float eps,
                                                 int rows) {
  using C = Config<BX>;
  for (int r = threadIdx.x; r < C::kRows; r += C::kThreads) {
    float dot = 0.f;
#pragma unroll 8
    for (int k = 0; k < BX; k += 4) {
      const float4 q4 = *reinterpret_cast<const float4*>(qs + r * C::kLd + k);
      const float4 z4 = *reinterpret_cast<const float4*>(z + k);
      dot = fmaf(q4.x, z4.x, dot);
      dot = fmaf(q4.y, z4.y, dot);
      dot = fmaf(q4.z, z4.z, dot);
      dot = fmaf(q4.w, z4.w, dot);
    }
    den[r] = r < rows ? dot + eps : 1.f;
  }
}

// Loads a (D x E) state matrix and its D-vector (src = [S row-major | z]) into the
// zero-padded shared S[BX][kLd], z[BX].
template <int BX>
__device__ __forceinline__ void load_state(float* S, float* z, const float* src, int D, int E) {
  using C = Config<BX>;
  for (int i = threadIdx.x; i < BX * BX; i += C::kThreads) {
    const int d = i / BX, e = i % BX;
    S[d * C::kLd + e] = (d < D && e < E) ? src[d * E + e] : 0.f;
  }
  for (int d = threadIdx.x; d < BX; d += C::kThreads) z[d] = d < D ? src[D * E + d] : 0.f;
}

// Writes a state matrix held as Gemm register tiles to dst[d * E + e].
template <typename Gemm>
__device__ __forceinline__ void store_state(const typename Gemm::Acc& acc, float* dst, int D, int E) {
#pragma unroll
  for (int i = 0; i < Gemm::TM; ++i) {
    const int d = Gemm::row(i);
#pragma unroll
    for (int j = 0; j < Gemm::TX; ++j) {
      const int e = Gemm::col(j);
      if (d < D && e < E) dst[d * E + e] = acc[i][j];
    }
  }
}

// The state slot of (bh, chunk): D*E + D floats, S row-major then z.
__device__ __forceinline__ float* state_slot(float* base, int D, int E) {
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * gridDim.y + blockIdx.y;
  return base + slot * (static_cast<int64_t>(D) * E + D);
}

__device__ __forceinline__ void chunk_tiles(const Sizes& sz, int& first, int& last) {
  first = blockIdx.y * sz.tiles_per_block;
  last = first + sz.tiles_per_block < sz.num_tiles ? first + sz.tiles_per_block : sz.num_tiles;
}

// ---- kernels --------------------------------------------------------------------------------

// S = sum_m kr_m^T v_m and z = sum_m kr_m over one chunk of N -> state (one slot per block).
template <typename T, int BX>
__global__ void __launch_bounds__(Config<BX>::kThreads, Config<BX>::kMinBlocks)
    kv_state_kernel(float* state, const Operand<const T> k, const Operand<const T> v, const Sizes sz) {
  using C = Config<BX>;
  using IO = TileIO<T, BX>;
  using Gemm = TileGemm<BX, BX, BX, C::kRows, true, true>;  // S(d, e) = sum_n kr(n, d) v(n, e)
  extern __shared__ float4 smem4[];
  float* ks = reinterpret_cast<float*>(smem4);  // kr tile [n][d]
  float* vs = ks + C::kTileFloats;              // v tile [n][e]

  const int b = blockIdx.x / sz.H, h = blockIdx.x % sz.H;
  const T* kp = k.head(b, h);
  const T* vp = v.head(b, h);
  int first, last;
  chunk_tiles(sz, first, last);

  typename Gemm::Acc acc;
  Gemm::zero(acc);
  float z_part = 0.f;
  typename IO::Regs k_regs, v_regs;
  IO::load(k_regs, k, kp, first * C::kRows, sz.N, sz.D);
  IO::load(v_regs, v, vp, first * C::kRows, sz.N, sz.E);
  for (int tile = first; tile < last; ++tile) {
    IO::template stage<true>(ks, k_regs, k);
    IO::template stage<false>(vs, v_regs, v);
    __syncthreads();
    if (tile + 1 < last) {  // in flight while this tile is reduced
      IO::load(k_regs, k, kp, (tile + 1) * C::kRows, sz.N, sz.D);
      IO::load(v_regs, v, vp, (tile + 1) * C::kRows, sz.N, sz.E);
    }
    z_part += column_partial<BX>(ks, nullptr);
    Gemm::run(acc, ks, vs);
    __syncthreads();
  }

  float* dst = state_slot(state, sz.D, sz.E);
  store_state<Gemm>(acc, dst, sz.D, sz.E);
  column_finish<BX>(z_part, ks, dst + sz.D * sz.E, sz.D);
}

// dst[bh] = sum over p of parts[bh][p] (count floats each), in order.
__global__ void sum_partials_kernel(float* dst, const float* parts, int num_parts, int count) {
  const int64_t bh = blockIdx.x;
  const float* src = parts + bh * num_parts * count;
  for (int i = threadIdx.x; i < count; i += blockDim.x) {
    float sum = 0.f;
    for (int p = 0; p < num_parts; ++p) sum += src[static_cast<int64_t>(p) * count + i];
    dst[bh * count + i] = sum;
  }
}

// out_n = qr_n S / (qr_n . z + eps) for one chunk of N.
template <typename T, int BX>
__global__ void __launch_bounds__(Config<BX>::kThreads, Config<BX>::kMinBlocks)
    fwd_out_kernel(const Operand<T> out, const Operand<const T> q, const float* state, float eps,
                   const Sizes sz) {
  using C = Config<BX>;
  using IO = TileIO<T, BX>;
  using Gemm = TileGemm<BX, C::kRows, BX, BX, false, true>;  // u(n, e) = sum_d qr(n, d) S(d, e)
  extern __shared__ float4 smem4[];
  float* S = reinterpret_cast<float*>(smem4);  // [d][e]
  float* z = S + C::kStateFloats;              // [d]
  float* qs = z + BX;                          // qr tile [n][d], then out tile [n][e]
  float* den = qs + C::kTileFloats;            // [n]

  const int b = blockIdx.x / sz.H, h = blockIdx.x % sz.H;
  const T* qp = q.head(b, h);
  T* op = out.head(b, h);
  int first, last;
  chunk_tiles(sz, first, last);

  load_state<BX>(S, z, state + static_cast<int64_t>(blockIdx.x) * (sz.D * sz.E + sz.D), sz.D, sz.E);
  typename IO::Regs q_regs;
  IO::load(q_regs, q, qp, first * C::kRows, sz.N, sz.D);
  for (int tile = first; tile < last; ++tile) {
    IO::template stage<true>(qs, q_regs, q);
    __syncthreads();
    if (tile + 1 < last) IO::load(q_regs, q, qp, (tile + 1) * C::kRows, sz.N, sz.D);
    row_denominators<BX>(den, qs, z, eps, sz.N - tile * C::kRows);
    typename Gemm::Acc u;
    Gemm::zero(u);
    Gemm::run(u, qs, S);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < Gemm::TM; ++i) {
      const int n = Gemm::row(i);
#pragma unroll
      for (int j = 0; j < Gemm::TX; ++j) qs[n * C::kLd + Gemm::col(j)] = u[i][j] / den[n];
    }
    __syncthreads();
    IO::store(out, op, tile * C::kRows, sz.N, sz.E, qs);
    __syncthreads();
  }
}

// dq for one chunk of N, and that chunk's dS, dz partials -> dstate (one slot per block).
template <typename T, int BX>
__global__ void __launch_bounds__(Config<BX>::kThreads, Config<BX>::kMinBlocksDq)
    bwd_dq_kernel(const Operand<T> dq, float* dstate, const Operand<const T> g, const Operand<const T> q,
                  const float* state, float eps, const Sizes sz) {
  using C = Config<BX>;
  using IO = TileIO<T, BX>;
  using U = TileGemm<BX, C::kRows, BX, BX, false, true>;    // u(n, e) = sum_d qr(n, d) S(d, e)
  using DQ = TileGemm<BX, C::kRows, BX, BX, false, false>;  // (n, d) = sum_e a(n, e) S(d, e)
  using DS = TileGemm<BX, BX, BX, C::kRows, true, true>;    // dS(d, e) += sum_n qr(n, d) a(n, e)
  extern __shared__ float4 smem4[];
  float* S = reinterpret_cast<float*>(smem4);  // [d][e]
  float* z = S + C::kStateFloats;              // [d]
  float* qs = z + BX;                          // qr tile [n][d], then dq tile [n][d]
  float* gs = qs + C::kTileFloats;             // g tile [n][e], then a = g / den
  float* den = gs + C::kTileFloats;            // [n]
  float* cs = den + C::kRows;                  // c [n]

  const int b = blockIdx.x / sz.H, h = blockIdx.x % sz.H;
  const T* qp = q.head(b, h);
  const T* gp = g.head(b, h);
  T* dqp = dq.head(b, h);
  int first, last;
  chunk_tiles(sz, first, last);

  load_state<BX>(S, z, state + static_cast<int64_t>(blockIdx.x) * (sz.D * sz.E + sz.D), sz.D, sz.E);
  typename DS::Acc ds;
  DS::zero(ds);
  float dz_part = 0.f;
  typename IO::Regs q_regs, g_regs;
  IO::load(q_regs, q, qp, first * C::kRows, sz.N, sz.D);
  IO::load(g_regs, g, gp, first * C::kRows, sz.N, sz.E);
  for (int tile = first; tile < last; ++tile) {
    IO::template stage<true>(qs, q_regs, q);
    IO::template stage<false>(gs, g_regs, g);
    __syncthreads();
    if (tile + 1 < last) {
      IO::load(q_regs, q, qp, (tile + 1) * C::kRows, sz.N, sz.D);
      IO::load(g_regs, g, gp, (tile + 1) * C::kRows, sz.N, sz.E);
    }
    row_denominators<BX>(den, qs, z, eps, sz.N - tile * C::kRows);
    typename U::Acc u;
    U::zero(u);
    U::run(u, qs, S);
    __syncthreads();  // den

    // out = u / den, c = -(g . out) / den, and g -> a = g / den in place. Each thread
    // touches only the (n, e) it owns in u, so no barrier is needed in between.
#pragma unroll
    for (int i = 0; i < U::TM; ++i) {
      const int n = U::row(i);
      const float dn = den[n];
      float g_out = 0.f;
#pragma unroll
      for (int j = 0; j < U::TX; ++j) {
        float* gij = gs + n * C::kLd + U::col(j);
        const float gv = *gij;
        g_out = fmaf(gv, u[i][j] / dn, g_out);
        *gij = gv / dn;
      }
      g_out = U::row_sum(g_out);
      if (U::col_thread() == 0) cs[n] = -g_out / dn;
    }
    __syncthreads();  // a, c

    dz_part += column_partial<BX>(qs, cs);
    DS::run(ds, qs, gs);
    typename DQ::Acc dqa;
    DQ::zero(dqa);
    DQ::run(dqa, gs, S);
    __syncthreads();  // done reading qs: it becomes the dq tile
#pragma unroll
    for (int i = 0; i < DQ::TM; ++i) {
      const int n = DQ::row(i);
      const float cn = cs[n];
#pragma unroll
      for (int j = 0; j < DQ::TX; ++j) {
        const int d = DQ::col(j);
        float* qij = qs + n * C::kLd + d;
        *qij = *qij > 0.f ? fmaf(z[d], cn, dqa[i][j]) : 0.f;
      }
    }
    __syncthreads();
    IO::store(dq, dqp, tile * C::kRows, sz.N, sz.D, qs);
    __syncthreads();
  }

  float* dst = state_slot(dstate, sz.D, sz.E);
  store_state<DS>(ds, dst, sz.D, sz.E);
  column_finish<BX>(dz_part, qs, dst + sz.D * sz.E, sz.D);
}

// dk_m = k_m > 0 ? dS v_m + dz : 0 and dv_m = kr_m dS for one chunk of N.
template <typename T, int BX>
__global__ void __launch_bounds__(Config<BX>::kThreads, Config<BX>::kMinBlocks)
    bwd_dkv_kernel(const Operand<T> dk, const Operand<T> dv, const Operand<const T> k,
                   const Operand<const T> v, const float* dstate, const Sizes sz) {
  using C = Config<BX>;
  using IO = TileIO<T, BX>;
  using DV = TileGemm<BX, C::kRows, BX, BX, false, true>;   // dv(n, e) = sum_d kr(n, d) dS(d, e)
  using DK = TileGemm<BX, C::kRows, BX, BX, false, false>;  // (n, d) = sum_e v(n, e) dS(d, e)
  extern __shared__ float4 smem4[];
  float* dS = reinterpret_cast<float*>(smem4);  // [d][e]
  float* dz = dS + C::kStateFloats;             // [d]
  float* ks = dz + BX;                          // kr tile [n][d], then dk tile
  float* vs = ks + C::kTileFloats;              // v tile [n][e], then dv tile

  const int b = blockIdx.x / sz.H, h = blockIdx.x % sz.H;
  const T* kp = k.head(b, h);
  const T* vp = v.head(b, h);
  T* dkp = dk.head(b, h);
  T* dvp = dv.head(b, h);
  int first, last;
  chunk_tiles(sz, first, last);

  load_state<BX>(dS, dz, dstate + static_cast<int64_t>(blockIdx.x) * (sz.D * sz.E + sz.D), sz.D, sz.E);
  typename IO::Regs k_regs, v_regs;
  IO::load(k_regs, k, kp, first * C::kRows, sz.N, sz.D);
  IO::load(v_regs, v, vp, first * C::kRows, sz.N, sz.E);
  for (int tile = first; tile < last; ++tile) {
    IO::template stage<true>(ks, k_regs, k);
    IO::template stage<false>(vs, v_regs, v);
    __syncthreads();
    if (tile + 1 < last) {
      IO::load(k_regs, k, kp, (tile + 1) * C::kRows, sz.N, sz.D);
      IO::load(v_regs, v, vp, (tile + 1) * C::kRows, sz.N, sz.E);
    }
    typename DV::Acc dva;
    DV::zero(dva);
    DV::run(dva, ks, dS);
    typename DK::Acc dka;
    DK::zero(dka);
    DK::run(dka, vs, dS);
    __syncthreads();  // done reading ks, vs: they become the dk, dv tiles
#pragma unroll
    for (int i = 0; i < DK::TM; ++i) {
      const int n = DK::row(i);
#pragma unroll
      for (int j = 0; j < DK::TX; ++j) {
        const int d = DK::col(j);
        float* kij = ks + n * C::kLd + d;
        *kij = *kij > 0.f ? dka[i][j] + dz[d] : 0.f;
      }
    }
#pragma unroll
    for (int i = 0; i < DV::TM; ++i)
#pragma unroll
      for (int j = 0; j < DV::TX; ++j) vs[DV::row(i) * C::kLd + DV::col(j)] = dva[i][j];
    __syncthreads();
    IO::store(dk, dkp, tile * C::kRows, sz.N, sz.D, ks);
    IO::store(dv, dvp, tile * C::kRows, sz.N, sz.E, vs);
    __syncthreads();
  }
}

// ---- host side --------------------------------------------------------------------------------

// Shared memory (bytes) of each kernel for bucket BX.
template <int BX>
struct SharedBytes {
  using C = Config<BX>;
  static constexpr size_t kState = 2 * C::kTileFloats * sizeof(float);
  static constexpr size_t kFwdOut = (C::kStateFloats + BX + C::kTileFloats + C::kRows) * sizeof(float);
  static constexpr size_t kBwdDq = (C::kStateFloats + BX + 2 * C::kTileFloats + 2 * C::kRows) * sizeof(float);
  static constexpr size_t kBwdDkv = (C::kStateFloats + BX + 2 * C::kTileFloats) * sizeof(float);
  static_assert(kState >= C::kThreads * sizeof(float), "column_finish scratch");
};

template <typename T>
Operand<T> make_operand(const at::Tensor& t) {
  Operand<T> o;
  o.ptr = reinterpret_cast<T*>(t.data_ptr());
  o.stride_b = t.stride(0);
  o.stride_h = t.stride(1);
  o.stride_n = t.stride(2);
  o.stride_x = t.stride(3);
  // Walk N with consecutive threads when it is the denser dimension (the packed
  // layout), or when X is a single column.
  const int64_t n = t.size(2), x = t.size(3);
  o.n_fast = x == 1 || (n > 1 && t.stride(2) < t.stride(3));
  return o;
}

// Splits N into chunks of whole tiles, one block per (b, h, chunk): as few chunks as
// give about 8 blocks per SM (a chunk's partial state costs a little extra traffic).
Sizes plan(int64_t BH, int64_t H, int64_t N, int64_t D, int64_t E, int rows) {
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount);
  const int64_t target_blocks = 8 * static_cast<int64_t>(sms);
  Sizes sz;
  sz.H = static_cast<int>(H);
  sz.N = static_cast<int>(N);
  sz.D = static_cast<int>(D);
  sz.E = static_cast<int>(E);
  sz.num_tiles = static_cast<int>((N + rows - 1) / rows);
  int64_t chunks = (target_blocks + BH - 1) / BH;
  chunks = std::max<int64_t>(1, std::min<int64_t>(chunks, sz.num_tiles));
  sz.tiles_per_block = static_cast<int>((sz.num_tiles + chunks - 1) / chunks);
  return sz;
}

// grid: x = b * H + h, y = chunk of N.
dim3 blocks(int64_t BH, int chunks) { return dim3(static_cast<unsigned>(BH), static_cast<unsigned>(chunks)); }

int num_chunks(const Sizes& sz) { return (sz.num_tiles + sz.tiles_per_block - 1) / sz.tiles_per_block; }

template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, int threads, size_t smem, cudaStream_t stream, Args... args) {
  if (smem > 48 * 1024) {
    const size_t optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
    TORCH_CHECK(smem <= optin, "linattn." LA_OP " (cuda): head dims above 64 need ", smem,
                " bytes of shared memory per block, this GPU allows ", optin,
                "; use head dims <= 64 or another backend");
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  LINATTN_LAUNCH(kernel, grid, threads, smem, stream)(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// S, z of every (b, h) into state[bh] (D*E + D floats each). scratch holds the
// per-chunk partials when there are several chunks.
template <typename T, int BX>
void compute_state(float* state, float* scratch, const at::Tensor& k, const at::Tensor& v, const Sizes& sz,
                   int64_t BH, cudaStream_t stream) {
  using C = Config<BX>;
  const int chunks = num_chunks(sz);
  const int count = sz.D * sz.E + sz.D;
  launch(kv_state_kernel<T, BX>, blocks(BH, chunks), C::kThreads, SharedBytes<BX>::kState, stream,
         chunks > 1 ? scratch : state, make_operand<const T>(k), make_operand<const T>(v), sz);
  if (chunks > 1) {
    launch(sum_partials_kernel, blocks(BH, 1), 256, 0, stream, state, static_cast<const float*>(scratch),
           chunks, count);
  }
}

template <typename T, int BX>
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, float eps,
             const at::Tensor& out) {
  using C = Config<BX>;
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), E = v.size(3);
  const int64_t BH = B * H;
  const Sizes sz = plan(BH, H, N, D, E, C::kRows);
  const int chunks = num_chunks(sz);
  const int64_t count = D * E + D;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const at::Tensor ws =
      at::empty({BH * count * (chunks > 1 ? chunks + 1 : 1)}, q.options().dtype(at::kFloat));
  float* state = ws.data_ptr<float>();
  compute_state<T, BX>(state, state + BH * count, k, v, sz, BH, stream);
  launch(fwd_out_kernel<T, BX>, blocks(BH, chunks), C::kThreads, SharedBytes<BX>::kFwdOut, stream,
         make_operand<T>(out), make_operand<const T>(q), static_cast<const float*>(state), eps, sz);
}

template <typename T, int BX>
void backward(const at::Tensor& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, float eps,
              const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  using C = Config<BX>;
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), E = v.size(3);
  const int64_t BH = B * H;
  const Sizes sz = plan(BH, H, N, D, E, C::kRows);
  const int chunks = num_chunks(sz);
  const int64_t count = D * E + D;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // [state | dstate | partials of either (reused)]
  const at::Tensor ws =
      at::empty({BH * count * (chunks > 1 ? chunks + 2 : 2)}, q.options().dtype(at::kFloat));
  float* state = ws.data_ptr<float>();
  float* dstate = state + BH * count;
  float* partials = dstate + BH * count;
  compute_state<T, BX>(state, partials, k, v, sz, BH, stream);
  launch(bwd_dq_kernel<T, BX>, blocks(BH, chunks), C::kThreads, SharedBytes<BX>::kBwdDq, stream,
         make_operand<T>(dq), chunks > 1 ? partials : dstate, make_operand<const T>(g),
         make_operand<const T>(q), static_cast<const float*>(state), eps, sz);
  if (chunks > 1) {
    launch(sum_partials_kernel, blocks(BH, 1), 256, 0, stream, dstate, static_cast<const float*>(partials),
           chunks, static_cast<int>(count));
  }
  launch(bwd_dkv_kernel<T, BX>, blocks(BH, chunks), C::kThreads, SharedBytes<BX>::kBwdDkv, stream,
         make_operand<T>(dk), make_operand<T>(dv), make_operand<const T>(k), make_operand<const T>(v),
         static_cast<const float*>(dstate), sz);
}

// Calls f with std::integral_constant<int, BX> for the bucket that holds dim (<= 128).
template <typename F>
void dispatch_bucket(int64_t dim, F&& f) {
  if (dim <= 32) {
    f(std::integral_constant<int, 32>{});
  } else if (dim <= 64) {
    f(std::integral_constant<int, 64>{});
  } else {
    f(std::integral_constant<int, 128>{});
  }
}

// ---- argument checks ----------------------------------------------------------------------------

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  CHECK_DIM(LA_OP, q, 4, "(B, H, N, D)");
  CHECK_DIM(LA_OP, k, 4, "(B, H, N, D)");
  CHECK_DIM(LA_OP, v, 4, "(B, H, N, E)");
  CHECK_CUDA(LA_OP, q);
  CHECK_SAME_DEVICE(LA_OP, k, q);
  CHECK_SAME_DEVICE(LA_OP, v, q);
  CHECK_FLOATING_DTYPE(LA_OP, q);
  CHECK_SAME_DTYPE(LA_OP, k, q);
  CHECK_SAME_DTYPE(LA_OP, v, q);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), E = v.size(3);
  CHECK_SHAPE(LA_OP, k, B, H, N, D);
  CHECK_SHAPE(LA_OP, v, B, H, N, E);
  LINATTN_CHECK(LA_OP, 1 <= D && D <= 128, "head dim D of q and k must be in [1, 128], got ", D);
  LINATTN_CHECK(LA_OP, 1 <= E && E <= 128, "head dim E of v must be in [1, 128], got ", E);
  LINATTN_CHECK(LA_OP, N >= 1, "sequence length N must be at least 1, got ", N);
  LINATTN_CHECK(LA_OP, N <= std::numeric_limits<int>::max() - 4096, "sequence length N = ", N,
                " is too large");
  LINATTN_CHECK(LA_OP, B * H <= std::numeric_limits<int>::max(), "B * H = ", B * H, " is too large");
}

// An output of the op: like q in (B, H, N), device and dtype, and no element twice.
#define CHECK_OUTPUT(x, layout, ...)  \
  CHECK_DIM(LA_OP, x, 4, layout);     \
  CHECK_SAME_DEVICE(LA_OP, x, q);     \
  CHECK_SAME_DTYPE(LA_OP, x, q);      \
  CHECK_SHAPE(LA_OP, x, __VA_ARGS__); \
  CHECK_NO_INTERNAL_OVERLAP(LA_OP, x)

// Outputs are written while inputs are still being read (by other blocks, too).
void check_no_overlap(const at::Tensor& output, const char* output_name, const at::Tensor& input,
                      const char* input_name) {
  const at::MemOverlapStatus status = at::get_overlap_status(output, input);
  LINATTN_CHECK(LA_OP, status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial,
                output_name, " must not share memory with ", input_name);
}

// ---- ops ----------------------------------------------------------------------------------------

void linear_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double eps,
                               const at::Tensor& out) {
  check_inputs(q, k, v);
  CHECK_OUTPUT(out, "(B, H, N, E)", q.size(0), q.size(1), q.size(2), v.size(3));
  check_no_overlap(out, "out", q, "q");
  check_no_overlap(out, "out", k, "k");
  check_no_overlap(out, "out", v, "v");
  if (q.size(0) * q.size(1) == 0) return;
  const c10::cuda::CUDAGuard guard(q.device());
  const float eps32 = static_cast<float>(eps);
  LINATTN_DISPATCH_FLOATING(q.scalar_type(), LA_OP, [&] {
    dispatch_bucket(std::max(q.size(3), v.size(3)),
                    [&](auto bx) { forward<scalar_t, decltype(bx)::value>(q, k, v, eps32, out); });
  });
}

void linear_attention_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, double eps, const at::Tensor& dq, const at::Tensor& dk,
                               const at::Tensor& dv) {
  check_inputs(q, k, v);
  CHECK_DIM(LA_OP, grad_out, 4, "(B, H, N, E)");
  CHECK_SAME_DEVICE(LA_OP, grad_out, q);
  CHECK_SAME_DTYPE(LA_OP, grad_out, q);
  CHECK_SHAPE(LA_OP, grad_out, q.size(0), q.size(1), q.size(2), v.size(3));
  CHECK_OUTPUT(dq, "(B, H, N, D)", q.size(0), q.size(1), q.size(2), q.size(3));
  CHECK_OUTPUT(dk, "(B, H, N, D)", q.size(0), q.size(1), q.size(2), q.size(3));
  CHECK_OUTPUT(dv, "(B, H, N, E)", q.size(0), q.size(1), q.size(2), v.size(3));
  const std::array<std::pair<const at::Tensor*, const char*>, 4> inputs{
      {{&grad_out, "grad_out"}, {&q, "q"}, {&k, "k"}, {&v, "v"}}};
  for (const auto& [input, input_name] : inputs) {
    check_no_overlap(dq, "dq", *input, input_name);
    check_no_overlap(dk, "dk", *input, input_name);
    check_no_overlap(dv, "dv", *input, input_name);
  }
  check_no_overlap(dk, "dk", dq, "dq");
  check_no_overlap(dv, "dv", dq, "dq");
  check_no_overlap(dv, "dv", dk, "dk");
  if (q.size(0) * q.size(1) == 0) return;
  const c10::cuda::CUDAGuard guard(q.device());
  const float eps32 = static_cast<float>(eps);
  LINATTN_DISPATCH_FLOATING(q.scalar_type(), LA_OP, [&] {
    dispatch_bucket(std::max(q.size(3), v.size(3)), [&](auto bx) {
      backward<scalar_t, decltype(bx)::value>(grad_out, q, k, v, eps32, dq, dk, dv);
    });
  });
}

}  // namespace
}  // namespace linattn

TORCH_LIBRARY_FRAGMENT(linattn, m) {
  m.def("linear_attention_fwd_cuda(Tensor q, Tensor k, Tensor v, float eps, Tensor(a!) out) -> ()");
  m.def(
      "linear_attention_bwd_cuda(Tensor grad_out, Tensor q, Tensor k, Tensor v, float eps, "
      "Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv) -> ()");
}

TORCH_LIBRARY_IMPL(linattn, CUDA, m) {
  m.impl("linear_attention_fwd_cuda", &linattn::linear_attention_fwd_cuda);
  m.impl("linear_attention_bwd_cuda", &linattn::linear_attention_bwd_cuda);
}
