//! Launchers for the flash-attention kernels (kernels/attention.cu).

use std::ffi::c_void;

use super::device::{self, Launch};
use super::kernels;
use super::{guarded, ElemType};
use crate::error::{Error, Result};

/// Kernel argument block; must match `struct AttnParams` in kernels/attention.cu field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct AttnParams {
    q: u64,
    k: u64,
    v: u64,
    out: u64,
    lse: u64,
    cu_seqlens: u64,
    dout: u64,
    delta: u64,
    dq: u64,
    dk: u64,
    dv: u64,
    seqlen_q: i32,
    seqlen_k: i32,
    heads_q: i32,
    heads_kv: i32,
    lse_batch_stride: i32,
    lse_head_stride: i32,
    window_left: i32,
    window_right: i32,
    scale: f32,
    softcap: f32,
}

/// Tile sizes baked into one compiled attention module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AttnConfig {
    pub fwd_m: usize,
    pub fwd_n: usize,
    /// Query rows per forward thread (register tiling).
    pub fwd_rpt: usize,
    pub bwd_m: usize,
    pub bwd_n: usize,
}

const TPR: usize = 4;

fn fwd_smem(d: usize, m: usize, n: usize) -> usize {
    4 * (m * (d + 1) + 2 * n * (d + 1) + m * (n + 1))
}

fn dkv_smem(d: usize, m: usize, n: usize) -> usize {
    4 * (2 * n * (d + 1) + 2 * m * (d + 1) + 2 * n * (m + 1) + 2 * m)
}

fn dq_smem(d: usize, m: usize, n: usize) -> usize {
    4 * (2 * m * (d + 1) + 2 * n * (d + 1) + m * (n + 1))
}

impl AttnConfig {
    /// Largest tiles for `head_dim` whose shared memory fits in `smem_limit` bytes.
    pub(crate) fn choose(head_dim: usize, smem_limit: usize) -> Result<Self> {
        // Two rows per thread double the reuse of each shared-memory read; at head_dim 256 the
        // accumulators would no longer fit in registers.
        let fwd_rpt = if head_dim <= 128 { 2 } else { 1 };
        let fwd_tiles: &[(usize, usize)] = if head_dim <= 64 {
            &[(128, 64), (64, 64), (32, 32), (16, 16)]
        } else if head_dim <= 128 {
            &[(64, 32), (32, 32), (16, 16)]
        } else {
            &[(32, 32), (16, 32), (16, 16)]
        };
        let bwd_tiles: &[(usize, usize)] = &[(32, 32), (16, 32), (16, 16)];
        let fwd = fwd_tiles
            .iter()
            .find(|&&(m, n)| fwd_smem(head_dim, m, n) <= smem_limit);
        let bwd = bwd_tiles
            .iter()
            .find(|&&(m, n)| dkv_smem(head_dim, m, n).max(dq_smem(head_dim, m, n)) <= smem_limit);
        match (fwd, bwd) {
            (Some(&(fwd_m, fwd_n)), Some(&(bwd_m, bwd_n))) => Ok(AttnConfig {
                fwd_m,
                fwd_n,
                fwd_rpt,
                bwd_m,
                bwd_n,
            }),
            _ => Err(Error::value(format!(
                "head_dim {head_dim} needs more shared memory than this GPU offers ({smem_limit} bytes per block)"
            ))),
        }
    }

    pub(crate) fn fwd_threads(&self) -> usize {
        self.fwd_m / self.fwd_rpt * TPR
    }
}

