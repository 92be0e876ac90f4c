// csrc/lite_mla_context/lite_mla_context.cu compiled as host C++, unchanged, with CUDA's execution model emulated
// (runtime.h, mma.h) and a pretend GPU (the runtime calls its host code makes, below): its forward<T> (plan, the
// partials, the launches) runs the tensor-core kernels on the CPU, called through ctypes by
// tests/test_csrc_emulated.py.
// ---- everything the .cu includes, first, without __CUDACC__ / __CUDA_ARCH__ (host versions of everything) ----
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <mutex>
#include <type_traits>
#include <unordered_map>

#include "runtime.h"
#include <mma.h>  // this folder's (first on the include path)

// ---- the device dialect as host C++ ----
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __shared__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// the kernels' `extern __shared__ T name[];` name a pointer to the current block's buffer
namespace linattn {
namespace {
unsigned char (*emu_smem_mma)[] = nullptr;
float4 (*emu_smem4)[] = nullptr;
}  // namespace
}  // namespace linattn
#define smem_mma (*emu_smem_mma)
#define smem4 (*emu_smem4)
// op registration compiled but not run (the project's own extension may be loaded in the same process)
#undef TORCH_LIBRARY_FRAGMENT
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_FRAGMENT(ns, m) [[maybe_unused]] static void emu_unregistered_fragment_##ns(torch::Library& m)
#define TORCH_LIBRARY_IMPL(ns, k, m) [[maybe_unused]] static void emu_unregistered_impl_##ns##_##k(torch::Library& m)

#define __CUDACC__ 1
#define __CUDA_ARCH__ 800
#include "lite_mla_context/lite_mla_context.cu"
#undef __CUDA_ARCH__
#undef __CUDACC__

void emu::set_smem(unsigned char* p) {
  linattn::emu_smem_mma = reinterpret_cast<unsigned char(*)[]>(p);
  linattn::emu_smem4 = reinterpret_cast<float4(*)[]>(p);
}

// ---- the CUDA runtime / c10::cuda the host code calls, for an emulated device ----
static int g_sms = 132;  // H100 SXM
extern "C" {
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = g_sms; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = 233472; return cudaSuccess;  // sm_90
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 232448; return cudaSuccess;
    default: std::fprintf(stderr, "EMU: unexpected cudaDeviceGetAttribute(%d)\n", int(attr)); std::abort();
  }
}
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, const void*) {
  std::memset(a, 0, sizeof(*a));
  a->ptxVersion = 90;
  a->binaryVersion = 90;
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }
cudaError_t cudaGetLastError() { return cudaSuccess; }
cudaError_t cudaPeekAtLastError() { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t) { return "emulated"; }
}
namespace c10::cuda {
DeviceIndex current_device() { return 0; }
CUDAStream getCurrentCUDAStream(DeviceIndex) {
  return CUDAStream(CUDAStream::UNCHECKED, Stream(Stream::UNSAFE, Device(DeviceType::CUDA, 0), 0));
}
cudaStream_t CUDAStream::stream() const { return nullptr; }
CUDAErrorLogCapture::CUDAErrorLogCapture() noexcept {}
void c10_cuda_check_implementation(const int32_t err, const char*, const char*, const uint32_t, const bool,
                                   CUDAErrorLogCapture*) {
  if (err != 0) std::abort();
}
}  // namespace c10::cuda

extern bool FLAGS_caffe2_cpu_allocator_do_junk_fill;

// ---- the ctypes entry ----
template <typename T>
std::string kernel_name(const void* k) {
  using namespace linattn;
  std::string name = "?";
  auto check = [&](auto kc) {
    constexpr int K = decltype(kc)::value;
    const std::string k_ = std::to_string(K);
    if constexpr (!std::is_same_v<T, float>) {
      if (k == reinterpret_cast<const void*>(&mma_kernel<T, K, MmaPass::kOne>)) name = "mma<K=" + k_ + ",kOne>";
      if (k == reinterpret_cast<const void*>(&mma_kernel<T, K, MmaPass::kState>)) name = "mma<K=" + k_ + ",kState>";
      if (k == reinterpret_cast<const void*>(&mma_kernel<T, K, MmaPass::kOut>)) name = "mma<K=" + k_ + ",kOut>";
    }
    if (k == reinterpret_cast<const void*>(&state_kernel<T, K>)) name = "state<K=" + k_ + ">";
    if (k == reinterpret_cast<const void*>(&out_kernel<T, K>)) name = "out<K=" + k_ + ">";
  };
  check(std::integral_constant<int, 3>{});
  check(std::integral_constant<int, 5>{});
  check(std::integral_constant<int, 9>{});
  return name;
}
static std::string g_launches;
extern "C" const char* emu_launches() { return g_launches.c_str(); }

