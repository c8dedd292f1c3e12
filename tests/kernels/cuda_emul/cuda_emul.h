// A stand-in for CUDA that lets a kernel's CUDA C source compile as C++20 (g++ -std=c++20
// -pthread) and run on the CPU: tests/kernels/cuda_emul.py builds each kernel of
// handgrad/kernels/cuda_sources.py, unmodified, with this header in front and launches it
// on NumPy buffers.
//
// Execution model. A launch runs the grid's blocks one after another. Each CUDA thread of a
// block is one std::thread (created once per launch and reused by every block), so
// __syncthreads() is a std::barrier over the block's threads and a warp's shuffles meet at a
// per-warp std::barrier and exchange buffer. Because one block runs at a time, `__shared__`
// is `static`: the kernel's shared arrays are one per block, shared by its threads (their
// contents at a block's start are whatever the previous block left, as undefined as on a GPU).
// A thread that returns early leaves its block's barriers (arrive_and_drop), as exited
// threads do on sm_70+. Denormals are flushed (MXCSR FTZ | DAZ in each thread), as NVRTC's
// -ftz=true does for float32 (here float64 is flushed too).
//
// Checked, and reported as a launch error instead of undefined behaviour: a shuffle that reads
// a lane which did not take part in it, a warp mask other than the warp's lanes (masks of part
// of a warp are not emulated), threads of a block waiting at different __syncthreads() calls,
// launch dimensions CUDA refuses (a zero grid among them), dynamic shared memory (not
// emulated), and a launch that deadlocks (it returns after a timeout, leaving its threads).
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

// ---- qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __shared__ static  // one block at a time: see above
#define __launch_bounds__(...)
// __restrict__ is a g++ keyword already.

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
using uint3 = dim3;

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;
constexpr int warpSize = 32;

// ---- math: <cmath> gives expf, logf, tanhf, sqrtf, fmaxf, fminf, sqrt ... in the global
// namespace; CUDA's min/max take mixed integer types too.
template <class A, class B>
inline auto min(A a, B b) {
    using T = std::common_type_t<A, B>;
    return T(a) < T(b) ? T(a) : T(b);
}
template <class A, class B>
inline auto max(A a, B b) {
    using T = std::common_type_t<A, B>;
    return T(a) < T(b) ? T(b) : T(a);
}
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanhf(float x) { return tanhf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __saturatef(float x) { return x > 1.0f ? 1.0f : (x >= 0.0f ? x : 0.0f); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __int_as_float(int i) { return std::bit_cast<float>(i); }
inline int __float_as_int(float f) { return std::bit_cast<int>(f); }
inline float __uint_as_float(unsigned u) { return std::bit_cast<float>(u); }
inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
inline double __longlong_as_double(long long i) { return std::bit_cast<double>(i); }
inline long long __double_as_longlong(double d) { return std::bit_cast<long long>(d); }
template <class T>
inline T __ldg(const T* p) { return *p; }

// ---- bfloat16: 16 raw bits, float -> bf16 rounds to nearest even (NaN -> 0x7fff)
struct __nv_bfloat16 {
    unsigned short __x = 0;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f);  // NOLINT: implicit, as cuda_bf16.h's
    operator float() const { return std::bit_cast<float>((unsigned)__x << 16); }
};
inline __nv_bfloat16 __float2bfloat16(float f) {
    unsigned u = std::bit_cast<unsigned>(f);
    __nv_bfloat16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.__x = 0x7fffu;
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);
        r.__x = (unsigned short)(u >> 16);
    }
    return r;
}
inline __nv_bfloat16::__nv_bfloat16(float f) : __x(__float2bfloat16(f).__x) {}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return (float)b; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) {
    __nv_bfloat16 r;
    r.__x = u;
    return r;
}
struct __nv_bfloat162 {
    __nv_bfloat16 x, y;
};

