// Multi-scale depthwise aggregation of LiteMLA (DESIGN 3.3): CUDA kernels, launchers and
// op registration.
//
// For each scale s, group size D = C / (3*heads), group g = channels [g*D, (g+1)*D):
//   forward   t_s = dwconv_k(x) + bd_s,  y_s = Wp_s t_s + bp_s (per group),  out = [x, y_1, ...]
//   backward  dy_s = grad_out[:, (1+s)C:(2+s)C],  dt_s = Wp_s^T dy_s (per group)
//             dWp_s[c][j] = sum dy_s[c] t_s[g*D+j],  dbp_s = sum dy_s,  dbd_s = sum dt_s
//             dWd_s[c][i][j] = sum_n dt_s[c, n] x[c, n + (i - k/2, j - k/2)]
//             dx = grad_out[:, :C] + sum_s dwconv^T(dt_s)   (the conv with flipped taps)
//
// Kernels (grid: blockIdx.x = b * 3*heads + g, blockIdx.y = a chunk of spatial tiles; the
// tile machinery is in aggregate_tile.cuh), one launch per scale:
//   fwd_kernel      y_s of a chunk (and x itself into out[:, :C] for the first scale)
//   bwd_dt_kernel   dt_s of a chunk -> fp32 workspace; dWp_s, dbp_s partials of the chunk
//   bwd_dx_kernel   dx += dwconv^T(dt_s) of a chunk; dWd_s, dbd_s partials of the chunk
//   sum_parts       partials of all (batch, chunk) -> the weight and bias gradients
// dt goes through memory because dwconv^T of a tile needs dt on the tile's halo, which
// other blocks produce. Partials are summed in a fixed order: results are deterministic.
//
// Layout contract: qkv, out, grad_out (B, *, H, W) with any strides (NCHW and
// channels_last are both coalesced); weights and biases contiguous, qkv's dtype.
// Weight and bias gradients are fp32, dqkv (B, C, H, W) contiguous in qkv's dtype.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "common.h"
#include "multiscale_aggregate/aggregate_tile.cuh"

#define MA_OP "multiscale_aggregate"  // the op named in error messages

