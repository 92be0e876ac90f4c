// Fused conv + BatchNorm + activation (DESIGN 3.4): CUDA kernels, launcher and op registration.
//
// out = act(conv2d(x, weight) + bias) * post_scale + post_shift + residual, forward only, for
// the two convs of the encoders that have a hand kernel here (others run on Triton):
//   depthwise  groups == Cin, Cout = m * Cin (channel multiplier m >= 1; output channel co
//              reads input channel co / m), any kernel size, stride, padding, dilation
//   1x1        KH = KW = 1, stride 1, padding 0, groups 1: a GEMM
//              out[co, (b, p)] = sum_ci weight[co, ci] * x[b, ci, p] over the B*H*W pixels
// Sums are in fp32; inputs and output float, half or bfloat16 (one dtype); bias, post_scale,
// post_shift fp32 (Cout,) vectors (the Python wrapper casts them).
//
// Layout contract: x, residual and out are (B, C, H, W) with any strides, read and written
// through them; weight any strides. Both kernels choose their thread-to-element map from
// the layout: along W for NCHW-like tensors, along C for channels_last ones, so global
// accesses are coalesced either way.
//
// depthwise_kernel<T, kChannelsLast>: one block (256 threads) per (spatial tile, chunk of
//   kCC output channels, image). It stages the input tile plus halo of its channels in
//   shared memory as fp32 (zeros outside the image) and the chunk's kCC x KH x KW weights,
//   then every thread computes kOut / 256 outputs from shared memory. NCHW: kCC = 1 and a
//   16 x 32 output tile, shared layout [row][col]; channels_last: kCC = 32 channels and a
//   4 x 8 tile, shared layout [row][col][channel] (consecutive threads, consecutive
//   channels: conflict-free). The halo's size depends on k, stride and dilation (dynamic
//   shared memory, opt-in above 48 KiB).
// gemm1x1_kernel<T>: 64 (Cout) x 64 (pixels) output tile per block, k-steps of 16 input
//   channels; 256 threads, each a 4 x 4 register tile of fp32 FMAs on float4 reads of the
//   shared tiles; the next k-step's tiles are fetched into registers while the current one
//   is computed. The epilogue is applied in registers and stored through out's strides.
//   Thread roles follow the layout: NCHW, consecutive threads take consecutive pixels
//   (loads and stores along W); channels_last, consecutive channels.
//
// Templates: the scalar type, and the layout for the depthwise kernel (9 instantiations);
// the activation and the optional inputs are runtime arguments (uniform branches).

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <optional>
#include <vector>

#include "common.h"
#include "conv_bn_act/conv_checks.h"

namespace linattn {
namespace {

using namespace conv;  // Act, act_code and the call's checks, shared with cudnn_graph.cpp

// ---- epilogue ------------------------------------------------------------------------------


// As torch.nn.functional computes them (in fp32); comparisons keep NaN as NaN.
__device__ __forceinline__ float activate(float z, int act) {
  switch (act) {
    case kRelu:
      return z < 0.f ? 0.f : z;
    case kRelu6:
      return z < 0.f ? 0.f : (z > 6.f ? 6.f : z);
    case kGelu:
      return 0.5f * z * (1.f + erff(z * 0.70710678118654752f));
    case kGeluTanh: {
      const float inner = 0.79788456080286536f * (z + 0.044715f * z * z * z);
      return 0.5f * z * (1.f + tanhf(inner));
    }
    case kHardswish: {
      const float r = z + 3.f;
      return z * (r < 0.f ? 0.f : (r > 6.f ? 6.f : r)) * (1.f / 6.f);
    }
    case kSilu:
      return z / (1.f + expf(-z));
    default:
      return z;
  }
}

// The per-channel vectors (null when absent), the residual (null when absent) and out.
template <typename T>
struct Epilogue {
  const float* bias;
  const float* scale;
  const float* shift;
  const T* residual;
  int64_t res_stride[4];  // b, c, h, w
  T* out;
  int64_t out_stride[4];
  int act;

