// Tiled (flash) attention, forward and backward, on CUDA cores with fp32 accumulation.
//
// Layout: q (tokens, heads_q, HEAD_DIM), k/v (tokens, heads_kv, HEAD_DIM), contiguous, where
// tokens = batch * seqlen (fixed length) or the packed total (varlen, cu_seqlens).
// Masks: key j is visible from query i iff
//   (window_left < 0 || j >= i + off - window_left) && (window_right < 0 || j <= i + off + window_right)
// with off = len_k - len_q (bottom-right alignment); causal is window_right = 0.
// Fully masked rows give output 0 and LSE -inf. A NaN score (NaN in q, or in a visible key) makes its
// row's output and LSE NaN, as plain softmax attention does: the running max propagates NaN
// (fmaxf would drop it) and expf(NaN) = NaN does the rest. Compile-time: ELEM, HEAD_DIM, FWD_BLOCK_M,
// FWD_BLOCK_N, FWD_RPT, BWD_BLOCK_M, BWD_BLOCK_N.

#ifndef HEAD_DIM
#define HEAD_DIM 64
#endif
#ifndef FWD_BLOCK_M
#define FWD_BLOCK_M 64
#endif
#ifndef FWD_BLOCK_N
#define FWD_BLOCK_N 32
#endif
#ifndef BWD_BLOCK_M
#define BWD_BLOCK_M 32
#endif
#ifndef BWD_BLOCK_N
#define BWD_BLOCK_N 32
#endif

// Threads cooperating on one row; each owns the columns c = t + TPR * d.
#define TPR 4
// Query rows per forward thread (register tiling); the forward block has FWD_THREADS threads.
#ifndef FWD_RPT
#define FWD_RPT 1
#endif
#define FWD_GROUPS (FWD_BLOCK_M / FWD_RPT)
#define FWD_THREADS (FWD_GROUPS * TPR)
#define DPT (HEAD_DIM / TPR)
// Padded row stride of the fp32 tiles in shared memory (avoids bank conflicts on row reads).
#define ROW (HEAD_DIM + 1)

#if HEAD_DIM % TPR != 0 || FWD_BLOCK_N % TPR != 0 || BWD_BLOCK_M % TPR != 0 || BWD_BLOCK_N % TPR != 0
#error "HEAD_DIM and the tile sizes must be multiples of 4"
#endif
#if FWD_BLOCK_M % FWD_RPT != 0
#error "FWD_BLOCK_M must be a multiple of FWD_RPT"
#endif

// Must match `AttnParams` in rust/cuda/attention.rs field for field.
struct AttnParams {
    const elem_t* q;
    const elem_t* k;
    const elem_t* v;
    elem_t* out;
    float* lse;
    const int* cu_seqlens;  // null: fixed length
    const elem_t* dout;
    float* delta;  // rowsum(dout * out), laid out like lse
    elem_t* dq;
    elem_t* dk;
    elem_t* dv;
    int seqlen_q;  // fixed length only
    int seqlen_k;
    int heads_q;
    int heads_kv;
    int lse_batch_stride;
    int lse_head_stride;
    int window_left;  // -1: unbounded
    int window_right;
    float scale;
    float softcap;  // 0: off
};

struct SeqInfo {
    int q_start, k_start, len_q, len_k, lse_start;
};

SF_DEVICE SeqInfo seq_info(const AttnParams& p, int b) {
    SeqInfo s;
    if (p.cu_seqlens) {
        s.q_start = p.cu_seqlens[b];
        s.len_q = p.cu_seqlens[b + 1] - s.q_start;
        s.k_start = s.q_start;
        s.len_k = s.len_q;
        s.lse_start = s.q_start;
    } else {
        s.q_start = b * p.seqlen_q;
        s.len_q = p.seqlen_q;
        s.k_start = b * p.seqlen_k;
        s.len_k = p.seqlen_k;
        s.lse_start = 0;
    }
    return s;
}

// max(a, b) that propagates NaN from either side (fmaxf returns the other operand).
SF_DEVICE float sf_fmax_nan(float a, float b) { return (a != a || a > b) ? a : b; }

SF_DEVICE bool visible(const AttnParams& p, int i, int j, int off) {
    return (p.window_left < 0 || j >= i + off - p.window_left) &&
           (p.window_right < 0 || j <= i + off + p.window_right);
}