namespace linattn {
namespace {

using namespace aggregate;

// ---- kernels --------------------------------------------------------------------------------

// y (this scale's slice of out) for one (batch, group) and chunk of tiles; x0 (out's first
// slice) gets x when x0.ptr is set.
template <typename T, int K>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    fwd_kernel(const Map<T> y, const Map<T> x0, const Map<const T> x, const T* wd, const T* bd, const T* wp,
               const T* bp, int k, int groups, const Geometry g) {
  extern __shared__ float4 smem4[];
  float* halo = reinterpret_cast<float*>(smem4);
  float* tile = halo + Halo<K>::kFloats;

  const int b = blockIdx.x / groups, c0 = (blockIdx.x % groups) * g.D;
  int first, last;
  chunk_tiles(g, first, last);
  for (int t = first; t < last; ++t) {
    int h0, w0;
    tile_origin(g, t, h0, w0);
    aggregate_tile<T, K, false>(tile, halo, x, b, c0, h0, w0, g, wd, bd, wp, bp, k, x0);
    store_tile(y, b, c0, h0, w0, g, tile);
  }
}

// dt = Wp^T dy of one (batch, group) and chunk of tiles into dt_out (fp32 (B, C, H, W)
// contiguous), and the chunk's partial [dWp (D x D, [c][j]) | dbp (D)] into parts (where
// it also waits between tiles: see gram_load).
template <typename T, int K>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    bwd_dt_kernel(float* dt_out, float* parts, const Map<const T> dy, const Map<const T> x, const T* wd,
                  const T* bd, const T* wp, int k, int groups, const Geometry g) {
  extern __shared__ float4 smem4[];
  float* halo = reinterpret_cast<float*>(smem4);
  float* dys = halo + Halo<K>::kFloats;  // dy tile [p][c]
  float* ts = dys + tile_floats(g.D);    // t tile [p][j]

  const int D = g.D;
  const int b = blockIdx.x / groups, c0 = (blockIdx.x % groups) * D;
  const T* wp_g = wp + static_cast<int64_t>(c0) * D;
  float* part = parts + (static_cast<int64_t>(blockIdx.x) * gridDim.y + blockIdx.y) * (D * D + D);
  int first, last;
  chunk_tiles(g, first, last);  // never empty (num_splits): every part gets written
  for (int t = first; t < last; ++t) {
    int h0, w0;
    tile_origin(g, t, h0, w0);
    load_tile(dys, dy, b, c0, h0, w0, g);  // zero outside the image: those positions add nothing
    // its barriers cover dys too; it ends with one: halo is free for pointwise's weights
    dwconv_tile<T, K>(ts, halo, x, b, c0, h0, w0, g, wd, bd, k, Map<T>{});
    {
      GramAcc dwp;
      float dbp[kGram];
      if (t == first) {
        gram_zero(dwp, dbp);
      } else {
        gram_load(dwp, dbp, part, D);
      }
      gram(dwp, dbp, dys, ts, D);
      gram_store(dwp, dbp, part, D);
    }
    PwAcc acc;
    pointwise<true>(acc, dys, D, wp_g, halo, Halo<K>::kFloats);
    const Geometry gt = opaque(g);  // (see opaque)
    const int64_t HW = static_cast<int64_t>(gt.H) * gt.W;
    const int cols = pw_cols(gt.D);
#pragma unroll
    for (int pp = 0; pp < kPwRows; ++pp) {
      const int p = pw_row(pp);
      const int h = h0 + p / kTileW, w = w0 + p % kTileW;
      if (h >= gt.H || w >= gt.W) continue;
      // dt(b, c0 + j, h, w), j = pw_col(i): one pointer stepped by the channel stride
      float* dst = dt_out + (static_cast<int64_t>(b) * groups * gt.D + c0 + pw_col(0)) * HW +
                   static_cast<int64_t>(h) * gt.W + w;
      const int64_t step = (pw_col(1) - pw_col(0)) * HW;
#pragma unroll
      for (int i = 0; i < kPwCols; ++i, dst += step) {
        if (i < cols) *dst = acc[pp][i];
      }
    }
    __syncthreads();  // the next tile overwrites dys, ts and halo
  }
}

// dx = base + dwconv^T(dt) for one (batch, group) and chunk of tiles, and the chunk's
// partial [dWd (D x k*k) | dbd (D)] into parts. base is g0 (grad_out[:, :C]) for the
// first scale, else dx_acc; the result goes to dx_out for the last scale, else dx_acc.
template <typename T, int K>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    bwd_dx_kernel(const Map<T> dx_out, float* dx_acc, float* parts, const Map<const T> g0,
                  const Map<const float> dt, const Map<const T> x, const T* wd, int k, bool first_scale,
                  bool last_scale, int groups, const Geometry g) {
  using Hl = Halo<K>;
  constexpr int KK = K * K;
  extern __shared__ float4 smem4[];
  float* dth = reinterpret_cast<float*>(smem4);  // dt halo [c][y][x]
  float* xh = dth + Hl::kFloats;                 // x halo [c][y][x]
  float* dwd = xh + Hl::kFloats;                 // dWd partial [c][K*K]
  float* dbd = dwd + g.D * KK;                   // dbd partial [c]

  const int D = g.D;
  const int b = blockIdx.x / groups, c0 = (blockIdx.x % groups) * D;
  for (int i = threadIdx.x; i < D * (KK + 1); i += kThreads) dwd[i] = 0.f;  // dbd follows dwd
  const ConvThread ct;
  const int64_t HW = static_cast<int64_t>(g.H) * g.W;
  int first, last;
  chunk_tiles(g, first, last);
  for (int t = first; t < last; ++t) {
    int h0, w0;
    tile_origin(g, t, h0, w0);
    for (int cc0 = 0; cc0 < D; cc0 += kChunkC) {
      const int cc = min(kChunkC, D - cc0);
      __syncthreads();  // the previous chunk is done with the halos (and dwd is zeroed)
      load_halo<float, K>(dth, dt, b, c0 + cc0, cc, h0, w0, g);
      load_halo<T, K>(xh, x, b, c0 + cc0, cc, h0, w0, g);
      __syncthreads();
      const bool valid = ct.ch < cc;
      const int c = c0 + cc0 + ct.ch;
      const float* dth_c = dth + ct.ch * Hl::kH * Hl::kW;
      const float* xh_c = xh + ct.ch * Hl::kH * Hl::kW;

      // dwconv^T(dt) at the thread's positions: the conv of dt with the flipped taps
      float acc[kRun];
#pragma unroll
      for (int j = 0; j < kRun; ++j) acc[j] = 0.f;
      conv_run<T, K>(acc, dth_c, wd, valid ? c : 0, k, valid, true, ct);
      const int h = h0 + ct.row;
      if (valid && h < g.H) {
        const int64_t row_acc = (static_cast<int64_t>(b) * groups * D + c) * HW + static_cast<int64_t>(h) * g.W;
#pragma unroll
        for (int j = 0; j < kRun; ++j) {
          const int wc = w0 + ct.x0 + j;
          if (wc < g.W) {
            const float base =
                first_scale ? static_cast<float>(g0.ptr[g0.offset(b, c, h, wc)]) : dx_acc[row_acc + wc];
            if (last_scale) {
              dx_out.ptr[dx_out.offset(b, c, h, wc)] = static_cast<T>(base + acc[j]);
            } else {
              dx_acc[row_acc + wc] = base + acc[j];
            }
          }
        }
      }

      // dWd[c][i][j] += sum_n dt[c, n] x[c, n + (i, j) - K/2] over the thread's positions
      // (dt is zero outside the image), then summed over the 16 lanes of the channel
      float dtc[kRun];
      float db = 0.f;
#pragma unroll
      for (int j = 0; j < kRun; ++j) {
        dtc[j] = dth_c[(ct.row + Hl::kPad) * Hl::kW + ct.x0 + Hl::kPad + j];
        db += dtc[j];
      }
      float tw[K][K];
#pragma unroll
      for (int i = 0; i < K; ++i) {
        float win[kRun + K - 1];
        const float* src = xh_c + (ct.row + i) * Hl::kW + ct.x0;
#pragma unroll
        for (int j = 0; j < kRun + K - 1; ++j) win[j] = src[j];
#pragma unroll
        for (int jj = 0; jj < K; ++jj) {
          float s = 0.f;
#pragma unroll
          for (int j = 0; j < kRun; ++j) s = fmaf(dtc[j], win[j + jj], s);
          tw[i][jj] = s;
        }
      }
      constexpr int kLanes = kThreads / kChunkC;  // consecutive lanes that share a channel
#pragma unroll
      for (int off = kLanes / 2; off >= 1; off /= 2) {
#pragma unroll
        for (int i = 0; i < K; ++i)
#pragma unroll
          for (int jj = 0; jj < K; ++jj) tw[i][jj] += __shfl_xor_sync(0xffffffffu, tw[i][jj], off);
        db += __shfl_xor_sync(0xffffffffu, db, off);
      }
      if (valid && threadIdx.x % kLanes == 0) {  // one thread per channel: no race, same thread every tile
        float* dst = dwd + (cc0 + ct.ch) * KK;
#pragma unroll
        for (int i = 0; i < K; ++i)
#pragma unroll
          for (int jj = 0; jj < K; ++jj) dst[i * K + jj] += tw[i][jj];
        dbd[cc0 + ct.ch] += db;
      }
    }
  }
  __syncthreads();
  // the k x k taps centred in the K x K ones
  const int off = (K - k) / 2;
  float* dst = parts + (static_cast<int64_t>(blockIdx.x) * gridDim.y + blockIdx.y) * (D * k * k + D);
  for (int i = threadIdx.x; i < D * k * k; i += kThreads) {
    const int c = i / (k * k), tap = i % (k * k);
    dst[i] = dwd[c * KK + (tap / k + off) * K + tap % k + off];
  }
  for (int c = threadIdx.x; c < D; c += kThreads) dst[D * k * k + c] = dbd[c];
}

// Per group g (blockIdx.x): sums the partials of every batch element and chunk, each
// [a (count_a) | b (count_b)], into dst_a[g * count_a + i] and dst_b[g * count_b + i].
__global__ void sum_parts_kernel(float* dst_a, float* dst_b, const float* parts, int count_a, int count_b,
                                 int batch, int groups, int splits) {
  const int grp = blockIdx.x;
  const int count = count_a + count_b;
  for (int i = threadIdx.x; i < count; i += blockDim.x) {
    float sum = 0.f;
    for (int b = 0; b < batch; ++b) {
      const float* src = parts + (static_cast<int64_t>(b) * groups + grp) * splits * count + i;
      for (int s = 0; s < splits; ++s) sum += src[static_cast<int64_t>(s) * count];
    }
    if (i < count_a) {
      dst_a[static_cast<int64_t>(grp) * count_a + i] = sum;
    } else {
      dst_b[static_cast<int64_t>(grp) * count_b + i - count_a] = sum;
    }
  }
}

// ---- host side --------------------------------------------------------------------------------

template <int K>
struct SharedBytes {
  static size_t fwd(int D) { return (Halo<K>::kFloats + tile_floats(D)) * sizeof(float); }
  static size_t bwd_dt(int D) { return (Halo<K>::kFloats + 2 * tile_floats(D)) * sizeof(float); }
  static size_t bwd_dx(int D) { return (2 * Halo<K>::kFloats + D * (K * K + 1)) * sizeof(float); }
};

void launch_sum_parts(float* dst_a, float* dst_b, const float* parts, int count_a, int count_b, int batch,
                      int groups, int splits) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LINATTN_LAUNCH(sum_parts_kernel, groups, 256, 0, stream)
  (dst_a, dst_b, parts, count_a, count_b, batch, groups, splits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void forward(const at::Tensor& qkv, at::TensorList dw_weights, at::TensorList pw_weights, int64_t heads,
             at::TensorList dw_biases, at::TensorList pw_biases, const at::Tensor& out, int64_t D) {
  const int64_t B = qkv.size(0), C = qkv.size(1), groups = 3 * heads;
  const Geometry g = plan(B * groups, qkv.size(2), qkv.size(3), D);
  const dim3 grid(static_cast<unsigned>(B * groups), static_cast<unsigned>(num_splits(g)));
  const Map<const T> x = make_map<const T>(qkv);
  for (size_t s = 0; s < dw_weights.size(); ++s) {
    const Map<T> y = make_map<T>(out.narrow(1, (1 + static_cast<int64_t>(s)) * C, C));
    Map<T> x0 = make_map<T>(out.narrow(1, 0, C));
    if (s > 0) x0.ptr = nullptr;
    const int64_t k = dw_weights[s].size(3);
    dispatch_ksize(k, [&](auto kc) {
      constexpr int K = decltype(kc)::value;
      launch(MA_OP, fwd_kernel<T, K>, grid, SharedBytes<K>::fwd(g.D), y, x0, x,
             reinterpret_cast<const T*>(dw_weights[s].data_ptr()), data_or_null<T>(dw_biases, s),
             reinterpret_cast<const T*>(pw_weights[s].data_ptr()), data_or_null<T>(pw_biases, s),
             static_cast<int>(k), static_cast<int>(groups), g);
    });
  }
}

using Grads = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                         std::vector<at::Tensor>>;

template <typename T>
void backward(const at::Tensor& grad_out, const at::Tensor& qkv, at::TensorList dw_weights,
              at::TensorList pw_weights, int64_t heads, at::TensorList dw_biases, int64_t D, Grads& grads) {
  const int64_t B = qkv.size(0), C = qkv.size(1), H = qkv.size(2), W = qkv.size(3), groups = 3 * heads;
  const size_t S = dw_weights.size();
  const Geometry g = plan(B * groups, H, W, D);
  const int splits = num_splits(g);
  const dim3 grid(static_cast<unsigned>(B * groups), static_cast<unsigned>(splits));
  const at::TensorOptions f32 = qkv.options().dtype(at::kFloat);
  int64_t max_k = 0;
  for (const at::Tensor& wd : dw_weights) max_k = std::max(max_k, wd.size(3));
  const int64_t part_floats = std::max(D * D + D, D * max_k * max_k + D);
  // [dt (B, C, H, W) | dx accumulator (B, C, H, W), with several scales | partials]
  const int64_t map_floats = B * C * H * W;
  const at::Tensor ws = at::empty({map_floats * (S > 1 ? 2 : 1) + B * groups * splits * part_floats}, f32);
  float* dt = ws.data_ptr<float>();
  float* dx_acc = S > 1 ? dt + map_floats : nullptr;
  float* parts = dt + map_floats * (S > 1 ? 2 : 1);
  const Map<const float> dt_map{dt, C * H * W, H * W, W, 1, false};

  at::Tensor& dqkv = std::get<0>(grads);
  dqkv = at::empty({B, C, H, W}, qkv.options());
  const Map<const T> x = make_map<const T>(qkv);
  const Map<const T> g0 = make_map<const T>(grad_out.narrow(1, 0, C));
  const Map<T> dx_out = make_map<T>(dqkv);
  for (size_t s = 0; s < S; ++s) {
    const int64_t k = dw_weights[s].size(3);
    at::Tensor dwd = at::empty({C, 1, k, k}, f32), dwp = at::empty({C, D, 1, 1}, f32);
    at::Tensor dbd = at::empty({C}, f32), dbp = at::empty({C}, f32);
    const T* wd = reinterpret_cast<const T*>(dw_weights[s].data_ptr());
    const T* wp = reinterpret_cast<const T*>(pw_weights[s].data_ptr());
    const Map<const T> dy = make_map<const T>(grad_out.narrow(1, (1 + static_cast<int64_t>(s)) * C, C));
    dispatch_ksize(k, [&](auto kc) {
      constexpr int K = decltype(kc)::value;
      launch(MA_OP, bwd_dt_kernel<T, K>, grid, SharedBytes<K>::bwd_dt(g.D), dt, parts, dy, x, wd,
             data_or_null<T>(dw_biases, s), wp, static_cast<int>(k), static_cast<int>(groups), g);
      launch_sum_parts(dwp.data_ptr<float>(), dbp.data_ptr<float>(), parts, g.D * g.D, g.D, static_cast<int>(B),
                       static_cast<int>(groups), splits);
      launch(MA_OP, bwd_dx_kernel<T, K>, grid, SharedBytes<K>::bwd_dx(g.D), dx_out, dx_acc, parts, g0, dt_map, x,
             wd, static_cast<int>(k), s == 0, s + 1 == S, static_cast<int>(groups), g);
      launch_sum_parts(dwd.data_ptr<float>(), dbd.data_ptr<float>(), parts, static_cast<int>(g.D * k * k), g.D,
                       static_cast<int>(B), static_cast<int>(groups), splits);
    });
    std::get<1>(grads).push_back(dwd);
    std::get<2>(grads).push_back(dwp);
    std::get<3>(grads).push_back(dbd);
    std::get<4>(grads).push_back(dbp);
  }
}

// ---- ops ----------------------------------------------------------------------------------------

void multiscale_aggregate_fwd_cuda(const at::Tensor& qkv, at::TensorList dw_weights, at::TensorList pw_weights,
                                   int64_t heads, at::TensorList dw_biases, at::TensorList pw_biases,
                                   const at::Tensor& out) {
  const int64_t D = check_aggregation(MA_OP, qkv, dw_weights, pw_weights, heads, dw_biases, pw_biases);
  const int64_t B = qkv.size(0), C = qkv.size(1), H = qkv.size(2), W = qkv.size(3);
  const int64_t S = static_cast<int64_t>(dw_weights.size());
  CHECK_DIM(MA_OP, out, 4, "(B, (1+S)*C, H, W)");
  CHECK_SAME_DEVICE(MA_OP, out, qkv);
  CHECK_SAME_DTYPE(MA_OP, out, qkv);
  CHECK_SHAPE(MA_OP, out, B, (1 + S) * C, H, W);
  CHECK_NO_INTERNAL_OVERLAP(MA_OP, out);
  check_no_overlap(MA_OP, out, "out", qkv, "qkv");
  if (B * H * W == 0) return;
  const c10::cuda::CUDAGuard guard(qkv.device());
  LINATTN_DISPATCH_FLOATING(qkv.scalar_type(), MA_OP, [&] {
    forward<scalar_t>(qkv, dw_weights, pw_weights, heads, dw_biases, pw_biases, out, D);
  });
}

Grads multiscale_aggregate_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& qkv, at::TensorList dw_weights,
                                    at::TensorList pw_weights, int64_t heads, at::TensorList dw_biases) {
  const int64_t D = check_aggregation(MA_OP, qkv, dw_weights, pw_weights, heads, dw_biases, {});
  const int64_t B = qkv.size(0), C = qkv.size(1), H = qkv.size(2), W = qkv.size(3);
  const int64_t S = static_cast<int64_t>(dw_weights.size());
  CHECK_DIM(MA_OP, grad_out, 4, "(B, (1+S)*C, H, W)");
  CHECK_SAME_DEVICE(MA_OP, grad_out, qkv);
  CHECK_SAME_DTYPE(MA_OP, grad_out, qkv);
  CHECK_SHAPE(MA_OP, grad_out, B, (1 + S) * C, H, W);
  Grads grads;
  if (B * H * W == 0) {
    const at::TensorOptions f32 = qkv.options().dtype(at::kFloat);
    std::get<0>(grads) = at::zeros({B, C, H, W}, qkv.options());
    for (const at::Tensor& wd : dw_weights) {
      std::get<1>(grads).push_back(at::zeros(wd.sizes(), f32));
      std::get<2>(grads).push_back(at::zeros({C, D, 1, 1}, f32));
      std::get<3>(grads).push_back(at::zeros({C}, f32));
      std::get<4>(grads).push_back(at::zeros({C}, f32));
    }
    return grads;
  }
  const c10::cuda::CUDAGuard guard(qkv.device());
  LINATTN_DISPATCH_FLOATING(qkv.scalar_type(), MA_OP, [&] {
    backward<scalar_t>(grad_out, qkv, dw_weights, pw_weights, heads, dw_biases, D, grads);
  });
  return grads;
}

}  // namespace
}  // namespace linattn

TORCH_LIBRARY_FRAGMENT(linattn, m) {
  m.def(
      "multiscale_aggregate_fwd_cuda(Tensor qkv, Tensor[] dw_weights, Tensor[] pw_weights, int heads, "
      "Tensor[] dw_biases, Tensor[] pw_biases, Tensor(a!) out) -> ()");
  m.def(
      "multiscale_aggregate_bwd_cuda(Tensor grad_out, Tensor qkv, Tensor[] dw_weights, Tensor[] pw_weights, "
      "int heads, Tensor[] dw_biases) -> (Tensor, Tensor[], Tensor[], Tensor[], Tensor[])");
}

TORCH_LIBRARY_IMPL(linattn, CUDA, m) {
  m.impl("multiscale_aggregate_fwd_cuda", &linattn::multiscale_aggregate_fwd_cuda);
  m.impl("multiscale_aggregate_bwd_cuda", &linattn::multiscale_aggregate_bwd_cuda);
}
