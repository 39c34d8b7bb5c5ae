//! The blocks of a Llama-architecture causal LM (RMSNorm, grouped-query attention with rotary
//! embeddings, SwiGLU MLP) with quantized projections, one decode step per call.
//!
//! Per block, for `x` `(batch, hidden)`:
//! `x += o(attend(qkv(rmsnorm(x))))`, then `x += down(silu(gate(h)) * up(h))` with
//! `h = rmsnorm(x)`; after the last block the final norm. The projections are the fused kernels
//! of [`crate::quant::gemv`] (q/k/v stacked into one weight, gate/up into another), attention is
//! [`crate::attention::decode_step`] (rotary, cache append, grouped-query attention), and the
//! norms, SwiGLU and residual adds are plain loops. The same kernels run when the step is issued
//! op by op, so both give the same result up to the norm's summation order.

use crate::attention::{decode_step, DecodeShape, Rotary};
use crate::error::{checked_product, Error, Result};
use crate::quant::gemv::{self, QuantWeight, Route};

/// A quantized projection `y = x @ dequant(W).T (+ bias)` owning its packed buffers.
#[derive(Clone, Debug)]
pub struct Proj {
    pub qweight: Vec<u8>,
    pub scales: Vec<f32>,
    pub zeros: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub out_features: usize,
    pub in_features: usize,
    pub bits: u32,
    pub group_size: usize,
    pub route: Route,
}

impl Proj {
    fn weight(&self) -> QuantWeight<'_> {
        QuantWeight {
            qweight: &self.qweight,
            scales: &self.scales,
            zeros: &self.zeros,
            out_features: self.out_features,
            in_features: self.in_features,
            bits: self.bits,
            group_size: self.group_size,
        }
    }

    /// Checks the buffers against the shape; `name` prefixes the error.
    pub fn validate(&self, name: &str) -> Result<()> {
        self.weight()
            .validate()
            .map_err(|e| Error::value(format!("{name}: {e}")))?;
        if let Some(b) = &self.bias {
            if b.len() != self.out_features {
                return Err(Error::value(format!(
                    "{name}: bias has {} elements, out_features is {}",
                    b.len(),
                    self.out_features
                )));
            }
        }
        Ok(())
    }

    fn apply(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        gemv::linear(x, m, &self.weight(), self.bias.as_deref(), self.route)
    }
}

/// One block's weights.
#[derive(Clone, Debug)]
pub struct StackBlock {
    pub attn_norm: Vec<f32>,
    /// `[q; k; v]` rows stacked: `((heads_q + 2 heads_kv) * head_dim, hidden)`.
    pub qkv: Proj,
    pub o: Proj,
    pub ffn_norm: Vec<f32>,
    /// `[gate; up]` rows stacked: `(2 * intermediate, hidden)`.
    pub gate_up: Proj,
    pub down: Proj,
}

/// Every block of a model plus its final norm.
#[derive(Clone, Debug)]
pub struct LlamaStack {
    blocks: Vec<StackBlock>,
    final_norm: Vec<f32>,
    heads_q: usize,
    heads_kv: usize,
    head_dim: usize,
    eps: f32,
}

fn check(cond: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::value(msg()))
    }
}

impl LlamaStack {
    /// Checks every shape against `hidden = final_norm.len()` and the head counts.
    pub fn new(
        blocks: Vec<StackBlock>,
        final_norm: Vec<f32>,
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
        eps: f32,
    ) -> Result<Self> {
        let hidden = final_norm.len();
        check(hidden > 0, || "the final norm is empty".into())?;
        check(
            heads_kv > 0 && head_dim > 0 && heads_q > 0 && heads_q.is_multiple_of(heads_kv),
            || {
                format!(
                    "heads_q ({heads_q}) must be a positive multiple of heads_kv ({heads_kv}), \
                     head_dim ({head_dim}) positive"
                )
            },
        )?;
        check(eps.is_finite() && eps >= 0.0, || {
            format!("eps must be finite and >= 0, got {eps}")
        })?;
        let qkv_out = (heads_q + 2 * heads_kv) * head_dim;
        for (i, b) in blocks.iter().enumerate() {
            let n = |what: &str| format!("block {i} {what}");
            for (p, what) in [
                (&b.qkv, "qkv"),
                (&b.o, "o"),
                (&b.gate_up, "gate_up"),
                (&b.down, "down"),
            ] {
                p.validate(&n(what))?;
            }
            check(
                b.attn_norm.len() == hidden && b.ffn_norm.len() == hidden,
                || n(&format!("norms must have {hidden} elements")),
            )?;
            check(
                b.qkv.in_features == hidden && b.qkv.out_features == qkv_out,
                || n(&format!("qkv must be ({qkv_out}, {hidden})")),
            )?;
            check(
                b.o.in_features == heads_q * head_dim && b.o.out_features == hidden,
                || n(&format!("o must be ({hidden}, {})", heads_q * head_dim)),
            )?;
            let inter = b.gate_up.out_features / 2;
            check(
                b.gate_up.in_features == hidden && b.gate_up.out_features == 2 * inter,
                || n(&format!("gate_up must be (2 * intermediate, {hidden})")),
            )?;
            check(
                b.down.in_features == inter && b.down.out_features == hidden,
                || n(&format!("down must be ({hidden}, {inter})")),
            )?;
        }
        Ok(Self {
            blocks,
            final_norm,
            heads_q,
            heads_kv,
            head_dim,
            eps,
        })
    }