/// One attention call: shapes, mask and the raw device pointers of caller-owned tensors.
///
/// q `(batch * seqlen_q, heads_q, head_dim)`, k/v `(batch * seqlen_k, heads_kv, head_dim)`, all
/// contiguous (for varlen: `(total, heads, head_dim)` with `cu_seqlens` int32 `(batch + 1,)`, and
/// seqlen_q = seqlen_k = total). lse/delta float32 `(batch, heads_q, seqlen_q)`, or `(heads_q, total)`
/// for varlen. Pointers not used by a pass may be 0.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttnCall {
    pub device: usize,
    pub stream: u64,
    pub batch: usize,
    pub seqlen_q: usize,
    pub seqlen_k: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub head_dim: usize,
    /// Longest sequence (varlen; ignored otherwise).
    pub max_seqlen: usize,
    pub causal: bool,
    /// -1: unbounded.
    pub window_left: i64,
    pub window_right: i64,
    pub softmax_scale: f32,
    /// 0: off.
    pub softcap: f32,
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub out: u64,
    pub lse: u64,
    pub cu_seqlens: u64,
    pub dout: u64,
    pub delta: u64,
    pub dq: u64,
    pub dk: u64,
    pub dv: u64,
}

fn to_i32(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::value(format!("{what} = {v} exceeds the int32 range")))
}

impl AttnCall {
    fn validate(&self) -> Result<()> {
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(8) || self.head_dim > 256 {
            return Err(Error::value(format!(
                "head_dim must be a multiple of 8 in [8, 256], got {}",
                self.head_dim
            )));
        }
        if self.heads_q == 0 || self.heads_kv == 0 || !self.heads_q.is_multiple_of(self.heads_kv) {
            return Err(Error::value(format!(
                "heads_q ({}) must be a positive multiple of heads_kv ({})",
                self.heads_q, self.heads_kv
            )));
        }
        crate::attention::cpu::check_scalar_options(
            f64::from(self.softmax_scale),
            f64::from(self.softcap),
            self.window_left,
            self.window_right,
        )?;
        if self.cu_seqlens != 0 && self.seqlen_q != self.seqlen_k {
            return Err(Error::value(
                "varlen attention needs the same packed length for q and k/v",
            ));
        }
        for (name, n) in [
            ("seqlen_q", self.seqlen_q),
            ("seqlen_k", self.seqlen_k),
            ("max_seqlen", self.max_seqlen),
        ] {
            to_i32(n, name)?;
        }
        // Token offsets are computed in 64 bits, but heads * tokens must stay indexable.
        to_i32(
            crate::error::checked_mul(
                "batch * seqlen",
                self.batch,
                self.seqlen_q.max(self.seqlen_k),
            )?,
            "batch * seqlen",
        )?;
        Ok(())
    }

    fn params(&self) -> Result<AttnParams> {
        let varlen = self.cu_seqlens != 0;
        // Bounds past the sequence lengths mask nothing more: clamp them to the lengths (< 2^31,
        // validated), so the kernels' `i + off -/+ window` int arithmetic cannot overflow.
        let clamp = |w: i64, n: usize| if w < 0 { -1 } else { w.min(n as i64) };
        let window_left = clamp(self.window_left, self.seqlen_k);
        let mut window_right = clamp(self.window_right, self.seqlen_q);
        if self.causal {
            window_right = 0; // causal = window (left, 0), as flash-attention defines it
        }
        let (lse_batch_stride, lse_head_stride) = if varlen {
            (0, self.seqlen_q)
        } else {
            // Saturating: a product past usize is then rejected by `to_i32` below, not wrapped.
            (self.heads_q.saturating_mul(self.seqlen_q), self.seqlen_q)
        };
        Ok(AttnParams {
            q: self.q,
            k: self.k,
            v: self.v,
            out: self.out,
            lse: self.lse,
            cu_seqlens: self.cu_seqlens,
            dout: self.dout,
            delta: self.delta,
            dq: self.dq,
            dk: self.dk,
            dv: self.dv,
            seqlen_q: to_i32(self.seqlen_q, "seqlen_q")?,
            seqlen_k: to_i32(self.seqlen_k, "seqlen_k")?,
            heads_q: to_i32(self.heads_q, "heads_q")?,
            heads_kv: to_i32(self.heads_kv, "heads_kv")?,
            lse_batch_stride: to_i32(lse_batch_stride, "heads_q * seqlen_q")?,
            lse_head_stride: to_i32(lse_head_stride, "seqlen_q")?,
            window_left: i32::try_from(window_left).unwrap_or(i32::MAX),
            window_right: i32::try_from(window_right).unwrap_or(i32::MAX),
            scale: self.softmax_scale,
            softcap: self.softcap,
        })
    }

