// CPU emulation of the CUDA subset used by kernels/*.cu, force-included by g++ (-include).
//
// A launch runs the blocks of its grid one after another on the launching thread, its CUDA
// threads as fibers (coroutines with stacks of their own): every fiber loops over the blocks,
// and each barrier (`__syncthreads()`, a warp shuffle, the end of a block) hands over to the
// next fiber in thread order, so a barrier's phase is over when the last fiber arrives and
// hands back to the first: std::barrier's semantics (every thread arrives once a phase) with a
// user-space switch instead of waking OS threads, which made the barrier-heavy reductions the
// emulated tests' cost. Between barriers the fibers of a block run one after another, so
// `__shared__` can be a function-local `static` (one block at a time), and warp shuffles
// exchange values through a per-thread slot array and one barrier (kernels keep control flow
// uniform around both, as on a GPU).
#pragma once
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <math.h>
#include <memory>
#include <mutex>
#include <sys/mman.h>
#include <type_traits>
#include <vector>
#if !defined(__x86_64__) || defined(EMU_UCONTEXT)
#define EMU_UCONTEXT 1
#include <ucontext.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__
#define __restrict__
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 { unsigned x = 1, y = 1, z = 1; };
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;  // threadIdx: the running fiber's
inline unsigned long long emu_slots[2][1024];  // one shuffle slot per thread, two generations
inline thread_local unsigned emu_shuffles;     // the running fiber's shuffles done (the same in every thread)

// --- fibers: a context switch that saves the callee-saved registers on the old stack ---
#if !defined(EMU_UCONTEXT)
// emu_switch(save, to): push rbp rbx r12-r15, *save = rsp, rsp = to, pop them, return there.
// A new fiber's stack holds r12 = its entry, rbx = the entry's argument and the return address
// emu_fiber_start, which calls entry(arg) with the stack 16-byte aligned (the entry never returns).
asm(R"(
  .text
  .p2align 4
  .hidden emu_switch
  .globl emu_switch
  .type emu_switch, @function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch, .-emu_switch
  .p2align 4
  .hidden emu_fiber_start
  .globl emu_fiber_start
  .type emu_fiber_start, @function
emu_fiber_start:
  movq %rbx, %rdi
  callq *%r12
  ud2
  .size emu_fiber_start, .-emu_fiber_start
)");
extern "C" void emu_switch(void** save, void* to);
extern "C" void emu_fiber_start();
struct emu_context {
  void* sp;
  void make(char* stack, size_t size, void (*entry)(void*), void* arg) {
    auto* top = reinterpret_cast<void**>(reinterpret_cast<unsigned long>(stack + size) & ~15ul);
    void** frame = top - 7;  // r15 r14 r13 r12 rbx rbp, return address: popped by emu_switch
    frame[0] = frame[1] = frame[2] = nullptr;
    frame[3] = reinterpret_cast<void*>(entry);
    frame[4] = arg;
    frame[5] = nullptr;
    frame[6] = reinterpret_cast<void*>(&emu_fiber_start);
    sp = frame;
  }
  void switch_to(emu_context& to) { emu_switch(&sp, to.sp); }
};
#else  // elsewhere (or with -DEMU_UCONTEXT) ucontext: the same switches, a signal-mask system call each
struct emu_context {
  ucontext_t uc;
  void make(char* stack, size_t size, void (*entry)(void*), void* arg) {
    getcontext(&uc);
    uc.uc_stack.ss_sp = stack;
    uc.uc_stack.ss_size = size;
    uc.uc_link = nullptr;
    makecontext(&uc, reinterpret_cast<void (*)()>(entry), 2, unsigned(reinterpret_cast<unsigned long>(arg)),
                unsigned(reinterpret_cast<unsigned long>(arg) >> 32));
  }
  void switch_to(emu_context& to) { swapcontext(&uc, &to.uc); }
};
#endif

