// <mma.h> for the CPU emulation (runtime.h): nvcuda::wmma 16x16x16. Each thread's fragment holds the whole 16x16 matrix
// (fp16/bf16 inputs widened exactly to float); mma_sync sums the exact products in double and adds the fp32
// accumulator (one rounding to fp32); store_matrix_sync writes from each lane only the elements e % 32 == lane
// (each element once, as the hardware's fragments own them). Every call is a warp collective (a warp barrier,
// checked for convergence). Pointers must be 32-byte aligned and ldm a multiple of 16 bytes, as on the GPU.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdio>
#include <type_traits>

#include "runtime.h"

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "emulated shape: 16x16x16");
  float v[16][16];
};

namespace detail {
inline float widen(__half x) { return __half2float(x); }
inline float widen(__nv_bfloat16 x) { return __bfloat162float(x); }
inline float widen(float x) { return x; }
inline void check(const void* p, unsigned ldm, size_t elem, const std::source_location& l) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ldm * elem) % 16 != 0) {
    std::fprintf(stderr, "EMU: WMMA pointer %p not 32-byte aligned or ldm %u not a multiple of 16 bytes at %s:%u\n",
                 p, ldm, l.file_name(), l.line());
    emu::st.errors.fetch_add(1);
  }
}
inline void converge(const std::source_location& l) { emu::warp_sync(l); }
}  // namespace detail

template <typename Use, typename T, typename L>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, float x) {
  for (auto& r : f.v)
    for (auto& e : r) e = detail::widen(static_cast<T>(x));
}

template <typename Use, typename T, typename L>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm,
                             const std::source_location l = std::source_location::current()) {
  static_assert(std::is_same_v<Use, matrix_a> || std::is_same_v<Use, matrix_b>);
  static_assert(std::is_same_v<L, row_major> || std::is_same_v<L, col_major>);
  detail::check(p, ldm, sizeof(T), l);
  detail::converge(l);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.v[r][c] = detail::widen(std::is_same_v<L, row_major> ? p[r * ldm + c] : p[r + c * ldm]);
}

template <typename EA, typename LA, typename EB, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, EA, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, EB, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c,
                     const std::source_location l = std::source_location::current()) {
  static_assert(std::is_same_v<EA, EB>);
  detail::converge(l);
  float out[16][16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      double s = 0.0;
      for (int k = 0; k < 16; ++k) s += static_cast<double>(a.v[i][k]) * static_cast<double>(b.v[k][j]);
      out[i][j] = static_cast<float>(s + static_cast<double>(c.v[i][j]));
    }
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) d.v[i][j] = out[i][j];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout, const std::source_location l = std::source_location::current()) {
  detail::check(p, ldm, sizeof(float), l);
  detail::converge(l);
  const int lane = threadIdx.x % 32;
  for (int e = lane; e < 256; e += 32) {
    const int r = e / 16, c = e % 16;
    p[layout == mem_row_major ? r * ldm + c : r + c * ldm] = f.v[r][c];
  }
}

}  // namespace wmma
}  // namespace nvcuda
