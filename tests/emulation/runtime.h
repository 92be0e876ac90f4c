// CUDA's execution model on the CPU, for tests/test_csrc_emulated.py: a launch runs its blocks one after another,
// each on as many real threads as the block has (std::thread), so __syncthreads is a real barrier. Each barrier
// and warp collective checks that every thread reached the same source line (divergent barriers are errors), and
// a watchdog ends a launch whose barriers stop completing (a deadlock).
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <math.h>
#include <memory>
#include <source_location>
#include <string>
#include <sys/mman.h>
#include <thread>
#include <unistd.h>
#include <vector>

#include <cuda_runtime.h>  // host-only (no __CUDACC__): dim3, uint3, float4, make_uint4, cuda* declarations

inline thread_local uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace emu {

constexpr int kMaxThreads = 1024;

struct State {
  int nthreads = 0;
  std::atomic<uint64_t> progress{0};
  // where each thread last entered a block-wide / warp-wide barrier
  const char* bfile[kMaxThreads];
  unsigned bline[kMaxThreads];
  const char* wfile[kMaxThreads];
  unsigned wline[kMaxThreads];
  uint64_t shfl[kMaxThreads];
  std::atomic<int> errors{0};
  std::atomic<uint64_t> block_barriers{0}, warp_barriers{0};
};
inline State st;

inline void error(const char* fmt, const char* a, unsigned la, const char* b, unsigned lb, int t) {
  if (st.errors.fetch_add(1) < 20) {
    std::fprintf(stderr, fmt, a, la, b, lb, t);
    std::fprintf(stderr, " [block %u,%u,%u]\n", blockIdx.x, blockIdx.y, blockIdx.z);
  }
}

inline bool same_site(const char* f1, unsigned l1, const char* f2, unsigned l2) {
  return l1 == l2 && (f1 == f2 || std::strcmp(f1, f2) == 0);
}

struct BlockDone {
  void operator()() noexcept {
    st.progress.fetch_add(1, std::memory_order_relaxed);
    st.block_barriers.fetch_add(1, std::memory_order_relaxed);
    for (int t = 1; t < st.nthreads; ++t) {
      if (!same_site(st.bfile[0], st.bline[0], st.bfile[t], st.bline[t])) {
        error("EMU: divergent __syncthreads: thread 0 at %s:%u, another at %s:%u (thread %d)", st.bfile[0],
              st.bline[0], st.bfile[t], st.bline[t], t);
        break;
      }
    }
  }
};
struct WarpDone {
  int w = 0;
  void operator()() noexcept {
    st.progress.fetch_add(1, std::memory_order_relaxed);
    st.warp_barriers.fetch_add(1, std::memory_order_relaxed);
    for (int t = 32 * w + 1; t < 32 * w + 32; ++t) {
      if (!same_site(st.wfile[32 * w], st.wline[32 * w], st.wfile[t], st.wline[t])) {
        error("EMU: divergent warp-collective: lane 0 at %s:%u, another at %s:%u (thread %d)", st.wfile[32 * w],
              st.wline[32 * w], st.wfile[t], st.wline[t], t);
        break;
      }
    }
  }
};
inline std::unique_ptr<std::barrier<BlockDone>> block_bar;
inline std::vector<std::unique_ptr<std::barrier<WarpDone>>> warp_bars;

inline void syncthreads(const std::source_location& l) {
  const int t = threadIdx.x;
  st.bfile[t] = l.file_name();
  st.bline[t] = l.line();
  block_bar->arrive_and_wait();
}
inline void warp_sync(const std::source_location& l) {
  const int t = threadIdx.x;
  st.wfile[t] = l.file_name();
  st.wline[t] = l.line();
  warp_bars[t / 32]->arrive_and_wait();
}

// dynamic shared memory: a buffer whose end touches a PROT_NONE page (overruns fault), poisoned (0xFF: NaN in
// fp32, fp16 and bf16) before each block
inline unsigned char* smem_region(size_t bytes) {
  static unsigned char* base = nullptr;
  static const size_t kRegion = size_t(1) << 20;
  const size_t page = sysconf(_SC_PAGESIZE);
  if (base == nullptr) {
    void* p = mmap(nullptr, kRegion + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) std::abort();
    base = static_cast<unsigned char*>(p);
    mprotect(base + kRegion, page, PROT_NONE);
  }
  if (bytes > kRegion) std::abort();
  const size_t rounded = (bytes + 127) / 128 * 128;
  return base + kRegion - rounded;
}

void set_smem(unsigned char* p);  // defined after the kernel source (the kernels' extern __shared__ arrays)

struct LaunchLog {
  uint64_t launches = 0, blocks = 0;
  std::vector<std::pair<const void*, dim3>> kernels;
};
inline LaunchLog log;

template <typename... P, typename... A>
void launch_kernel(void (*kernel)(P...), dim3 grid, int threads, size_t smem, cudaStream_t, A... args) {
  if (threads % 32 != 0 || threads > kMaxThreads) std::abort();
  st.nthreads = threads;
  block_bar = std::make_unique<std::barrier<BlockDone>>(threads, BlockDone{});
  warp_bars.clear();
  for (int w = 0; w < threads / 32; ++w) warp_bars.push_back(std::make_unique<std::barrier<WarpDone>>(32, WarpDone{w}));
  unsigned char* sm = smem_region(smem);
  set_smem(sm);
  gridDim = grid;
  blockDim = dim3(threads, 1, 1);
  std::vector<uint3> blocks;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.push_back(make_uint3(x, y, z));
  std::reverse(blocks.begin(), blocks.end());  // the last block first: no reliance on the order blocks run in
  size_t next = 0;
  auto start_block = [&]() noexcept {
    blockIdx = blocks[next++];
    std::memset(sm, 0xFF, smem);
    st.progress.fetch_add(1, std::memory_order_relaxed);
  };
  std::barrier<decltype(start_block)> start(threads, start_block);
  std::atomic<int> done{0};
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      threadIdx = make_uint3(t, 0, 0);
      for (size_t i = 0; i < blocks.size(); ++i) {
        start.arrive_and_wait();
        kernel(args...);
      }
      done.fetch_add(1);
    });
  }
  // watchdog: no barrier completes for 60 s while threads remain: a deadlock
  uint64_t last = st.progress.load();
  auto since = std::chrono::steady_clock::now();
  while (done.load() < threads) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    const uint64_t now = st.progress.load();
    if (now != last) {
      last = now;
      since = std::chrono::steady_clock::now();
    } else if (std::chrono::steady_clock::now() - since > std::chrono::seconds(60)) {
      std::fprintf(stderr, "EMU: DEADLOCK in block %u,%u,%u: %d threads finished; last barrier sites:\n", blockIdx.x,
                   blockIdx.y, blockIdx.z, done.load());
      std::map<std::string, int> hist;
      for (int i = 0; i < threads; ++i)
        hist[std::string(st.bfile[i] ? st.bfile[i] : "?") + ":" + std::to_string(st.bline[i])]++;
      for (auto& [k, v] : hist) std::fprintf(stderr, "  %s x%d\n", k.c_str(), v);
      std::fflush(stderr);
      std::_Exit(3);
    }
  }
  for (auto& th : pool) th.join();
  log.kernels.push_back({reinterpret_cast<const void*>(kernel), grid});
  log.launches++;
  log.blocks += blocks.size();
  set_smem(nullptr);
}

}  // namespace emu

inline void __syncthreads(const std::source_location l = std::source_location::current()) { emu::syncthreads(l); }

template <typename V>
inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask, int width = 32,
                         const std::source_location l = std::source_location::current()) {
  static_assert(sizeof(V) <= 8);
  if (mask != 0xffffffffu || width != 32) std::abort();
  const int t = threadIdx.x;
  emu::warp_sync(l);
  std::memcpy(&emu::st.shfl[t], &v, sizeof(V));
  emu::warp_sync(l);
  V r;
  std::memcpy(&r, &emu::st.shfl[(t & ~31) | ((t & 31) ^ lane_mask)], sizeof(V));
  emu::warp_sync(l);
  return r;
}

// kernel<<<grid, block, smem, stream>>>(args...) as csrc/common.h's LINATTN_LAUNCH writes it
#define LINATTN_LAUNCH(kernel, grid, block, smem, stream)                                       \
  [=](auto... args) { ::emu::launch_kernel(kernel, dim3(grid), block, smem, stream, args...); }

// cuda_runtime.h's C++ wrappers (defined there only for nvcc)
template <typename F>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, F* entry) {
  return ::cudaFuncGetAttributes(attr, reinterpret_cast<const void*>(entry));
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F* entry, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
using std::isfinite;
