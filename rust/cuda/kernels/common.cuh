// Shared helpers for slimforge's NVRTC kernels. No system headers: NVRTC has none, so element
// conversions are written out (bf16 by bit manipulation, fp16 by PTX cvt).
// The same source also compiles as host C++ (SLIMFORGE_HOST_EMULATION) so the tests can run the
// kernels' logic on a CPU without a GPU.

#ifndef SLIMFORGE_HOST_EMULATION
typedef unsigned short sf_u16;
typedef unsigned int sf_u32;
typedef long long sf_i64;
#define SF_DEVICE __device__ __forceinline__
#define SF_RESTRICT __restrict__
#define SF_DYNAMIC_SMEM(name) extern __shared__ float name[]
#define SF_SYNC() __syncthreads()
// Caps registers so a block of `n` threads always fits on an SM.
#define SF_LAUNCH_BOUNDS(n) __launch_bounds__(n)
SF_DEVICE float sf_bits_to_float(sf_u32 u) { return __uint_as_float(u); }
SF_DEVICE sf_u32 sf_float_to_bits(float f) { return __float_as_uint(f); }
SF_DEVICE float sf_half_to_float(sf_u16 h) {
    float f;
    asm("{ cvt.f32.f16 %0, %1; }" : "=f"(f) : "h"(h));
    return f;
}
SF_DEVICE sf_u16 sf_float_to_half(float f) {
    sf_u16 h;
    asm("{ cvt.rn.f16.f32 %0, %1; }" : "=h"(h) : "f"(f));
    return h;
}
#endif

// -inf without the INFINITY macro (absent under NVRTC).
#define SF_NEG_INF sf_bits_to_float(0xff800000u)

SF_DEVICE int sf_imin(int a, int b) { return a < b ? a : b; }
SF_DEVICE int sf_imax(int a, int b) { return a > b ? a : b; }

SF_DEVICE float sf_bf16_to_float(sf_u16 x) { return sf_bits_to_float(((sf_u32)x) << 16); }
SF_DEVICE sf_u16 sf_float_to_bf16(float f) {
    sf_u32 u = sf_float_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (sf_u16)((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return (sf_u16)(u >> 16);
}

// ELEM selects the storage type of activations: 0 = float32, 1 = bfloat16, 2 = float16.
#ifndef ELEM
#define ELEM 0
#endif
#if ELEM == 0
typedef float elem_t;
SF_DEVICE float load_elem(elem_t x) { return x; }
SF_DEVICE elem_t store_elem(float x) { return x; }
#elif ELEM == 1
typedef sf_u16 elem_t;
SF_DEVICE float load_elem(elem_t x) { return sf_bf16_to_float(x); }
SF_DEVICE elem_t store_elem(float x) { return sf_float_to_bf16(x); }
#elif ELEM == 2
typedef sf_u16 elem_t;
SF_DEVICE float load_elem(elem_t x) { return sf_half_to_float(x); }
SF_DEVICE elem_t store_elem(float x) { return sf_float_to_half(x); }
#else
#error "ELEM must be 0 (float32), 1 (bfloat16) or 2 (float16)"
#endif