  // Writes the conv sum acc of (b, c, h, w) through the epilogue.
  __device__ __forceinline__ void store(float acc, int64_t b, int64_t c, int64_t h, int64_t w) const {
    float y = activate(bias ? acc + bias[c] : acc, act);
    if (scale) y *= scale[c];
    if (shift) y += shift[c];
    if (residual) {
      y += static_cast<float>(
          residual[b * res_stride[0] + c * res_stride[1] + h * res_stride[2] + w * res_stride[3]]);
    }
    out[b * out_stride[0] + c * out_stride[1] + h * out_stride[2] + w * out_stride[3]] = static_cast<T>(y);
  }
};

// A (B, C, H, W) input and the conv geometry.
template <typename T>
struct ConvArgs {
  const T* x;
  int64_t x_stride[4];
  const T* weight;
  int64_t w_stride[4];  // (Cout, Cin/groups, KH, KW)
  int B, Cin, H, W, Cout, Ho, Wo, KH, KW;
  int sh, sw, ph, pw, dh, dw;
  int multiplier;  // depthwise: Cout / Cin
};

// ---- depthwise: direct conv on a shared-memory tile with halo ------------------------------

template <bool kChannelsLast>
struct DwConfig {
  static constexpr int kThreads = 256;
  static constexpr int kCC = kChannelsLast ? 32 : 1;  // output channels per block
  static constexpr int kTH = kChannelsLast ? 4 : 16;  // output rows per block
  static constexpr int kTW = kChannelsLast ? 8 : 32;  // output columns per block
  static constexpr int kOut = kCC * kTH * kTW;
  static_assert(kOut % kThreads == 0, "outputs per thread");
};

// Shared tile of the input halo: rows IH, columns IW, kCC channels (fp32), then kCC * KH * KW
// weights. Index of (channel cc, row r, column c):
template <bool kChannelsLast>
__device__ __forceinline__ int halo_index(int cc, int r, int c, int IH, int IW) {
  using C = DwConfig<kChannelsLast>;
  return kChannelsLast ? (r * IW + c) * C::kCC + cc : (cc * IH + r) * IW + c;
}

// grid: x = spatial tile (row-major over tiles), y = chunk of kCC output channels, z = image.
template <typename T, bool kChannelsLast>
__global__ void __launch_bounds__(DwConfig<kChannelsLast>::kThreads)
    depthwise_kernel(const ConvArgs<T> a, const Epilogue<T> ep, int tiles_w, int IH, int IW) {
  using C = DwConfig<kChannelsLast>;
  extern __shared__ float4 smem4[];
  float* tile = reinterpret_cast<float*>(smem4);
  const int halo = C::kCC * IH * IW;
  float* wts = tile + halo;  // [cc][kh * KW + kw]

  const int oh0 = static_cast<int>(blockIdx.x / tiles_w) * C::kTH;
  const int ow0 = static_cast<int>(blockIdx.x % tiles_w) * C::kTW;
  const int c0 = blockIdx.y * C::kCC;
  const int64_t b = blockIdx.z;
  const int ih0 = oh0 * a.sh - a.ph, iw0 = ow0 * a.sw - a.pw;
  const int taps = a.KH * a.KW;

  // Halo: the linear index walks the contiguous dimension fastest (W, or C).
  const T* xb = a.x + b * a.x_stride[0];
  for (int i = threadIdx.x; i < halo; i += C::kThreads) {
    int cc, r, c;
    if (kChannelsLast) {
      cc = i % C::kCC;
      c = (i / C::kCC) % IW;
      r = i / (C::kCC * IW);
    } else {
      c = i % IW;
      r = (i / IW) % IH;
      cc = i / (IW * IH);
    }
    const int co = c0 + cc, ih = ih0 + r, iw = iw0 + c;
    float v = 0.f;
    if (co < a.Cout && ih >= 0 && ih < a.H && iw >= 0 && iw < a.W) {
      const int64_t ci = co / a.multiplier;
      v = static_cast<float>(xb[ci * a.x_stride[1] + ih * a.x_stride[2] + static_cast<int64_t>(iw) * a.x_stride[3]]);
    }
    tile[halo_index<kChannelsLast>(cc, r, c, IH, IW)] = v;
  }
  for (int i = threadIdx.x; i < C::kCC * taps; i += C::kThreads) {
    const int cc = i / taps, t = i % taps, co = c0 + cc;
    const int kh = t / a.KW, kw = t % a.KW;
    wts[i] = co < a.Cout ? static_cast<float>(a.weight[co * a.w_stride[0] + kh * a.w_stride[2] +
                                                       static_cast<int64_t>(kw) * a.w_stride[3]])
                         : 0.f;
  }
  __syncthreads();

#pragma unroll
  for (int j = 0; j < C::kOut / C::kThreads; ++j) {
    const int o = threadIdx.x + j * C::kThreads;
    int cc, r, c;  // output (channel, row, column) within the tile
    if (kChannelsLast) {
      cc = o % C::kCC;
      c = (o / C::kCC) % C::kTW;
      r = o / (C::kCC * C::kTW);
    } else {
      c = o % C::kTW;
      r = o / C::kTW;
      cc = 0;
    }
    const int co = c0 + cc, oh = oh0 + r, ow = ow0 + c;
    if (co >= a.Cout || oh >= a.Ho || ow >= a.Wo) continue;
    const float* w = wts + cc * taps;
    float acc = 0.f;
    for (int kh = 0; kh < a.KH; ++kh) {
      const int hr = r * a.sh + kh * a.dh;
      for (int kw = 0; kw < a.KW; ++kw) {
        acc = fmaf(tile[halo_index<kChannelsLast>(cc, hr, c * a.sw + kw * a.dw, IH, IW)], w[kh * a.KW + kw], acc);
      }
    }
    ep.store(acc, b, co, oh, ow);
  }
}

// ---- 1x1: tiled GEMM with the fused epilogue --------------------------------------------------

struct GemmConfig {
  static constexpr int kThreads = 256;
  static constexpr int kBM = 64;      // output channels per block
  static constexpr int kBN = 64;      // pixels per block
  static constexpr int kBK = 16;      // input channels per k-step
  static constexpr int kLd = 64 + 4;  // shared leading dimension (rows stay 16-byte aligned)
  static constexpr int kLoads = kBK * kBM / kThreads;  // elements per thread per operand and k-step
  static_assert(kBK * kBN / kThreads == kLoads, "operand split");
};

// grid: x = tile of pixels (of all B*H*W), y = tile of output channels.
// c_fast: x is channels_last (C the contiguous dim): threads take consecutive channels.
template <typename T>
__global__ void __launch_bounds__(GemmConfig::kThreads)
    gemm1x1_kernel(const ConvArgs<T> a, const Epilogue<T> ep, bool c_fast) {
  using G = GemmConfig;
  __shared__ __align__(16) float As[G::kBK * G::kLd];  // [ci][co]
  __shared__ __align__(16) float Bs[G::kBK * G::kLd];  // [ci][pixel]

  const int tid = threadIdx.x;
  const int64_t HW = static_cast<int64_t>(a.H) * a.W;
  const int64_t pixels = a.B * HW;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * G::kBN;
  const int co0 = blockIdx.y * G::kBM;

  // Weight loads (ci fastest, as weight rows are contiguous): this thread's (ci, co) pairs.
  const int a_ci = tid % G::kBK;
  const int a_co = tid / G::kBK;  // + 16 * i
  // x loads: NCHW pixel fastest, channels_last ci fastest; pixel offsets are computed once.
  const int b_ci = c_fast ? tid % G::kBK : tid / G::kBN;   // + (c_fast ? 0 : 4 * i)
  const int b_px = c_fast ? tid / G::kBK : tid % G::kBN;   // + (c_fast ? 16 * i : 0)
  int64_t b_off[G::kLoads];
  bool b_ok[G::kLoads];
#pragma unroll
  for (int i = 0; i < G::kLoads; ++i) {
    const int px = c_fast ? b_px + 16 * i : b_px;
    const int64_t q = q0 + px;
    b_ok[i] = q < pixels;
    const int64_t bb = q / HW, p = q % HW;
    b_off[i] = bb * a.x_stride[0] + (p / a.W) * a.x_stride[2] + (p % a.W) * a.x_stride[3];
  }

  float ra[G::kLoads], rb[G::kLoads];
  auto fetch = [&](int k0) {
#pragma unroll
    for (int i = 0; i < G::kLoads; ++i) {
      const int ci = k0 + a_ci, co = co0 + a_co + 16 * i;
      ra[i] = (ci < a.Cin && co < a.Cout)
                  ? static_cast<float>(a.weight[static_cast<int64_t>(co) * a.w_stride[0] +
                                                static_cast<int64_t>(ci) * a.w_stride[1]])
                  : 0.f;
      const int bci = k0 + (c_fast ? b_ci : b_ci + 4 * i);
      rb[i] = (bci < a.Cin && b_ok[i]) ? static_cast<float>(a.x[b_off[i] + static_cast<int64_t>(bci) * a.x_stride[1]])
                                       : 0.f;
    }
  };
  auto stage = [&]() {
#pragma unroll
    for (int i = 0; i < G::kLoads; ++i) {
      As[a_ci * G::kLd + a_co + 16 * i] = ra[i];
      if (c_fast) {
        Bs[b_ci * G::kLd + b_px + 16 * i] = rb[i];
      } else {
        Bs[(b_ci + 4 * i) * G::kLd + b_px] = rb[i];
      }
    }
  };

  // Compute roles: 4 consecutive channels x 4 consecutive pixels per thread; the 16 threads
  // that vary fastest walk pixels (NCHW) or channels (channels_last).
  const int gm = c_fast ? tid % 16 : tid / 16;  // channel group: co0 + 4 * gm + i
  const int gn = c_fast ? tid / 16 : tid % 16;  // pixel group: q0 + 4 * gn + j
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  fetch(0);
  for (int k0 = 0; k0 < a.Cin; k0 += G::kBK) {
    __syncthreads();  // the previous k-step is done reading the tiles
    stage();
    __syncthreads();
    if (k0 + G::kBK < a.Cin) fetch(k0 + G::kBK);
#pragma unroll
    for (int k = 0; k < G::kBK; ++k) {
      const float4 av = *reinterpret_cast<const float4*>(As + k * G::kLd + 4 * gm);
      const float4 bv = *reinterpret_cast<const float4*>(Bs + k * G::kLd + 4 * gn);
      const float am[4] = {av.x, av.y, av.z, av.w};
      const float bn[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(am[i], bn[j], acc[i][j]);
    }
  }

#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t q = q0 + 4 * gn + j;
    if (q >= pixels) continue;
    const int64_t bb = q / HW, p = q % HW;
    const int64_t h = p / a.W, w = p % a.W;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int co = co0 + 4 * gm + i;
      if (co < a.Cout) ep.store(acc[i][j], bb, co, h, w);
    }
  }
}

// ---- host side ----------------------------------------------------------------------------------

int device_attribute(cudaDeviceAttr attr) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, c10::cuda::current_device()));
  return value;
}