namespace hg {

void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// ---- one launch's shared state
struct Warp {
    std::optional<std::barrier<>> bar;
    unsigned lanes = 0;              // lanes that exist in this warp (bit i: lane i)
    // The exchange buffer, two of them used in turn: a lane can write the next exchange's
    // entry while another still reads this one's (it cannot get two exchanges ahead: the
    // next exchange's barrier waits for the reader).
    unsigned long long buf[2][32] = {};
    unsigned long long seq[2][32] = {};  // which exchange of its lane each entry is from
};

struct SyncCheck {
    void operator()() noexcept;
};

struct Launch {
    dim3 grid, block;
    unsigned nthreads = 0, nwarps = 0;
    unsigned long long nblocks = 0, current = 0;  // the block being run
    std::optional<std::barrier<SyncCheck>> sync;   // __syncthreads
    std::vector<Warp> warps;
    std::vector<long long> syncs;    // per thread: __syncthreads() calls in this block
    std::vector<const void*> sites;  // per thread: where it calls __syncthreads() from
    std::vector<char> exited;        // per thread, in this block
    std::atomic<bool> failed{false};
    std::mutex msg_mutex;
    std::string msg;
    void begin_block();
};

inline thread_local Launch* tl_launch = nullptr;
inline thread_local unsigned tl_tid = 0;
inline thread_local unsigned long long tl_shuffles = 0;

inline void fail(const char* fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    Launch* l = tl_launch;
    if (!l) return;
    std::lock_guard<std::mutex> g(l->msg_mutex);
    if (!l->failed.exchange(true)) {
        char where[128];
        snprintf(where, sizeof where, "block (%u, %u, %u) thread (%u, %u, %u): ", blockIdx.x,
                 blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
        l->msg = std::string(where) + buf;
    }
}

// Runs with every live thread of the block waiting at __syncthreads(): as CUDA requires,
// they must all wait at the same call, as many times (no divergent __syncthreads).
inline void SyncCheck::operator()() noexcept {
    Launch* l = tl_launch;
    long long first = -1;
    for (unsigned t = 0; t < l->nthreads; ++t) {
        if (l->exited[t]) continue;
        if (first < 0) first = t;
        if (l->syncs[t] == l->syncs[first] && l->sites[t] == l->sites[first]) continue;
        if (!l->failed.exchange(true)) {
            std::lock_guard<std::mutex> g(l->msg_mutex);
            l->msg = "divergent __syncthreads(): threads " + std::to_string(first) + " and " +
                     std::to_string(t) + " wait at different calls (their calls " +
                     std::to_string(l->syncs[first]) + " and " + std::to_string(l->syncs[t]) +
                     ")";
        }
        break;
    }
}

inline void Launch::begin_block() {
    unsigned long long b = current;
    (void)b;
    sync.emplace(nthreads);
    for (unsigned w = 0; w < nwarps; ++w) {
        unsigned n = std::min(32u, nthreads - 32 * w);
        warps[w].bar.emplace(n);
        warps[w].lanes = n == 32 ? 0xffffffffu : ((1u << n) - 1);
        std::memset(warps[w].seq, 0, sizeof warps[w].seq);
    }
    std::fill(syncs.begin(), syncs.end(), 0);
    std::fill(sites.begin(), sites.end(), nullptr);
    std::fill(exited.begin(), exited.end(), 0);
}

inline Warp& my_warp() { return tl_launch->warps[tl_tid >> 5]; }

// Every lane of the warp takes part in a warp function here (the kernels use full masks):
// a mask of part of a warp would need the lanes outside it to go on, which one barrier per
// warp cannot give, so it is refused rather than left to deadlock.
inline void check_mask(const Warp& w, unsigned mask) {
    if (mask & ~w.lanes)
        fail("warp mask 0x%08x names lanes outside the block (0x%08x)", mask, w.lanes);
    else if (mask != w.lanes)
        fail("warp mask 0x%08x is part of the warp (0x%08x): not emulated", mask, w.lanes);
}

// All lanes of the warp take part: each writes its value, they meet, each reads.
template <class T, class Pick>
inline T exchange(unsigned mask, T v, Pick pick) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
    Warp& w = my_warp();
    const unsigned lane = tl_tid & 31;
    check_mask(w, mask);
    const unsigned long long seq = ++tl_shuffles;
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    const unsigned k = seq & 1;
    w.buf[k][lane] = bits;
    w.seq[k][lane] = seq;
    w.bar->arrive_and_wait();
    int src = pick(lane);
    T r = v;
    if (src >= 0 && src != (int)lane) {
        if (!(mask & (1u << src)) || w.seq[k][src] != seq)
            fail("lane %u reads lane %d, which did not take part in this warp function", lane,
                 src);
        std::memcpy(&r, &w.buf[k][src], sizeof(T));
    }
    return r;
}

}  // namespace hg