    /// Query and key extents the grids must cover.
    fn grid_lengths(&self) -> (usize, usize) {
        if self.cu_seqlens != 0 {
            (self.max_seqlen, self.max_seqlen)
        } else {
            (self.seqlen_q, self.seqlen_k)
        }
    }

    /// Pointers of non-empty tensors must be set (torch gives 0 for empty ones).
    fn require(&self, ptrs: &[(&str, u64, bool)]) -> Result<()> {
        for (name, p, nonempty) in ptrs {
            if *nonempty && *p == 0 {
                return Err(Error::value(format!("{name} is a null device pointer")));
            }
        }
        Ok(())
    }
}

fn as_param<T>(v: &mut T) -> *mut c_void {
    (v as *mut T).cast()
}

/// Forward pass: writes `out` and `lse` on `stream`.
pub fn attention_forward(call: &AttnCall, elem: ElemType) -> Result<()> {
    guarded("attention_forward", || {
        call.validate()?;
        if call.batch == 0 || call.seqlen_q == 0 {
            return Ok(());
        }
        let has_k = call.seqlen_k > 0;
        call.require(&[
            ("q", call.q, true),
            ("k", call.k, has_k),
            ("v", call.v, has_k),
            ("out", call.out, true),
            ("lse", call.lse, true),
        ])?;
        let ctx = device::context(call.device)?;
        let cfg = AttnConfig::choose(call.head_dim, device::max_smem(&ctx)?)?;
        let module = kernels::attention_module(elem, call.head_dim, &cfg);
        let f = device::function(&ctx, &module, "attn_fwd")?;
        let mut params = call.params()?;
        let (len_q, _) = call.grid_lengths();
        let geometry = Launch {
            grid: (
                len_q.div_ceil(cfg.fwd_m) as u32,
                call.heads_q as u32,
                call.batch as u32,
            ),
            block: (cfg.fwd_threads() as u32, 1, 1),
            smem: fwd_smem(call.head_dim, cfg.fwd_m, cfg.fwd_n) as u32,
        };
        // SAFETY: AttnParams mirrors the kernel's struct; pointers come from live caller tensors.
        unsafe { device::launch(&f, &geometry, call.stream, &mut [as_param(&mut params)]) }
    })
}