// channels_last-like: C is the densest of the (C, H, W) dims (and not a single channel).
bool channels_fast(const at::Tensor& t) {
  return t.size(1) > 1 && t.stride(1) < t.stride(3) && t.stride(1) < t.stride(2);
}

template <typename T>
ConvArgs<T> conv_args(const at::Tensor& x, const at::Tensor& weight, c10::IntArrayRef stride,
                      c10::IntArrayRef padding, c10::IntArrayRef dilation, const at::Tensor& out) {
  ConvArgs<T> a;
  a.x = reinterpret_cast<const T*>(x.data_ptr());
  a.weight = reinterpret_cast<const T*>(weight.data_ptr());
  for (int d = 0; d < 4; ++d) {
    a.x_stride[d] = x.stride(d);
    a.w_stride[d] = weight.stride(d);
  }
  a.B = static_cast<int>(x.size(0));
  a.Cin = static_cast<int>(x.size(1));
  a.H = static_cast<int>(x.size(2));
  a.W = static_cast<int>(x.size(3));
  a.Cout = static_cast<int>(weight.size(0));
  a.KH = static_cast<int>(weight.size(2));
  a.KW = static_cast<int>(weight.size(3));
  a.Ho = static_cast<int>(out.size(2));
  a.Wo = static_cast<int>(out.size(3));
  a.sh = static_cast<int>(stride[0]);
  a.sw = static_cast<int>(stride[1]);
  a.ph = static_cast<int>(padding[0]);
  a.pw = static_cast<int>(padding[1]);
  a.dh = static_cast<int>(dilation[0]);
  a.dw = static_cast<int>(dilation[1]);
  a.multiplier = a.Cout / a.Cin;
  return a;
}