// ---- block and warp synchronisation
// Not inlined, so that its return address names the call (an inlined __device__ function
// calling it gives one call per place it is inlined into).
__attribute__((noinline)) inline void __syncthreads() {
    hg::Launch* l = hg::tl_launch;
    ++l->syncs[hg::tl_tid];
    l->sites[hg::tl_tid] = __builtin_return_address(0);
    l->sync->arrive_and_wait();
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    hg::exchange(mask, 0, [](unsigned) { return -1; });
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    return hg::exchange(mask, v, [=](unsigned lane) {
        return (int)(lane & ~(unsigned)(width - 1)) + (src & (width - 1));
    });
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return hg::exchange(mask, v, [=](unsigned lane) {
        const int s = (int)lane ^ lane_mask;  // a later group of `width` lanes: own value
        return (s & ~(width - 1)) > (int)(lane & ~(unsigned)(width - 1)) ? -1 : s;
    });
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return hg::exchange(mask, v, [=](unsigned lane) {
        return (int)(lane % width + delta) < width ? (int)(lane + delta) : -1;
    });
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return hg::exchange(mask, v, [=](unsigned lane) {
        return (int)(lane % width) >= (int)delta ? (int)(lane - delta) : -1;
    });
}
// The votes: every lane of the mask publishes its predicate, then each reads them all.
inline unsigned __ballot_sync(unsigned mask, int pred) {
    hg::Warp& w = hg::my_warp();
    const unsigned lane = hg::tl_tid & 31;
    hg::check_mask(w, mask);
    const unsigned long long seq = ++hg::tl_shuffles;
    const unsigned k = seq & 1;
    w.buf[k][lane] = pred != 0;
    w.seq[k][lane] = seq;
    w.bar->arrive_and_wait();
    unsigned r = 0;
    for (unsigned s = 0; s < 32; ++s) {
        if (!(mask & (1u << s))) continue;
        if (w.seq[k][s] != seq) hg::fail("lane %u is in the vote's mask but did not vote", s);
        if (w.buf[k][s]) r |= 1u << s;
    }
    return r;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }

// ---- atomics (they return the old value)
template <class T>
inline T atomicAdd(T* p, T v) {
    return std::atomic_ref<T>(*p).fetch_add(v);
}
template <class T>
inline T atomicSub(T* p, T v) {
    return std::atomic_ref<T>(*p).fetch_sub(v);
}
template <class T>
inline T atomicExch(T* p, T v) {
    return std::atomic_ref<T>(*p).exchange(v);
}
template <class T>
inline T atomicCAS(T* p, T expected, T desired) {
    std::atomic_ref<T>(*p).compare_exchange_strong(expected, desired);
    return expected;
}
template <class T>
inline T atomicMax(T* p, T v) {
    std::atomic_ref<T> a(*p);
    T old = a.load();
    while (old < v && !a.compare_exchange_weak(old, v)) {
    }
    return old;
}
template <class T>
inline T atomicMin(T* p, T v) {
    std::atomic_ref<T> a(*p);
    T old = a.load();
    while (v < old && !a.compare_exchange_weak(old, v)) {
    }
    return old;
}

// ---- the launch
namespace hg {

inline void flush_denormals() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_setcsr(_mm_getcsr() | 0x8040);  // FTZ (bit 15) and DAZ (bit 6)
#endif
}