// Key range [lo, hi) any query row of [i0, i1) can see.
SF_DEVICE void key_range(const AttnParams& p, int i0, int i1, int len_k, int off, int* lo, int* hi) {
    *lo = p.window_left < 0 ? 0 : sf_imax(0, i0 + off - p.window_left);
    *hi = p.window_right < 0 ? len_k : sf_imin(len_k, i1 - 1 + off + p.window_right + 1);
}

// Query range [lo, hi) that can see any key of [j0, j1).
SF_DEVICE void query_range(const AttnParams& p, int j0, int j1, int len_q, int off, int* lo, int* hi) {
    *lo = p.window_right < 0 ? 0 : sf_imax(0, j0 - off - p.window_right);
    *hi = p.window_left < 0 ? len_q : sf_imin(len_q, j1 - 1 - off + p.window_left + 1);
}

SF_DEVICE sf_i64 row_offset(int token, int heads, int h) {
    return ((sf_i64)token * heads + h) * HEAD_DIM;
}

// Loads rows [r0, r0 + rows) of one head into a padded fp32 tile; rows past `len` read as 0.
SF_DEVICE void load_tile(float* tile, const elem_t* SF_RESTRICT src, int start, int r0, int rows,
                         int len, int heads, int h, int tid, int nthreads) {
    for (int idx = tid; idx < rows * HEAD_DIM; idx += nthreads) {
        int rr = idx / HEAD_DIM;
        int c = idx - rr * HEAD_DIM;
        int r = r0 + rr;
        tile[rr * ROW + c] = r < len ? load_elem(src[row_offset(start + r, heads, h) + c]) : 0.0f;
    }
}

// Scaled, soft-capped score; `th` receives tanh for the softcap derivative.
SF_DEVICE float score(const AttnParams& p, float raw, float* th) {
    float z = raw * p.scale;
    if (p.softcap > 0.0f) {
        float t = tanhf(z / p.softcap);
        *th = t;
        return p.softcap * t;
    }
    *th = 0.0f;
    return z;
}