/// Backward pass: writes `delta` (scratch), `dq`, `dk`, `dv` on `stream`.
pub fn attention_backward(call: &AttnCall, elem: ElemType) -> Result<()> {
    guarded("attention_backward", || {
        call.validate()?;
        if call.batch == 0 || (call.seqlen_q == 0 && call.seqlen_k == 0) {
            return Ok(());
        }
        let (has_q, has_k) = (call.seqlen_q > 0, call.seqlen_k > 0);
        call.require(&[
            ("q", call.q, has_q),
            ("k", call.k, has_k),
            ("v", call.v, has_k),
            ("out", call.out, has_q),
            ("lse", call.lse, has_q),
            ("dout", call.dout, has_q),
            ("delta", call.delta, has_q),
            ("dq", call.dq, has_q),
            ("dk", call.dk, has_k),
            ("dv", call.dv, has_k),
        ])?;
        let ctx = device::context(call.device)?;
        let cfg = AttnConfig::choose(call.head_dim, device::max_smem(&ctx)?)?;
        let module = kernels::attention_module(elem, call.head_dim, &cfg);
        let delta = device::function(&ctx, &module, "attn_bwd_delta")?;
        let dkv = device::function(&ctx, &module, "attn_bwd_dkv")?;
        let dq = device::function(&ctx, &module, "attn_bwd_dq")?;
        let mut params = call.params()?;
        let (len_q, len_k) = call.grid_lengths();
        let (hq, hkv, b) = (call.heads_q as u32, call.heads_kv as u32, call.batch as u32);
        let d = call.head_dim;
        let launches = [
            (
                &delta,
                Launch {
                    grid: (len_q.div_ceil(cfg.bwd_m) as u32, hq, b),
                    block: (cfg.bwd_m as u32, 1, 1),
                    smem: 0,
                },
            ),
            (
                &dkv,
                Launch {
                    grid: (len_k.div_ceil(cfg.bwd_n) as u32, hkv, b),
                    block: ((cfg.bwd_n * TPR) as u32, 1, 1),
                    smem: dkv_smem(d, cfg.bwd_m, cfg.bwd_n) as u32,
                },
            ),
            (
                &dq,
                Launch {
                    grid: (len_q.div_ceil(cfg.bwd_m) as u32, hq, b),
                    block: ((cfg.bwd_m * TPR) as u32, 1, 1),
                    smem: dq_smem(d, cfg.bwd_m, cfg.bwd_n) as u32,
                },
            ),
        ];
        for (f, geometry) in launches {
            // SAFETY: as in attention_forward; the launches are ordered on one stream.
            unsafe { device::launch(f, &geometry, call.stream, &mut [as_param(&mut params)])? };
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_match_the_kernel_struct_layout() {
        // 11 pointers + 10 four-byte fields, no padding: the CUDA struct has the same layout.
        assert_eq!(std::mem::size_of::<AttnParams>(), 11 * 8 + 10 * 4);
        assert_eq!(std::mem::align_of::<AttnParams>(), 8);
    }

    #[test]
    fn config_fits_the_shared_memory_limit() {
        for d in (8..=256).step_by(8) {
            for limit in [48 * 1024, 99 * 1024, 163 * 1024, 227 * 1024] {
                match AttnConfig::choose(d, limit) {
                    Ok(c) => {
                        assert!(fwd_smem(d, c.fwd_m, c.fwd_n) <= limit);
                        assert!(c.fwd_m % c.fwd_rpt == 0 && c.fwd_threads() <= 256);
                        assert!(dkv_smem(d, c.bwd_m, c.bwd_n) <= limit);
                        assert!(dq_smem(d, c.bwd_m, c.bwd_n) <= limit);
                    }
                    Err(_) => assert!(fwd_smem(d, 16, 16) > limit || dkv_smem(d, 16, 16) > limit),
                }
            }
        }
    }

    #[test]
    fn validation_rejects_bad_shapes() {
        let ok = AttnCall {
            batch: 1,
            seqlen_q: 4,
            seqlen_k: 4,
            heads_q: 4,
            heads_kv: 2,
            head_dim: 64,
            window_left: -1,
            window_right: -1,
            softmax_scale: 0.125,
            ..Default::default()
        };
        assert!(ok.validate().is_ok());
        assert!(AttnCall { head_dim: 60, ..ok }.validate().is_err());
        assert!(AttnCall {
            head_dim: 264,
            ..ok
        }
        .validate()
        .is_err());
        assert!(AttnCall { heads_kv: 3, ..ok }.validate().is_err());
        assert!(AttnCall {
            softcap: -1.0,
            ..ok
        }
        .validate()
        .is_err());
        assert!(AttnCall {
            window_left: -2,
            ..ok
        }
        .validate()
        .is_err());
        assert!(AttnCall {
            softmax_scale: f32::NAN,
            ..ok
        }
        .validate()
        .is_err());
    }

    #[test]
    fn causal_sets_the_right_window_to_zero() {
        let c = AttnCall {
            heads_q: 1,
            heads_kv: 1,
            seqlen_q: 10,
            seqlen_k: 10,
            causal: true,
            window_left: 5,
            window_right: -1,
            ..Default::default()
        };
        let p = c.params().unwrap();
        assert_eq!((p.window_left, p.window_right), (5, 0));
    }

    #[test]
    fn huge_windows_are_clamped_to_the_sequence_lengths() {
        let c = AttnCall {
            heads_q: 1,
            heads_kv: 1,
            seqlen_q: 7,
            seqlen_k: 12,
            window_left: i64::MAX,
            window_right: i64::MAX,
            ..Default::default()
        };
        let p = c.params().unwrap();
        assert_eq!((p.window_left, p.window_right), (12, 7));
        let p = AttnCall { causal: true, ..c }.params().unwrap();
        assert_eq!((p.window_left, p.window_right), (12, 0));
    }
}
