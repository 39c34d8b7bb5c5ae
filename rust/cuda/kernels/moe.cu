// Mixture-of-Experts dispatch: gather rows into expert order and combine expert outputs back.
// Compile-time: ELEM (storage type of rows), IDX_BITS (32 or 64: index dtype).

#ifndef IDX_BITS
#define IDX_BITS 64
#endif
#if IDX_BITS == 64
typedef sf_i64 idx_t;
#elif IDX_BITS == 32
typedef int idx_t;
#else
#error "IDX_BITS must be 32 or 64"
#endif

// xs[i, :] = x[token_of[i], :]; an index outside [0, rows_x) yields a zero row.
// grid (ceil(rows_out / blockDim.y)), block (threads over columns, rows per block).
extern "C" __global__ void moe_permute(const elem_t* SF_RESTRICT x, const idx_t* SF_RESTRICT token_of,
                                       elem_t* SF_RESTRICT xs, sf_i64 rows_out, sf_i64 rows_x,
                                       sf_i64 dim) {
    const sf_i64 i = (sf_i64)blockIdx.x * blockDim.y + threadIdx.y;
    if (i >= rows_out) return;
    const sf_i64 src = (sf_i64)token_of[i];
    elem_t* dst = xs + i * dim;
    if (src < 0 || src >= rows_x) {
        for (sf_i64 c = threadIdx.x; c < dim; c += blockDim.x) dst[c] = store_elem(0.0f);
        return;
    }
    const elem_t* row = x + src * dim;
    for (sf_i64 c = threadIdx.x; c < dim; c += blockDim.x) dst[c] = row[c];
}

// Same gather on 16-byte units (dim counted in units) when rows and pointers are 16-byte aligned.
extern "C" __global__ void moe_permute_v16(const uint4* SF_RESTRICT x, const idx_t* SF_RESTRICT token_of,
                                           uint4* SF_RESTRICT xs, sf_i64 rows_out, sf_i64 rows_x,
                                           sf_i64 dim) {
    const sf_i64 i = (sf_i64)blockIdx.x * blockDim.y + threadIdx.y;
    if (i >= rows_out) return;
    const sf_i64 src = (sf_i64)token_of[i];
    uint4* dst = xs + i * dim;
    if (src < 0 || src >= rows_x) {
        uint4 zero;
        zero.x = zero.y = zero.z = zero.w = 0u;
        for (sf_i64 c = threadIdx.x; c < dim; c += blockDim.x) dst[c] = zero;
        return;
    }
    const uint4* row = x + src * dim;
    for (sf_i64 c = threadIdx.x; c < dim; c += blockDim.x) dst[c] = row[c];
}

// y[t, :] = sum_s weights[t, s] * ys[pos[t, s], :], accumulated in fp32 by the one block that owns
// token t (race-free, deterministic); a position outside [0, rows_ys) is skipped (dropped slot).
// grid (tokens), block (threads over columns).
extern "C" __global__ void moe_combine(const elem_t* SF_RESTRICT ys, const idx_t* SF_RESTRICT pos,
                                       const float* SF_RESTRICT weights, elem_t* SF_RESTRICT y,
                                       sf_i64 tokens, sf_i64 top_k, sf_i64 rows_ys, sf_i64 dim) {
    const sf_i64 tok = blockIdx.x;
    if (tok >= tokens) return;
    for (sf_i64 c = threadIdx.x; c < dim; c += blockDim.x) {
        float acc = 0.0f;
        for (sf_i64 s = 0; s < top_k; ++s) {
            const sf_i64 r = (sf_i64)pos[tok * top_k + s];
            if (r < 0 || r >= rows_ys) continue;
            acc += weights[tok * top_k + s] * load_elem(ys[r * dim + c]);
        }
        y[tok * dim + c] = store_elem(acc);
    }
}