// grid (ceil(max_len_q / FWD_BLOCK_M), heads_q, batch), block FWD_THREADS threads. Each thread owns
// FWD_RPT query rows (g + FWD_GROUPS * k), so every K/V value read from shared memory feeds
// FWD_RPT multiply-adds.
extern "C" __global__ void SF_LAUNCH_BOUNDS(FWD_THREADS) attn_fwd(AttnParams p) {
    SF_DYNAMIC_SMEM(smem);
    float* qs = smem;                           // [FWD_BLOCK_M][ROW]
    float* ks = qs + FWD_BLOCK_M * ROW;         // [FWD_BLOCK_N][ROW]
    float* vs = ks + FWD_BLOCK_N * ROW;         // [FWD_BLOCK_N][ROW]
    float* ss = vs + FWD_BLOCK_N * ROW;         // [FWD_BLOCK_M][FWD_BLOCK_N + 1]
    const int tid = threadIdx.x;
    const int g = tid / TPR;
    const int t = tid - g * TPR;
    const int b = blockIdx.z;
    const int h = blockIdx.y;
    const int hk = h / (p.heads_q / p.heads_kv);
    const SeqInfo s = seq_info(p, b);
    const int i0 = blockIdx.x * FWD_BLOCK_M;
    if (i0 >= s.len_q) return;  // whole block: no barrier is skipped by a subset
    const int i1 = sf_imin(i0 + FWD_BLOCK_M, s.len_q);
    const int off = s.len_k - s.len_q;

    load_tile(qs, p.q, s.q_start, i0, FWD_BLOCK_M, s.len_q, p.heads_q, h, tid, FWD_THREADS);

    float m[FWD_RPT], l[FWD_RPT], acc[FWD_RPT][DPT];
#pragma unroll
    for (int k = 0; k < FWD_RPT; ++k) {
        m[k] = SF_NEG_INF;
        l[k] = 0.0f;
#pragma unroll
        for (int d = 0; d < DPT; ++d) acc[k][d] = 0.0f;
    }

    int lo, hi;
    key_range(p, i0, i1, s.len_k, off, &lo, &hi);
    for (int j0 = (lo / FWD_BLOCK_N) * FWD_BLOCK_N; j0 < hi; j0 += FWD_BLOCK_N) {
        SF_SYNC();  // previous tile fully consumed (and q tile stored on the first pass)
        load_tile(ks, p.k, s.k_start, j0, FWD_BLOCK_N, s.len_k, p.heads_kv, hk, tid, FWD_THREADS);
        load_tile(vs, p.v, s.k_start, j0, FWD_BLOCK_N, s.len_k, p.heads_kv, hk, tid, FWD_THREADS);
        SF_SYNC();
        // Raw scores of this thread's rows and keys jj = t + TPR * x.
        float raw[FWD_RPT][FWD_BLOCK_N / TPR];
#pragma unroll
        for (int k = 0; k < FWD_RPT; ++k)
#pragma unroll
            for (int x = 0; x < FWD_BLOCK_N / TPR; ++x) raw[k][x] = 0.0f;
        for (int c = 0; c < HEAD_DIM; ++c) {
            float qc[FWD_RPT];
#pragma unroll
            for (int k = 0; k < FWD_RPT; ++k) qc[k] = qs[(g + FWD_GROUPS * k) * ROW + c];
#pragma unroll
            for (int x = 0; x < FWD_BLOCK_N / TPR; ++x) {
                const float kc = ks[(t + TPR * x) * ROW + c];
#pragma unroll
                for (int k = 0; k < FWD_RPT; ++k) raw[k][x] += qc[k] * kc;
            }
        }
#pragma unroll
        for (int k = 0; k < FWD_RPT; ++k) {
            const int r = g + FWD_GROUPS * k;
            const int i = i0 + r;
#pragma unroll
            for (int x = 0; x < FWD_BLOCK_N / TPR; ++x) {
                const int jj = t + TPR * x;
                const int j = j0 + jj;
                float sc = SF_NEG_INF;
                if (i < s.len_q && j < s.len_k && visible(p, i, j, off)) {
                    float th;
                    sc = score(p, raw[k][x], &th);
                }
                ss[r * (FWD_BLOCK_N + 1) + jj] = sc;
            }
        }
        SF_SYNC();
        // Online softmax: a row whose keys are all masked so far keeps m = -inf and adds nothing,
        // so -inf - -inf is never evaluated. A NaN score makes m, and so alpha, p, l and acc, NaN.
        float m_new[FWD_RPT];
#pragma unroll
        for (int k = 0; k < FWD_RPT; ++k) {
            const float* srow = ss + (g + FWD_GROUPS * k) * (FWD_BLOCK_N + 1);
            float mx = SF_NEG_INF;
            for (int jj = 0; jj < FWD_BLOCK_N; ++jj) mx = sf_fmax_nan(mx, srow[jj]);
            m_new[k] = sf_fmax_nan(m[k], mx);
            const float alpha = m_new[k] != SF_NEG_INF ? expf(m[k] - m_new[k]) : 1.0f;
            l[k] *= alpha;
#pragma unroll
            for (int d = 0; d < DPT; ++d) acc[k][d] *= alpha;
        }
        for (int jj = 0; jj < FWD_BLOCK_N; ++jj) {
            float pj[FWD_RPT];
#pragma unroll
            for (int k = 0; k < FWD_RPT; ++k) {
                const float sc = ss[(g + FWD_GROUPS * k) * (FWD_BLOCK_N + 1) + jj];
                pj[k] = m_new[k] != SF_NEG_INF ? expf(sc - m_new[k]) : 0.0f;
                l[k] += pj[k];
            }
#pragma unroll
            for (int d = 0; d < DPT; ++d) {
                const float vc = vs[jj * ROW + t + TPR * d];
#pragma unroll
                for (int k = 0; k < FWD_RPT; ++k) acc[k][d] += pj[k] * vc;
            }
        }
#pragma unroll
        for (int k = 0; k < FWD_RPT; ++k) m[k] = m_new[k];
    }
#pragma unroll
    for (int k = 0; k < FWD_RPT; ++k) {
        const int i = i0 + g + FWD_GROUPS * k;
        if (i >= s.len_q) continue;
        // l is 0 (no visible key), >= 1, or NaN (a NaN score): NaN stays NaN in out and LSE.
        const float inv = l[k] != 0.0f ? 1.0f / l[k] : 0.0f;
        elem_t* o = p.out + row_offset(s.q_start + i, p.heads_q, h);
#pragma unroll
        for (int d = 0; d < DPT; ++d) o[t + TPR * d] = store_elem(acc[k][d] * inv);
        if (t == 0) {
            p.lse[(sf_i64)b * p.lse_batch_stride + (sf_i64)h * p.lse_head_stride + s.lse_start + i] =
                l[k] != 0.0f ? m[k] + logf(l[k]) : SF_NEG_INF;
        }
    }
}