    pub fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    pub fn hidden(&self) -> usize {
        self.final_norm.len()
    }

    /// One decode step: `x` `(batch, hidden)` holds the new tokens' embeddings and becomes the
    /// final-normed hidden state. `k_cache` / `v_cache`: `(layers, batch, heads_kv, capacity,
    /// head_dim)`; each sequence's new key/value goes to position `lengths[b]` (not advanced
    /// here). Runs inside the library's thread pool.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &self,
        x: &mut [f32],
        k_cache: &mut [f32],
        v_cache: &mut [f32],
        lengths: &[i64],
        capacity: usize,
        rotary: Option<Rotary<'_>>,
        scale: f32,
    ) -> Result<()> {
        let batch = lengths.len();
        let hidden = self.hidden();
        check(x.len() == batch * hidden, || {
            format!(
                "x must hold (batch {batch}, hidden {hidden}) = {} values, got {}",
                batch * hidden,
                x.len()
            )
        })?;
        let per_layer = checked_product(
            "a layer's cache",
            &[batch, self.heads_kv, capacity, self.head_dim],
        )?;
        let total = checked_product("the cache", &[per_layer, self.blocks.len()])?;
        check(k_cache.len() == total && v_cache.len() == total, || {
            format!(
                "k_cache and v_cache must hold (layers {}, batch {batch}, heads_kv {}, capacity \
                 {capacity}, head_dim {}) = {total} values, got {} and {}",
                self.blocks.len(),
                self.heads_kv,
                self.head_dim,
                k_cache.len(),
                v_cache.len()
            )
        })?;
        if batch == 0 {
            return Ok(());
        }
        let shape = DecodeShape {
            batch,
            heads_q: self.heads_q,
            heads_kv: self.heads_kv,
            head_dim: self.head_dim,
            capacity,
        };
        crate::parallel::install(|| {
            let mut h = vec![0f32; x.len()];
            for (i, b) in self.blocks.iter().enumerate() {
                let (kc, vc) = (
                    &mut k_cache[i * per_layer..(i + 1) * per_layer],
                    &mut v_cache[i * per_layer..(i + 1) * per_layer],
                );
                rms_norm(x, &b.attn_norm, self.eps, &mut h);
                let qkv = b.qkv.apply(&h, batch)?;
                let att = decode_step(&qkv, kc, vc, lengths, &shape, rotary, scale)?;
                add_into(x, &b.o.apply(&att, batch)?);
                rms_norm(x, &b.ffn_norm, self.eps, &mut h);
                let mut gu = b.gate_up.apply(&h, batch)?;
                let act = swiglu(&mut gu, batch);
                add_into(x, &b.down.apply(act, batch)?);
            }
            rms_norm(x, &self.final_norm, self.eps, &mut h);
            x.copy_from_slice(&h);
            Ok(())
        })
    }
}

