// Runs the CUDA kernels' source on a CPU, for tests on machines without a GPU: every thread of a
// block is an OS thread, __syncthreads() is a std::barrier, dynamic shared memory is a per-block
// buffer, and blocks run one after another. It checks indexing, masking, tiling and barrier
// placement, not GPU-specific behaviour (warp scheduling, memory model, PTX conversions).
// Build: g++ -std=c++20 -O1 -shared -fPIC -pthread -DELEM=.. -DHEAD_DIM=.. -DBITS=.. ... host_emulation.cpp

#define SLIMFORGE_HOST_EMULATION 1
#include <barrier>
#include <cmath>
#include <cstring>
#include <functional>
#include <math.h>
#include <thread>
#include <vector>

typedef unsigned short sf_u16;
typedef unsigned int sf_u32;
typedef long long sf_i64;
#define SF_DEVICE static inline
#define SF_RESTRICT __restrict
#define __global__
#define __device__
#define __forceinline__ inline

struct dim3 {
    unsigned x, y, z;
};
struct uint4 {
    unsigned x, y, z, w;
};

static thread_local dim3 threadIdx;
static thread_local dim3 blockIdx;
static dim3 blockDim;
static dim3 gridDim;
static thread_local float* emu_smem;
static thread_local long emu_sync_count;
static std::barrier<>* emu_barrier;

static inline void emu_sync() {
    ++emu_sync_count;
    emu_barrier->arrive_and_wait();
}
#define SF_DYNAMIC_SMEM(name) float* name = emu_smem
#define SF_SYNC() emu_sync()
#define SF_LAUNCH_BOUNDS(n)

static inline float sf_bits_to_float(sf_u32 u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
static inline sf_u32 sf_float_to_bits(float f) {
    sf_u32 u;
    std::memcpy(&u, &f, 4);
    return u;
}
static inline float sf_half_to_float(sf_u16 h) {
    _Float16 x;
    std::memcpy(&x, &h, 2);
    return (float)x;
}
static inline sf_u16 sf_float_to_half(float f) {
    _Float16 x = (_Float16)f;
    sf_u16 h;
    std::memcpy(&h, &x, 2);
    return h;
}

#include "../kernels/common.cuh"
#include "../kernels/attention.cu"
#include "../kernels/moe.cu"
#include "../kernels/quant.cu"

// Runs `body` over the grid; returns 0, or 1 if threads of a block disagreed on barrier counts.
static int run_grid(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
    gridDim = grid;
    blockDim = block;
    const unsigned nthreads = block.x * block.y * block.z;
    std::vector<float> smem(smem_bytes / sizeof(float) + 1);
    int status = 0;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                // Poison shared memory so reads of unwritten tiles show up as NaN.
                std::fill(smem.begin(), smem.end(), std::nanf(""));
                std::barrier<> barrier(nthreads);
                emu_barrier = &barrier;
                std::vector<long> counts(nthreads, 0);
                std::vector<std::thread> threads;
                threads.reserve(nthreads);
                for (unsigned tz = 0; tz < block.z; ++tz)
                    for (unsigned ty = 0; ty < block.y; ++ty)
                        for (unsigned tx = 0; tx < block.x; ++tx) {
                            const unsigned linear = (tz * block.y + ty) * block.x + tx;
                            threads.emplace_back([&, tx, ty, tz, bx, by, bz, linear] {
                                threadIdx = dim3{tx, ty, tz};
                                blockIdx = dim3{bx, by, bz};
                                emu_smem = smem.data();
                                emu_sync_count = 0;
                                body();
                                counts[linear] = emu_sync_count;
                                barrier.arrive_and_drop();
                            });
                        }
                for (auto& t : threads) t.join();
                for (unsigned i = 1; i < nthreads; ++i)
                    if (counts[i] != counts[0]) status = 1;
            }
    return status;
}

extern "C" int emu_attention(const char* kernel, const AttnParams* p, unsigned gx, unsigned gy, unsigned gz,
                             unsigned bx, size_t smem_bytes) {
    const AttnParams params = *p;
    void (*fn)(AttnParams) = nullptr;
    if (!std::strcmp(kernel, "attn_fwd")) fn = attn_fwd;
    if (!std::strcmp(kernel, "attn_bwd_delta")) fn = attn_bwd_delta;
    if (!std::strcmp(kernel, "attn_bwd_dkv")) fn = attn_bwd_dkv;
    if (!std::strcmp(kernel, "attn_bwd_dq")) fn = attn_bwd_dq;
    if (!fn) return 2;
    return run_grid(dim3{gx, gy, gz}, dim3{bx, 1, 1}, smem_bytes, [&] { fn(params); });
}

extern "C" int emu_moe_permute(int vec16, const void* x, const void* token_of, void* xs, sf_i64 rows_out,
                               sf_i64 rows_x, sf_i64 dim, unsigned gx, unsigned bx, unsigned by) {
    return run_grid(dim3{gx, 1, 1}, dim3{bx, by, 1}, 0, [&] {
        if (vec16)
            moe_permute_v16((const uint4*)x, (const idx_t*)token_of, (uint4*)xs, rows_out, rows_x, dim);
        else
            moe_permute((const elem_t*)x, (const idx_t*)token_of, (elem_t*)xs, rows_out, rows_x, dim);
    });
}

extern "C" int emu_moe_combine(const void* ys, const void* pos, const float* weights, void* y, sf_i64 tokens,
                               sf_i64 top_k, sf_i64 rows_ys, sf_i64 dim, unsigned gx, unsigned bx) {
    return run_grid(dim3{gx, 1, 1}, dim3{bx, 1, 1}, 0, [&] {
        moe_combine((const elem_t*)ys, (const idx_t*)pos, weights, (elem_t*)y, tokens, top_k, rows_ys, dim);
    });
}

extern "C" int emu_quant_gemv(const void* x, const void* qweight, const float* scales, const float* zeros,
                              const float* bias, void* y, int tokens, sf_i64 n, sf_i64 k, sf_i64 group_size,
                              int vec4, unsigned gx, unsigned bx, size_t smem_bytes) {
    return run_grid(dim3{gx, 1, 1}, dim3{bx, 1, 1}, smem_bytes, [&] {
        quant_gemv((const elem_t*)x, (const sf_u32*)qweight, scales, zeros, bias, (elem_t*)y, tokens, n, k,
                   group_size, vec4);
    });
}