// delta = rowsum(dout * out) in fp32. grid (ceil(max_len_q / BWD_BLOCK_M), heads_q, batch),
// block BWD_BLOCK_M threads.
extern "C" __global__ void SF_LAUNCH_BOUNDS(BWD_BLOCK_M) attn_bwd_delta(AttnParams p) {
    const int b = blockIdx.z;
    const int h = blockIdx.y;
    const SeqInfo s = seq_info(p, b);
    const int i = blockIdx.x * BWD_BLOCK_M + threadIdx.x;
    if (i >= s.len_q) return;
    const sf_i64 base = row_offset(s.q_start + i, p.heads_q, h);
    float acc = 0.0f;
    for (int c = 0; c < HEAD_DIM; ++c) acc += load_elem(p.dout[base + c]) * load_elem(p.out[base + c]);
    p.delta[(sf_i64)b * p.lse_batch_stride + (sf_i64)h * p.lse_head_stride + s.lse_start + i] = acc;
}

// Probability and d(raw score) of one (query, key) pair from raw = q.k and dp = dout.v. A NaN lse
// (a row with a NaN score) gives NaN here, so NaN reaches dq, dk and dv as in the reference.
SF_DEVICE void prob_and_dscore(const AttnParams& p, float raw, float dp, float lse, float delta, float* prob,
                               float* dscore) {
    float th;
    const float z = score(p, raw, &th);
    const float pr = expf(z - lse);
    float ds = pr * (dp - delta);
    if (p.softcap > 0.0f) ds *= 1.0f - th * th;
    *prob = pr;
    *dscore = ds * p.scale;
}