inline int flushes_denormals() {
#if defined(__x86_64__) || defined(__i386__)
    return 1;
#else
    return 0;
#endif
}

inline int set_error(char* err, int errlen, const std::string& msg) {
    std::snprintf(err, (size_t)errlen, "%s", msg.c_str());
    return 1;
}

// Runs `body()` (the kernel, its arguments bound) over the grid; 0, or 1 with `err` filled.
template <class Body>
int run_grid(const unsigned* g, const unsigned* b, unsigned shared_mem, double timeout_s,
             char* err, int errlen, Body body) {
    static std::mutex one_launch_at_a_time;  // the `static` shared arrays are per process
    const dim3 grid{g[0], g[1], g[2]}, block{b[0], b[1], b[2]};
    char why[256] = "";
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x == 0 || block.y == 0 ||
        block.z == 0)
        std::snprintf(why, sizeof why, "a zero dimension");
    else if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
        std::snprintf(why, sizeof why, "grid beyond (2^31 - 1, 65535, 65535)");
    else if (block.x > 1024 || block.y > 1024 || block.z > 64 ||
             (unsigned long long)block.x * block.y * block.z > 1024)
        std::snprintf(why, sizeof why, "more than 1,024 threads in a block");
    else if (shared_mem > 0)
        std::snprintf(why, sizeof why, "dynamic shared memory (not emulated)");
    if (why[0]) {
        std::string m = "invalid configuration argument: grid (" + std::to_string(grid.x) + ", " +
                        std::to_string(grid.y) + ", " + std::to_string(grid.z) + "), block (" +
                        std::to_string(block.x) + ", " + std::to_string(block.y) + ", " +
                        std::to_string(block.z) + "): " + why;
        return set_error(err, errlen, m);
    }
    std::lock_guard<std::mutex> lock(one_launch_at_a_time);
    // Leaked on purpose if the launch deadlocks: its threads still wait on its barriers.
    auto* L = new Launch;
    L->grid = grid;
    L->block = block;
    L->nthreads = block.x * block.y * block.z;
    L->nwarps = (L->nthreads + 31) / 32;
    L->nblocks = (unsigned long long)grid.x * grid.y * grid.z;
    L->warps = std::vector<Warp>(L->nwarps);
    L->syncs.assign(L->nthreads, 0);
    L->sites.assign(L->nthreads, nullptr);
    L->exited.assign(L->nthreads, 0);
    L->begin_block();

    struct Done {
        std::mutex m;
        std::condition_variable cv;
        unsigned finished = 0;
    };
    auto done = std::make_shared<Done>();
    // Every thread meets here after each block; the completion step starts the next one.
    struct NextBlock {
        Launch* l;
        void operator()() noexcept {
            ++l->current;
            if (l->current < l->nblocks) l->begin_block();
        }
    };
    auto* end = new std::barrier<NextBlock>(L->nthreads, NextBlock{L});

    auto thread_main = [L, end, done, body](unsigned tid) {
        flush_denormals();
        tl_launch = L;
        tl_tid = tid;
        threadIdx = {tid % L->block.x, (tid / L->block.x) % L->block.y,
                     tid / (L->block.x * L->block.y)};
        blockDim = L->block;
        gridDim = L->grid;
        for (;;) {  // the loop's test is read after the barrier, where every thread sees it
            const unsigned long long c = L->current;
            blockIdx = {(unsigned)(c % L->grid.x), (unsigned)((c / L->grid.x) % L->grid.y),
                        (unsigned)(c / ((unsigned long long)L->grid.x * L->grid.y))};
            tl_shuffles = 0;
            body();
            // This thread has exited: its block's barriers no longer wait for it.
            L->exited[tid] = 1;
            L->sync->arrive_and_drop();
            L->warps[tid >> 5].bar->arrive_and_drop();
            end->arrive_and_wait();
            if (L->current >= L->nblocks || L->failed.load()) break;
        }
        std::lock_guard<std::mutex> g(done->m);
        ++done->finished;
        done->cv.notify_all();
    };
    std::vector<std::thread> threads;
    threads.reserve(L->nthreads);
    try {
        for (unsigned t = 0; t < L->nthreads; ++t) threads.emplace_back(thread_main, t);
    } catch (const std::exception& e) {
        // The threads started wait at barriers that can never fill: leave them.
        for (auto& t : threads) t.detach();
        return set_error(err, errlen, std::string("could not start the block's threads: ") +
                                          e.what());
    }
    bool ok;
    {
        std::unique_lock<std::mutex> g(done->m);
        ok = done->cv.wait_for(g, std::chrono::duration<double>(timeout_s),
                               [&] { return done->finished == L->nthreads; });
    }
    if (!ok) {
        for (auto& t : threads) t.detach();
        char m[256];
        std::snprintf(m, sizeof m,
                      "deadlock: the launch did not finish in %.0f s (block %llu of %llu); "
                      "its threads are left waiting",
                      timeout_s, L->current, L->nblocks);
        return set_error(err, errlen, L->failed.load() ? L->msg + "; then " + m : m);
    }
    for (auto& t : threads) t.join();
    int rc = 0;
    if (L->failed.load()) rc = set_error(err, errlen, L->msg);
    delete end;
    delete L;
    return rc;
}