// A fiber's stack: 256 KiB mapped (pages are committed when touched) above a guard page, so an
// overflow faults instead of writing into the next fiber's stack. Kept for the thread's next launch.
struct emu_stack {
  static constexpr size_t guard = 4096, size = 256 * 1024;
  char* base = nullptr;
  emu_stack() {
    void* p = mmap(nullptr, guard + size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      std::fprintf(stderr, "emu: no memory for a fiber stack\n");
      std::abort();
    }
    base = static_cast<char*>(p);
    mprotect(base, guard, PROT_NONE);
  }
  emu_stack(const emu_stack&) = delete;
  ~emu_stack() { munmap(base, guard + size); }
  char* stack() const { return base + guard; }
};

struct emu_fiber {
  emu_context context;
  dim3 idx, block;  // its threadIdx and blockIdx
  unsigned shuffles = 0;
};
struct emu_block_state {  // the running launch on this thread
  std::vector<emu_fiber> fibers;
  emu_context launcher;
  unsigned current = 0;
};
inline thread_local emu_block_state emu_block;
inline thread_local std::vector<std::unique_ptr<emu_stack>> emu_stacks;  // the thread's fiber stacks, reused

// Hand over to fiber `next` (the per-thread variables go with the fiber).
inline void emu_run_fiber(unsigned next) {
  emu_fiber& me = emu_block.fibers[emu_block.current];
  me.shuffles = emu_shuffles;
  me.block = blockIdx;
  emu_fiber& to = emu_block.fibers[next];
  emu_block.current = next;
  threadIdx = to.idx;
  blockIdx = to.block;
  emu_shuffles = to.shuffles;
  me.context.switch_to(to.context);
}

// This fiber arrives at the block's barrier: the next one runs to its own arrival; the last
// fiber's arrival ends the phase, and the first one goes on.
inline void emu_arrive() { emu_run_fiber((emu_block.current + 1) % emu_block.fibers.size()); }

inline void __syncthreads() { emu_arrive(); }
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
  emu_arrive();
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

// A fiber's whole life: body() (its CUDA thread over every block), then the next fiber runs;
// the last one to finish hands back to the launcher (all have finished by then: every fiber
// arrives at the same barriers, and the last block's end is one).
template <class Body> void emu_fiber_main(void* body) {
  (*static_cast<Body*>(body))();
  unsigned me = emu_block.current, n = unsigned(emu_block.fibers.size());
  if (me + 1 < n)
    emu_run_fiber(me + 1);
  else
    emu_block.fibers[me].context.switch_to(emu_block.launcher);
  std::abort();  // a finished fiber never runs again
}
#if defined(EMU_UCONTEXT)
template <class Body> void emu_fiber_main_uc(unsigned lo, unsigned hi) {
  emu_fiber_main<Body>(reinterpret_cast<void*>((unsigned long)lo | (unsigned long)hi << 32));
}
#endif

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
  gridDim = grid;
  blockDim = block;
  auto body = [&] {
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          blockIdx = {x, y, z};
          kernel(args...);
          emu_arrive();  // the next block may reuse `__shared__` statics
        }
  };
  while (emu_stacks.size() < n) emu_stacks.push_back(std::make_unique<emu_stack>());
  emu_block.fibers.assign(n, emu_fiber{});
  for (unsigned t = 0; t < n; ++t) {
    emu_fiber& f = emu_block.fibers[t];
    f.idx = {t % block.x, t / block.x % block.y, t / (block.x * block.y)};
#if !defined(EMU_UCONTEXT)
    f.context.make(emu_stacks[t]->stack(), emu_stack::size, &emu_fiber_main<decltype(body)>, &body);
#else
    f.context.make(emu_stacks[t]->stack(), emu_stack::size,
                   reinterpret_cast<void (*)(void*)>(&emu_fiber_main_uc<decltype(body)>), &body);
#endif
  }
  emu_block.current = 0;
  threadIdx = emu_block.fibers[0].idx;
  emu_shuffles = 0;
  emu_block.launcher.switch_to(emu_block.fibers[0].context);
}