/// `out = x * rsqrt(mean(x^2) + eps) * w`, row by row (`w.len()` per row).
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (row, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ss: f32 = row.iter().map(|v| v * v).sum();
        let r = 1.0 / (ss / d as f32 + eps).sqrt();
        for ((ov, &xv), &wv) in o.iter_mut().zip(row).zip(w) {
            *ov = xv * r * wv;
        }
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// `gu` `(batch, 2 * inter)` rows `[gate | up]`: writes `silu(gate) * up` into the first `inter`
/// columns of each row, packs those rows together and returns them `(batch, inter)`.
fn swiglu(gu: &mut [f32], batch: usize) -> &[f32] {
    let width = gu.len() / batch;
    let inter = width / 2;
    for t in 0..batch {
        let row = &mut gu[t * width..(t + 1) * width];
        let (gate, up) = row.split_at_mut(inter);
        for (g, &u) in gate.iter_mut().zip(up.iter()) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
        if t > 0 {
            gu.copy_within(t * width..t * width + inter, t * inter);
        }
    }
    &gu[..batch * inter]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::lcg;

    fn proj(out: usize, inp: usize, seed: u64) -> Proj {
        let g = 32;
        let q: Vec<u8> = lcg(out * inp, seed)
            .iter()
            .map(|v| ((v + 0.5) * 255.0) as u8)
            .collect();
        Proj {
            qweight: q,
            scales: vec![0.002; out * inp / g],
            zeros: vec![128.0; out * inp / g],
            bias: None,
            out_features: out,
            in_features: inp,
            bits: 8,
            group_size: g,
            route: Route::Float,
        }
    }

    fn stack(layers: usize) -> LlamaStack {
        let (hidden, hq, hkv, hd, inter) = (64, 4, 2, 16, 96);
        let blocks = (0..layers)
            .map(|i| StackBlock {
                attn_norm: vec![1.0; hidden],
                qkv: proj((hq + 2 * hkv) * hd, hidden, 10 + i as u64),
                o: proj(hidden, hq * hd, 20 + i as u64),
                ffn_norm: vec![1.0; hidden],
                gate_up: proj(2 * inter, hidden, 30 + i as u64),
                down: proj(hidden, inter, 40 + i as u64),
            })
            .collect();
        LlamaStack::new(blocks, vec![1.0; hidden], hq, hkv, hd, 1e-5).unwrap()
    }

    #[test]
    fn a_step_equals_its_ops_run_one_by_one() {
        let s = stack(2);
        let (batch, cap) = (2, 8);
        let per = batch * 2 * cap * 16;
        let (mut k1, mut v1) = (vec![0f32; 2 * per], vec![0f32; 2 * per]);
        let (mut k2, mut v2) = (k1.clone(), v1.clone());
        let lengths = [0i64, 3];
        let x0 = lcg(batch * 64, 7);
        let mut x = x0.clone();
        s.step(&mut x, &mut k1, &mut v1, &lengths, cap, None, 0.25)
            .unwrap();
        // The same ops, one by one.
        let mut r = x0;
        let mut h = vec![0f32; r.len()];
        let shape = DecodeShape {
            batch,
            heads_q: 4,
            heads_kv: 2,
            head_dim: 16,
            capacity: cap,
        };
        for (i, b) in s.blocks.iter().enumerate() {
            rms_norm(&r, &b.attn_norm, 1e-5, &mut h);
            let qkv = b.qkv.apply(&h, batch).unwrap();
            let (kc, vc) = (
                &mut k2[i * per..(i + 1) * per],
                &mut v2[i * per..(i + 1) * per],
            );
            let att = decode_step(&qkv, kc, vc, &lengths, &shape, None, 0.25).unwrap();
            let o = b.o.apply(&att, batch).unwrap();
            r.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            rms_norm(&r, &b.ffn_norm, 1e-5, &mut h);
            let gu = b.gate_up.apply(&h, batch).unwrap();
            let mut act = Vec::new();
            for row in gu.chunks_exact(192) {
                for j in 0..96 {
                    let g = row[j];
                    act.push(g / (1.0 + (-g).exp()) * row[96 + j]);
                }
            }
            let d = b.down.apply(&act, batch).unwrap();
            r.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
        }
        rms_norm(&r, &s.final_norm, 1e-5, &mut h);
        assert_eq!(x, h);
        assert_eq!(k1, k2);
        assert_eq!(v1, v2);
    }

    #[test]
    fn bad_shapes_are_errors_not_panics() {
        let s = stack(1);
        let mut x = vec![0f32; 64];
        let (mut k, mut v) = (vec![0f32; 2 * 4 * 16], vec![0f32; 2 * 4 * 16]);
        assert!(s
            .step(&mut x, &mut k, &mut v, &[0, 0], 4, None, 1.0)
            .is_err());
        let mut x = vec![0f32; 64];
        assert!(s.step(&mut x, &mut k, &mut v, &[4], 4, None, 1.0).is_err());
        let mut bad = stack(1).blocks;
        bad[0].o.out_features = 32;
        assert!(LlamaStack::new(bad, vec![1.0; 64], 4, 2, 16, 1e-5).is_err());
        assert!(LlamaStack::new(vec![], vec![1.0; 64], 3, 2, 16, 1e-5).is_err());
    }
}