// ---- the kernel's parameters, as the Python driver checks them: "*f4" (float*), "i8" ...
template <class T>
std::string type_code() {
    using U = std::remove_cv_t<T>;
    if constexpr (std::is_pointer_v<U>) {
        return "*" + type_code<std::remove_pointer_t<U>>();
    } else {
        const char kind = std::is_same_v<U, bool>         ? 'b'
                          : std::is_floating_point_v<U>   ? 'f'
                          : std::is_same_v<U, __nv_bfloat16> ? 'E'
                          : std::is_signed_v<U>           ? 'i'
                          : std::is_unsigned_v<U>         ? 'u'
                                                          : 'V';
        return std::string(1, kind) + std::to_string(sizeof(U));
    }
}

template <class... P>
std::string signature(void (*)(P...)) {
    std::string s;
    ((s += (s.empty() ? "" : ",") + type_code<P>()), ...);
    return s;
}

// cuLaunchKernel's convention: args[i] points at the value of parameter i.
template <class... P, std::size_t... I>
int launch_packed(void (*kernel)(P...), std::index_sequence<I...>, const unsigned* grid,
                  const unsigned* block, unsigned shared_mem, void** args, double timeout_s,
                  char* err, int errlen) {
    std::tuple<std::remove_cv_t<P>...> values;
    ((std::memcpy(&std::get<I>(values), args[I], sizeof(P))), ...);
    return run_grid(grid, block, shared_mem, timeout_s, err, errlen,
                    [kernel, values] { std::apply(kernel, values); });
}

template <class... P>
int launch(void (*kernel)(P...), const unsigned* grid, const unsigned* block,
           unsigned shared_mem, void** args, double timeout_s, char* err, int errlen) {
    return launch_packed(kernel, std::index_sequence_for<P...>{}, grid, block, shared_mem, args,
                         timeout_s, err, errlen);
}

}  // namespace hg

extern "C" int hg_flushes_denormals() { return hg::flushes_denormals(); }

// The entry points of kernel FN (its source wrapped in a namespace, so that several kernels
// with the same helpers build into one library): hg_launch_NAME, hg_signature_NAME.
#define HG_EXPORT_KERNEL(FN, NAME)                                                         \
    extern "C" int hg_launch_##NAME(const unsigned* grid, const unsigned* block,            \
                                    unsigned shared_mem, void** args, double timeout_s,     \
                                    char* err, int errlen) {                                \
        return hg::launch(FN, grid, block, shared_mem, args, timeout_s, err, errlen);      \
    }                                                                                      \
    extern "C" const char* hg_signature_##NAME() {                                         \
        static const std::string s = hg::signature(FN);                                    \
        return s.c_str();                                                                  \
    }
