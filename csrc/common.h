// Shared helpers of the linattn CUDA ops: argument checks with readable messages and
// a dispatch over the floating dtypes the kernels take (float, half, bfloat16).
//
// Every message starts with "linattn.<op> (cuda): " and names the argument, e.g.
//   linattn.relu_linear_attention (cuda): q must be 4-D (B, H, N, D), got shape [2, 3, 4]
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

// A bad value or shape raises ValueError, a bad dtype TypeError (as the Python checks do).
#define LINATTN_CHECK(op, cond, ...) TORCH_CHECK_VALUE((cond), "linattn." op " (cuda): ", __VA_ARGS__)
#define LINATTN_CHECK_TYPE(op, cond, ...) TORCH_CHECK_TYPE((cond), "linattn." op " (cuda): ", __VA_ARGS__)

#define CHECK_CUDA(op, x) \
  LINATTN_CHECK(op, (x).is_cuda(), #x " must be a CUDA tensor, got device ", (x).device())

#define CHECK_SAME_DEVICE(op, x, ref)                                                                    \
  LINATTN_CHECK(op, (x).device() == (ref).device(), #x " must be on " #ref "'s device ", (ref).device(), \
                ", got ", (x).device())

#define CHECK_DIM(op, x, ndim, layout) \
  LINATTN_CHECK(op, (x).dim() == (ndim), #x " must be ", (ndim), "-D " layout ", got shape ", (x).sizes())

// CHECK_SHAPE(op, x, B, H, N, D): x has exactly these sizes.
#define CHECK_SHAPE(op, x, ...)                                                            \
  LINATTN_CHECK(op, (x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape ", \
                at::IntArrayRef({__VA_ARGS__}), ", got ", (x).sizes())

#define CHECK_SAME_DTYPE(op, x, ref)                                                                  \
  LINATTN_CHECK_TYPE(op, (x).scalar_type() == (ref).scalar_type(), #x " must have " #ref "'s dtype ", \
                     (ref).scalar_type(), ", got ", (x).scalar_type())

#define CHECK_FLOATING_DTYPE(op, x)                                                       \
  LINATTN_CHECK_TYPE(op,                                                                  \
                     (x).scalar_type() == at::kFloat || (x).scalar_type() == at::kHalf || \
                         (x).scalar_type() == at::kBFloat16,                              \
                     #x " must be float32, float16 or bfloat16, got ", (x).scalar_type())

// Outputs are written element by element: a tensor whose elements share memory
// (a stride-0 expand) would be a data race.
#define CHECK_NO_INTERNAL_OVERLAP(op, x)                                \
  LINATTN_CHECK(op, at::has_internal_overlap(x) != at::MemOverlap::Yes, \
                #x " must not have overlapping elements (strides ", (x).strides(), ")")

// LINATTN_DISPATCH_FLOATING(dtype, "op", [&] { f<scalar_t>(); }): calls the lambda with
// scalar_t = float, at::Half or at::BFloat16; nothing else is instantiated.
#define LINATTN_DISPATCH_CASE(enum_type, type, ...) \
  case enum_type: {                                 \
    using scalar_t = type;                          \
    __VA_ARGS__();                                  \
    break;                                          \
  }

#define LINATTN_DISPATCH_FLOATING(dtype, op, ...)                                     \
  do {                                                                                \
    switch (dtype) {                                                                  \
      LINATTN_DISPATCH_CASE(at::kFloat, float, __VA_ARGS__)                           \
      LINATTN_DISPATCH_CASE(at::kHalf, at::Half, __VA_ARGS__)                         \
      LINATTN_DISPATCH_CASE(at::kBFloat16, at::BFloat16, __VA_ARGS__)                 \
      default:                                                                        \
        TORCH_CHECK_TYPE(false, "linattn." op " (cuda): unsupported dtype ", (dtype), \
                         " (float32, float16 or bfloat16)");                          \
    }                                                                                 \
  } while (0)

#ifdef __CUDACC__
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

namespace linattn {

// kernel<<<grid, block, smem, stream>>>: what the launch helpers write before the kernel's arguments, so that
// tests/emulation can run the kernels on the CPU by defining it first
#ifndef LINATTN_LAUNCH
#define LINATTN_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#endif

// An attribute of the current device (cudaDeviceGetAttribute: the runtime keeps them, no driver call).
inline int device_attribute(cudaDeviceAttr attr) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, c10::cuda::current_device()));
  return value;
}

// x, in a register the compiler cannot see into: what is computed from it is computed
// after this point. The kernels run with __launch_bounds__ that leave no registers to
// spare, and the compiler otherwise computes a loop phase's per-thread indices and
// addresses (from the thread index and the sizes) once, before the loop, and carries them
// (or spills them) through the other phases. A phase that takes its inputs through
// opaque() computes them where it uses them. The value is unchanged: results are too.
__device__ __forceinline__ int opaque(int x) {
  asm volatile("" : "+r"(x));
  return x;
}

// threadIdx.x through opaque().
__device__ __forceinline__ int thread_index() { return opaque(static_cast<int>(threadIdx.x)); }

}  // namespace linattn
#endif
