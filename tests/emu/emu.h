// CPU emulation of the CUDA subset used by kernels/*.cu, force-included by g++ (-include).
//
// A launch runs the blocks of its grid one after another on one std::thread per CUDA thread:
// every thread loops over the blocks, and a barrier between blocks keeps them apart, so
// `__shared__` can be a function-local `static` (one block at a time). `__syncthreads()` is a
// C++20 std::barrier over the block; warp shuffles exchange values through a per-thread slot
// array and one wait on that same barrier (kernels keep control flow uniform around both).
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <math.h>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__
#define __restrict__
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 { unsigned x = 1, y = 1, z = 1; };
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;
inline std::barrier<>* emu_block_barrier;   // the running block's barrier
inline unsigned long long emu_slots[2][1024];  // one shuffle slot per thread, two generations
inline thread_local unsigned emu_shuffles;     // shuffles done: the same count in every thread

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
// round-to-nearest float arithmetic without contraction (host float ops already are: no FMA
// without -mfma)
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
template <class T> T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, sizeof f); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, sizeof u); return u; }

// bfloat16 for kernels/bf16.cuh, which leaves these to the emulator (the device converts with
// the sm_80 instruction cvt.rn.bf16.f32; here the same rounding is done in integers).
#define CRYSTAL_EMU 1
struct bf16 {
  unsigned short bits;  // the high 16 bits of a float
};
inline float bf16_to_f32(bf16 h) { return __uint_as_float((unsigned)h.bits << 16); }
// Round to nearest even on the low 16 bits: adding 0x7FFF (+1 when the kept lsb is odd) carries
// into the kept bits exactly when the dropped half is above the tie (or at it, toward even); a
// carry out of the largest finite values lands on inf, and inf stays inf. Any NaN -> 0x7FFF.
inline bf16 f32_to_bf16(float f) {
  unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{0x7fffu};
  return bf16{(unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

// Value of `v` held by lane `src` of the caller's warp (every thread of the block must call).
// Successive shuffles alternate slot generations: no thread can write generation g again before
// every thread has passed the next shuffle's wait, which each does after reading generation g.
template <class T> T emu_shuffle(T v, unsigned src) {
  static_assert(sizeof(T) <= sizeof(unsigned long long));
  unsigned tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  unsigned long long* slots = emu_slots[emu_shuffles++ & 1u];
  std::memcpy(&slots[tid], &v, sizeof v);
  __syncthreads();
  T out;
  std::memcpy(&out, &slots[(tid & ~31u) + src], sizeof out);
  return out;
}
inline unsigned emu_lane() {
  return (threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) & 31u;
}
// CUDA semantics with width w: lanes form segments of w; a source outside the caller's
// segment (down, xor) yields the caller's own value.
template <class T> T __shfl_down_sync(unsigned, T v, unsigned d, int w = 32) {
  unsigned lane = emu_lane();
  return emu_shuffle(v, lane % w + d < unsigned(w) ? lane + d : lane);
}
template <class T> T __shfl_xor_sync(unsigned, T v, int m, int w = 32) {
  unsigned lane = emu_lane(), src = lane ^ unsigned(m);
  return emu_shuffle(v, src / w <= lane / w ? src : lane);
}
template <class T> T __shfl_sync(unsigned, T v, int src, int w = 32) {
  unsigned lane = emu_lane();
  return emu_shuffle(v, lane / w * w + unsigned(src) % w);
}

// A pointer argument from ctypes, converting to whatever pointer type the kernel declares.
struct emu_ptr {
  void* p;
  template <class T> operator T*() const { return static_cast<T*>(p); }
};
// Argument kinds from crystal/backends/kernels.py must match the kernel's signature exactly.
template <class A, class P> constexpr bool emu_arg_ok = std::is_same_v<A, P>;
template <class P> constexpr bool emu_arg_ok<emu_ptr, P> = std::is_pointer_v<P>;

// Runs kernel<<<grid, block>>>(args...) to completion.
template <class... P, class... A>
void emu_launch(void (*kernel)(P...), dim3 grid, dim3 block, A... args) {
  static_assert(sizeof...(P) == sizeof...(A), "argument count differs from KERNELS");
  static_assert((emu_arg_ok<A, P> && ...), "argument kinds differ from KERNELS");
  static std::mutex one_launch_at_a_time;  // `static` shared memory and slots are global
  std::lock_guard<std::mutex> lock(one_launch_at_a_time);
  unsigned n = block.x * block.y * block.z;
  if (n == 0 || n > 1024 || n % 32 != 0 || grid.x * grid.y * grid.z == 0) {
    std::fprintf(stderr, "emu: bad launch geometry\n");
    std::abort();
  }
  std::barrier<> barrier(n);
  emu_block_barrier = &barrier;
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < n; ++t)
    threads.emplace_back([&, t] {
      gridDim = grid;
      blockDim = block;
      threadIdx = {t % block.x, t / block.x % block.y, t / (block.x * block.y)};
      emu_shuffles = 0;
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            blockIdx = {x, y, z};
            kernel(args...);
            barrier.arrive_and_wait();  // the next block may reuse `__shared__` statics
          }
    });
  for (auto& th : threads) th.join();
}