const float* vector_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

template <typename T>
Epilogue<T> epilogue(const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& post_scale,
                     const std::optional<at::Tensor>& post_shift, const std::optional<at::Tensor>& residual,
                     const at::Tensor& out, int act) {
  Epilogue<T> ep;
  ep.bias = vector_ptr(bias);
  ep.scale = vector_ptr(post_scale);
  ep.shift = vector_ptr(post_shift);
  ep.residual = residual.has_value() ? reinterpret_cast<const T*>(residual->data_ptr()) : nullptr;
  ep.out = reinterpret_cast<T*>(out.data_ptr());
  for (int d = 0; d < 4; ++d) {
    ep.res_stride[d] = residual.has_value() ? residual->stride(d) : 0;
    ep.out_stride[d] = out.stride(d);
  }
  ep.act = act;
  return ep;
}

template <typename T, bool kChannelsLast>
void launch_depthwise(const ConvArgs<T>& a, const Epilogue<T>& ep, cudaStream_t stream) {
  using C = DwConfig<kChannelsLast>;
  const int tiles_h = (a.Ho + C::kTH - 1) / C::kTH, tiles_w = (a.Wo + C::kTW - 1) / C::kTW;
  const int IH = (C::kTH - 1) * a.sh + (a.KH - 1) * a.dh + 1;
  const int IW = (C::kTW - 1) * a.sw + (a.KW - 1) * a.dw + 1;
  const size_t smem = (static_cast<size_t>(C::kCC) * IH * IW + static_cast<size_t>(C::kCC) * a.KH * a.KW) *
                      sizeof(float);
  const int64_t chunks = (a.Cout + C::kCC - 1) / C::kCC;
  LINATTN_CHECK(CBA_OP, chunks <= 65535 && a.B <= 65535, "depthwise kernel: ", a.Cout, " channels and batch ",
                a.B, " exceed its grid (65535 channel chunks of ", C::kCC, ", 65535 images)");
  auto kernel = depthwise_kernel<T, kChannelsLast>;
  if (smem > 48 * 1024) {
    const size_t optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
    LINATTN_CHECK(CBA_OP, smem <= optin, "depthwise kernel of ", a.KH, "x", a.KW, " with stride (", a.sh, ", ",
                  a.sw, ") and dilation (", a.dh, ", ", a.dw, ") needs ", smem,
                  " bytes of shared memory per block, this GPU allows ", optin, "; use backend 'triton'");
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  const dim3 grid(static_cast<unsigned>(static_cast<int64_t>(tiles_h) * tiles_w), static_cast<unsigned>(chunks),
                  static_cast<unsigned>(a.B));
  kernel<<<grid, C::kThreads, smem, stream>>>(a, ep, tiles_w, IH, IW);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_gemm1x1(const ConvArgs<T>& a, const Epilogue<T>& ep, bool c_fast, cudaStream_t stream) {
  using G = GemmConfig;
  const int64_t pixels = static_cast<int64_t>(a.B) * a.H * a.W;
  const int64_t tiles_n = (pixels + G::kBN - 1) / G::kBN, tiles_m = (a.Cout + G::kBM - 1) / G::kBM;
  LINATTN_CHECK(CBA_OP, tiles_n <= std::numeric_limits<int>::max() && tiles_m <= 65535, "1x1 kernel: ", pixels,
                " pixels and ", a.Cout, " output channels exceed its grid");
  const dim3 grid(static_cast<unsigned>(tiles_n), static_cast<unsigned>(tiles_m));
  gemm1x1_kernel<T><<<grid, G::kThreads, 0, stream>>>(a, ep, c_fast);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- op -----------------------------------------------------------------------------------------

void conv_bn_act_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                          int64_t groups, const std::string& act, const std::optional<at::Tensor>& post_scale,
                          const std::optional<at::Tensor>& post_shift, const std::optional<at::Tensor>& residual,
                          const at::Tensor& out) {
  const ConvSizes s = check_call(x, weight, bias, stride, padding, dilation, groups, act, post_scale, post_shift,
                                 residual, out);
  const int code = s.act;
  const int64_t B = s.B, Cin = s.Cin, H = s.H, W = s.W, Cout = s.Cout, KH = s.KH, KW = s.KW;
  const bool depthwise = groups == Cin && weight.size(1) == 1;
  const bool pointwise = groups == 1 && KH == 1 && KW == 1 && stride[0] == 1 && stride[1] == 1 &&
                         padding[0] == 0 && padding[1] == 0;
  LINATTN_CHECK(CBA_OP, depthwise || pointwise,
                "the CUDA kernels take depthwise convs (groups = Cin) and 1x1 convs with stride 1, padding 0 and "
                "groups 1; got a ",
                KH, "x", KW, " conv with groups ", groups, " of ", Cin, " channels, stride ", stride, ", padding ",
                padding, " (use backend 'triton')");
  if (residual.has_value()) {
    // out may be the residual itself (each element read, then written, by one thread) but no other overlap
    const at::MemOverlapStatus status = at::get_overlap_status(out, *residual);
    LINATTN_CHECK(CBA_OP,
                  status != at::MemOverlapStatus::Partial &&
                      (status != at::MemOverlapStatus::Full || out.strides() == residual->strides()),
                  "out must not partially share memory with residual");
  }
  const int64_t limit = std::numeric_limits<int>::max();
  LINATTN_CHECK(CBA_OP, B <= limit && Cin <= limit && Cout <= limit && H <= limit && W <= limit,
                "sizes must fit in int32");

  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LINATTN_DISPATCH_FLOATING(x.scalar_type(), CBA_OP, [&] {
    const ConvArgs<scalar_t> a = conv_args<scalar_t>(x, weight, stride, padding, dilation, out);
    const Epilogue<scalar_t> ep = epilogue<scalar_t>(bias, post_scale, post_shift, residual, out, code);
    if (depthwise) {
      if (channels_fast(x)) {
        launch_depthwise<scalar_t, true>(a, ep, stream);
      } else {
        launch_depthwise<scalar_t, false>(a, ep, stream);
      }
    } else {
      launch_gemm1x1<scalar_t>(a, ep, channels_fast(x), stream);
    }
  });
}

}  // namespace
}  // namespace linattn

TORCH_LIBRARY_FRAGMENT(linattn, m) {
  m.def(
      "conv_bn_act_fwd_cuda(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, "
      "int groups, str act, Tensor? post_scale, Tensor? post_shift, Tensor? residual, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(linattn, CUDA, m) { m.impl("conv_bn_act_fwd_cuda", &linattn::conv_bn_act_fwd_cuda); }