// dK, dV: one block per (key tile, kv head, batch), looping over the query heads of its GQA group
// and the query tiles that see it, so no atomics are needed.
// grid (ceil(max_len_k / BWD_BLOCK_N), heads_kv, batch), block BWD_BLOCK_N * TPR threads.
extern "C" __global__ void SF_LAUNCH_BOUNDS(BWD_BLOCK_N * TPR) attn_bwd_dkv(AttnParams p) {
    SF_DYNAMIC_SMEM(smem);
    float* ks = smem;                           // [BWD_BLOCK_N][ROW]
    float* vs = ks + BWD_BLOCK_N * ROW;         // [BWD_BLOCK_N][ROW]
    float* qs = vs + BWD_BLOCK_N * ROW;         // [BWD_BLOCK_M][ROW]
    float* dos = qs + BWD_BLOCK_M * ROW;        // [BWD_BLOCK_M][ROW]
    float* ps = dos + BWD_BLOCK_M * ROW;        // [BWD_BLOCK_N][BWD_BLOCK_M + 1]
    float* dss = ps + BWD_BLOCK_N * (BWD_BLOCK_M + 1);  // [BWD_BLOCK_N][BWD_BLOCK_M + 1]
    float* lses = dss + BWD_BLOCK_N * (BWD_BLOCK_M + 1);  // [BWD_BLOCK_M]
    float* deltas = lses + BWD_BLOCK_M;                    // [BWD_BLOCK_M]
    const int nthreads = BWD_BLOCK_N * TPR;
    const int tid = threadIdx.x;
    const int r = tid / TPR;
    const int t = tid - r * TPR;
    const int b = blockIdx.z;
    const int hk = blockIdx.y;
    const int group = p.heads_q / p.heads_kv;
    const SeqInfo s = seq_info(p, b);
    const int j0 = blockIdx.x * BWD_BLOCK_N;
    if (j0 >= s.len_k) return;
    const int j1 = sf_imin(j0 + BWD_BLOCK_N, s.len_k);
    const int off = s.len_k - s.len_q;
    const int j = j0 + r;
    const bool row_valid = j < s.len_k;

    load_tile(ks, p.k, s.k_start, j0, BWD_BLOCK_N, s.len_k, p.heads_kv, hk, tid, nthreads);
    load_tile(vs, p.v, s.k_start, j0, BWD_BLOCK_N, s.len_k, p.heads_kv, hk, tid, nthreads);

    float dk[DPT], dv[DPT];
#pragma unroll
    for (int d = 0; d < DPT; ++d) {
        dk[d] = 0.0f;
        dv[d] = 0.0f;
    }
    int lo, hi;
    query_range(p, j0, j1, s.len_q, off, &lo, &hi);
    for (int g = 0; g < group; ++g) {
        const int h = hk * group + g;
        const sf_i64 lse_base = (sf_i64)b * p.lse_batch_stride + (sf_i64)h * p.lse_head_stride + s.lse_start;
        for (int i0 = (lo / BWD_BLOCK_M) * BWD_BLOCK_M; i0 < hi; i0 += BWD_BLOCK_M) {
            SF_SYNC();
            load_tile(qs, p.q, s.q_start, i0, BWD_BLOCK_M, s.len_q, p.heads_q, h, tid, nthreads);
            load_tile(dos, p.dout, s.q_start, i0, BWD_BLOCK_M, s.len_q, p.heads_q, h, tid, nthreads);
            for (int ii = tid; ii < BWD_BLOCK_M; ii += nthreads) {
                const bool ok = i0 + ii < s.len_q;
                lses[ii] = ok ? p.lse[lse_base + i0 + ii] : SF_NEG_INF;
                deltas[ii] = ok ? p.delta[lse_base + i0 + ii] : 0.0f;
            }
            SF_SYNC();
            // q.k and dout.v for this thread's queries ii = t + TPR * x; k[c], v[c] loaded once.
            float raw[BWD_BLOCK_M / TPR], dp[BWD_BLOCK_M / TPR];
#pragma unroll
            for (int x = 0; x < BWD_BLOCK_M / TPR; ++x) raw[x] = dp[x] = 0.0f;
            for (int c = 0; c < HEAD_DIM; ++c) {
                const float kc = ks[r * ROW + c];
                const float vc = vs[r * ROW + c];
#pragma unroll
                for (int x = 0; x < BWD_BLOCK_M / TPR; ++x) {
                    raw[x] += qs[(t + TPR * x) * ROW + c] * kc;
                    dp[x] += dos[(t + TPR * x) * ROW + c] * vc;
                }
            }
#pragma unroll
            for (int x = 0; x < BWD_BLOCK_M / TPR; ++x) {
                const int ii = t + TPR * x;
                const int i = i0 + ii;
                float pr = 0.0f, ds = 0.0f;
                if (row_valid && i < s.len_q && lses[ii] != SF_NEG_INF && visible(p, i, j, off)) {
                    prob_and_dscore(p, raw[x], dp[x], lses[ii], deltas[ii], &pr, &ds);
                }
                ps[r * (BWD_BLOCK_M + 1) + ii] = pr;
                dss[r * (BWD_BLOCK_M + 1) + ii] = ds;
            }
            SF_SYNC();
            for (int ii = 0; ii < BWD_BLOCK_M; ++ii) {
                const float pr = ps[r * (BWD_BLOCK_M + 1) + ii];
                const float ds = dss[r * (BWD_BLOCK_M + 1) + ii];
#pragma unroll
                for (int d = 0; d < DPT; ++d) {
                    dv[d] += pr * dos[ii * ROW + t + TPR * d];
                    dk[d] += ds * qs[ii * ROW + t + TPR * d];
                }
            }
        }
    }
    if (!row_valid) return;
    elem_t* dk_row = p.dk + row_offset(s.k_start + j, p.heads_kv, hk);
    elem_t* dv_row = p.dv + row_offset(s.k_start + j, p.heads_kv, hk);
#pragma unroll
    for (int d = 0; d < DPT; ++d) {
        dk_row[t + TPR * d] = store_elem(dk[d]);
        dv_row[t + TPR * d] = store_elem(dv[d]);
    }
}