namespace {
at::Tensor blob(void* p, std::vector<int64_t> sizes, std::vector<int64_t> strides, at::ScalarType t) {
  return at::from_blob(p, sizes, strides, at::TensorOptions().dtype(t));
}
}  // namespace

// The blocks forward<T>'s tensor-core plan splits each head's map into on `sms` SMs (1: the one pass).
extern "C" int emu_splits(int64_t B, int64_t heads, int64_t H, int64_t W, int kmax, int sms) {
  g_sms = sms;
  const std::vector<at::Tensor> dws{at::empty({1, 1, kmax, kmax})};
  return linattn::aggregate::num_splits(
      linattn::aggregate::plan(2 * B * heads, H, W, linattn::kMmaD, linattn::mma_blocks_per_sm(dws)));
}

// dtype: 5 = Half, 6 = Float, 15 = BFloat16 (c10::ScalarType). Weights contiguous; bd/bp may be null (no biases).
extern "C" int emu_forward(int dtype, void* qkv, const int64_t* qkv_sizes, const int64_t* qkv_strides, int S,
                           void** dw, const int64_t* ks, void** pw, void** bd, void** bp, int64_t heads, int64_t D,
                           double eps, void* out, const int64_t* out_strides, int sms, uint64_t* stats) {
  FLAGS_caffe2_cpu_allocator_do_junk_fill = true;  // the partials (at::empty) start as junk (NaN)
  g_sms = sms;
  const auto t = static_cast<at::ScalarType>(dtype);
  const int64_t B = qkv_sizes[0], C = qkv_sizes[1], H = qkv_sizes[2], W = qkv_sizes[3];
  try {
    at::Tensor x = blob(qkv, {B, C, H, W}, {qkv_strides[0], qkv_strides[1], qkv_strides[2], qkv_strides[3]}, t);
    at::Tensor o = blob(out, {B, (1 + S) * heads * D, H, W},
                        {out_strides[0], out_strides[1], out_strides[2], out_strides[3]}, t);
    std::vector<at::Tensor> dws, pws, dbs, pbs;
    for (int s = 0; s < S; ++s) {
      dws.push_back(at::from_blob(dw[s], {C, 1, ks[s], ks[s]}, at::TensorOptions().dtype(t)));
      pws.push_back(at::from_blob(pw[s], {C, D, 1, 1}, at::TensorOptions().dtype(t)));
      if (bd != nullptr) dbs.push_back(at::from_blob(bd[s], {C}, at::TensorOptions().dtype(t)));
      if (bp != nullptr) pbs.push_back(at::from_blob(bp[s], {C}, at::TensorOptions().dtype(t)));
    }
    emu::log = {};
    emu::st.errors = 0;
    emu::st.block_barriers = 0;
    emu::st.warp_barriers = 0;
    std::string (*name)(const void*) = nullptr;
    if (t == at::kHalf) {
      linattn::forward<at::Half>(x, dws, pws, heads, D, static_cast<float>(eps), dbs, pbs, o);
      name = kernel_name<at::Half>;
    } else if (t == at::kBFloat16) {
      linattn::forward<at::BFloat16>(x, dws, pws, heads, D, static_cast<float>(eps), dbs, pbs, o);
      name = kernel_name<at::BFloat16>;
    } else if (t == at::kFloat) {
      linattn::forward<float>(x, dws, pws, heads, D, static_cast<float>(eps), dbs, pbs, o);
      name = kernel_name<float>;
    } else {
      return 2;
    }
    g_launches.clear();
    for (auto& [k, grid] : emu::log.kernels) {
      g_launches += name(k) + " grid(" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," +
                    std::to_string(grid.z) + "); ";
    }
    stats[0] = emu::log.launches;
    stats[1] = emu::log.blocks;
    stats[2] = emu::st.block_barriers.load();
    stats[3] = emu::st.warp_barriers.load();
    stats[4] = static_cast<uint64_t>(emu::st.errors.load());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "EMU: exception: %s\n", e.what());
    return 1;
  }
  return 0;
}
