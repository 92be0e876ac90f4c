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

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

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

// ---- host side --------------------------------------------------------------------------------

template <int K>
struct SharedBytes {
  static size_t state(int D) { return (Halo<K>::kFloats + 2 * tile_floats(D)) * sizeof(float); }
  static size_t out(int D) {
    return (Halo<K>::kFloats + tile_floats(D) + D * (D + 1) + D + kTileP) * sizeof(float);
  }
};

template <typename T>
void forward(const at::Tensor& qkv, at::TensorList dw_weights, at::TensorList pw_weights, int64_t heads,
             int64_t D, float eps, at::TensorList dw_biases, at::TensorList pw_biases, const at::Tensor& out) {
  const int64_t B = qkv.size(0);
  const Geometry g = plan(B * heads, qkv.size(2), qkv.size(3), D);
  const int splits = num_splits(g);
  // the first scale's grids also serve qkv's own heads (blockIdx.z 0), with partials of their own
  const at::Tensor parts = at::empty({2 * B * heads * splits * (D * D + D)}, qkv.options().dtype(at::kFloat));
  const Map<const T> x = make_map<const T>(qkv);
  const Map<T> o = make_map<T>(out);
  for (size_t s = 0; s < dw_weights.size(); ++s) {
    const dim3 grid(static_cast<unsigned>(B * heads), static_cast<unsigned>(splits), s == 0 ? 2u : 1u);
    const int c_out = static_cast<int>((1 + s) * heads * D);
    const int64_t k = dw_weights[s].size(3);
    const T* wd = reinterpret_cast<const T*>(dw_weights[s].data_ptr());
    const T* wp = reinterpret_cast<const T*>(pw_weights[s].data_ptr());
    const T* bd = data_or_null<T>(dw_biases, s);
    const T* bp = data_or_null<T>(pw_biases, s);
    dispatch_ksize(k, [&](auto kc) {
      constexpr int K = decltype(kc)::value;
      launch(CTX_OP, state_kernel<T, K>, grid, SharedBytes<K>::state(g.D), parts.data_ptr<float>(), x, wd, bd, wp,
             bp, static_cast<int>(k), static_cast<int>(heads), g);
      launch(CTX_OP, out_kernel<T, K>, grid, SharedBytes<K>::out(g.D), o, c_out,
             static_cast<const float*>(parts.data_ptr<float>()), splits, eps, x, wd, bd, wp, bp,
             static_cast<int>(k), static_cast<int>(heads), g);
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