// dQ: one block per (query tile, head, batch), looping over the key tiles it sees.
// grid (ceil(max_len_q / BWD_BLOCK_M), heads_q, batch), block BWD_BLOCK_M * TPR threads.
extern "C" __global__ void SF_LAUNCH_BOUNDS(BWD_BLOCK_M * TPR) attn_bwd_dq(AttnParams p) {
    SF_DYNAMIC_SMEM(smem);
    float* qs = smem;                           // [BWD_BLOCK_M][ROW]
    float* dos = qs + BWD_BLOCK_M * ROW;        // [BWD_BLOCK_M][ROW]
    float* ks = dos + BWD_BLOCK_M * ROW;        // [BWD_BLOCK_N][ROW]
    float* vs = ks + BWD_BLOCK_N * ROW;         // [BWD_BLOCK_N][ROW]
    float* dss = vs + BWD_BLOCK_N * ROW;        // [BWD_BLOCK_M][BWD_BLOCK_N + 1]
    const int nthreads = BWD_BLOCK_M * TPR;
    const int tid = threadIdx.x;
    const int r = tid / TPR;
    const int t = tid - r * TPR;
    const int b = blockIdx.z;
    const int h = blockIdx.y;
    const int hk = h / (p.heads_q / p.heads_kv);
    const SeqInfo s = seq_info(p, b);
    const int i0 = blockIdx.x * BWD_BLOCK_M;
    if (i0 >= s.len_q) return;
    const int i1 = sf_imin(i0 + BWD_BLOCK_M, s.len_q);
    const int off = s.len_k - s.len_q;
    const int i = i0 + r;
    const bool row_valid = i < s.len_q;
    float lse = SF_NEG_INF, delta = 0.0f;
    if (row_valid) {
        const sf_i64 li = (sf_i64)b * p.lse_batch_stride + (sf_i64)h * p.lse_head_stride + s.lse_start + i;
        lse = p.lse[li];
        delta = p.delta[li];
    }

    load_tile(qs, p.q, s.q_start, i0, BWD_BLOCK_M, s.len_q, p.heads_q, h, tid, nthreads);
    load_tile(dos, p.dout, s.q_start, i0, BWD_BLOCK_M, s.len_q, p.heads_q, h, tid, nthreads);

    float dq[DPT];
#pragma unroll
    for (int d = 0; d < DPT; ++d) dq[d] = 0.0f;
    int lo, hi;
    key_range(p, i0, i1, s.len_k, off, &lo, &hi);
    for (int j0 = (lo / BWD_BLOCK_N) * BWD_BLOCK_N; j0 < hi; j0 += BWD_BLOCK_N) {
        SF_SYNC();
        load_tile(ks, p.k, s.k_start, j0, BWD_BLOCK_N, s.len_k, p.heads_kv, hk, tid, nthreads);
        load_tile(vs, p.v, s.k_start, j0, BWD_BLOCK_N, s.len_k, p.heads_kv, hk, tid, nthreads);
        SF_SYNC();
        // q.k and dout.v for this thread's keys jj = t + TPR * x; q[c], dout[c] loaded once.
        float raw[BWD_BLOCK_N / TPR], dp[BWD_BLOCK_N / TPR];
#pragma unroll
        for (int x = 0; x < BWD_BLOCK_N / TPR; ++x) raw[x] = dp[x] = 0.0f;
        for (int c = 0; c < HEAD_DIM; ++c) {
            const float qc = qs[r * ROW + c];
            const float doc = dos[r * ROW + c];
#pragma unroll
            for (int x = 0; x < BWD_BLOCK_N / TPR; ++x) {
                raw[x] += qc * ks[(t + TPR * x) * ROW + c];
                dp[x] += doc * vs[(t + TPR * x) * ROW + c];
            }
        }
#pragma unroll
        for (int x = 0; x < BWD_BLOCK_N / TPR; ++x) {
            const int jj = t + TPR * x;
            const int j = j0 + jj;
            float pr = 0.0f, ds = 0.0f;
            if (row_valid && j < s.len_k && lse != SF_NEG_INF && visible(p, i, j, off)) {
                prob_and_dscore(p, raw[x], dp[x], lse, delta, &pr, &ds);
            }
            dss[r * (BWD_BLOCK_N + 1) + jj] = ds;
        }
        SF_SYNC();
        for (int jj = 0; jj < BWD_BLOCK_N; ++jj) {
            const float ds = dss[r * (BWD_BLOCK_N + 1) + jj];
#pragma unroll
            for (int d = 0; d < DPT; ++d) dq[d] += ds * ks[jj * ROW + t + TPR * d];
        }
    }
    if (!row_valid) return;
    elem_t* dq_row = p.dq + row_offset(s.q_start + i, p.heads_q, h);
#pragma unroll
    for (int d = 0; d < DPT; ++d) dq_row[t + TPR * d] = store_elem(dq[d]);
}
