// Weight-only quantized GEMV / skinny GEMM: y = x W^T (+ bias) for a few tokens, W stored as
// INT4 (two codes per byte, element 2j in the low nibble of byte j) or INT8 codes with one float32
// scale and zero point per (row, group): w = (q - zero) * scale. Accumulation in float32.
// Compile-time: ELEM (storage type of x and y), BITS (4 or 8).
//
// Each warp-sized slice of the block (32 threads) owns one output row and strides over it in
// 32-bit words (8 INT4 or 4 INT8 codes, one group: group sizes are multiples of the word), 16
// bytes per lane per step where the row allows it, else 4. Partial sums meet in shared memory; the first
// `tokens` threads of the slice add them up. Launch: grid (ceil(n / QG_ROWS)), block (32 * QG_ROWS),
// dynamic shared memory 32 * QG_ROWS * QG_MAX_TOKENS floats.

#ifndef BITS
#define BITS 4
#endif
#if BITS == 4
#define QG_PER_WORD 8
#elif BITS == 8
#define QG_PER_WORD 4
#else
#error "BITS must be 4 or 8"
#endif
#define QG_ROWS 8
#define QG_MAX_TOKENS 8

// acc[t] += dequantized word (codes e0 .. e0 + QG_PER_WORD of `row`) . x[t, e0 ..].
SF_DEVICE void qg_word(sf_u32 word, sf_i64 e0, sf_i64 row, const elem_t* SF_RESTRICT x,
                       const float* SF_RESTRICT scales, const float* SF_RESTRICT zeros, int tokens,
                       sf_i64 k, sf_i64 group_size, float* acc) {
    const sf_i64 groups = k / group_size;
    const sf_i64 g = e0 / group_size;
    const float s = scales[row * groups + g];
    const float z = zeros[row * groups + g];
    float q[QG_PER_WORD];
#pragma unroll
    for (int j = 0; j < QG_PER_WORD; ++j) q[j] = (float)((word >> (BITS * j)) & ((1u << BITS) - 1u)) - z;
#pragma unroll
    for (int t = 0; t < QG_MAX_TOKENS; ++t) {
        if (t < tokens) {
            const elem_t* xt = x + (sf_i64)t * k + e0;
            float dot = 0.0f;
#pragma unroll
            for (int j = 0; j < QG_PER_WORD; ++j) dot += q[j] * load_elem(xt[j]);
            acc[t] += s * dot;
        }
    }
}

// vec4 != 0: rows are read as 16-byte units (4 words per lane per step, so a warp has 512 bytes in
// flight); the launcher sets it when k is a multiple of 4 words and qweight is 16-byte aligned.
extern "C" __global__ void SF_LAUNCH_BOUNDS(256)
    quant_gemv(const elem_t* SF_RESTRICT x, const sf_u32* SF_RESTRICT qweight,
               const float* SF_RESTRICT scales, const float* SF_RESTRICT zeros,
               const float* SF_RESTRICT bias, elem_t* SF_RESTRICT y, int tokens, sf_i64 n, sf_i64 k,
               sf_i64 group_size, int vec4) {
    SF_DYNAMIC_SMEM(partial);  // [QG_ROWS][QG_MAX_TOKENS][32]
    const int lane = threadIdx.x & 31;
    const int slot = threadIdx.x >> 5;
    const sf_i64 row = (sf_i64)blockIdx.x * QG_ROWS + slot;
    float acc[QG_MAX_TOKENS];
#pragma unroll
    for (int t = 0; t < QG_MAX_TOKENS; ++t) acc[t] = 0.0f;
    if (row < n) {
        const sf_i64 words = k / QG_PER_WORD;
        if (vec4) {
            const uint4* wrow = (const uint4*)(qweight + row * words);
            for (sf_i64 vi = lane; vi < words / 4; vi += 32) {
                const uint4 v = wrow[vi];
                const sf_i64 e0 = vi * 4 * QG_PER_WORD;
                qg_word(v.x, e0, row, x, scales, zeros, tokens, k, group_size, acc);
                qg_word(v.y, e0 + QG_PER_WORD, row, x, scales, zeros, tokens, k, group_size, acc);
                qg_word(v.z, e0 + 2 * QG_PER_WORD, row, x, scales, zeros, tokens, k, group_size, acc);
                qg_word(v.w, e0 + 3 * QG_PER_WORD, row, x, scales, zeros, tokens, k, group_size, acc);
            }
        } else {
            const sf_u32* wrow = qweight + row * words;
            for (sf_i64 wi = lane; wi < words; wi += 32)
                qg_word(wrow[wi], wi * QG_PER_WORD, row, x, scales, zeros, tokens, k, group_size, acc);
        }
    }
#pragma unroll
    for (int t = 0; t < QG_MAX_TOKENS; ++t) partial[(slot * QG_MAX_TOKENS + t) * 32 + lane] = acc[t];
    SF_SYNC();
    if (row < n && lane < tokens) {
        const float* p = partial + (slot * QG_MAX_TOKENS + lane) * 32;
        float sum = 0.0f;
        for (int i = 0; i < 32; ++i) sum += p[i];
        if (bias) sum += bias[row];
        y[(sf_i64)lane * n + row] = store_elem(sum);
    }
}
