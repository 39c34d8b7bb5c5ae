//! Criterion benches for the fused LAMB step.
//!
//! `cargo bench --bench lamb` (about 10M parameters: 2 x 2048x2048, 4 x 2048x512, 8 x 2048;
//! float32 with and without trust ratio adaptation, bf16 parameters with an fp32 master, and the
//! global gradient norm). Threads: `SLIMFORGE_NUM_THREADS`. The side-by-side comparison with timm
//! and torch is `benches/python/lamb_bench.py`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;

use _native::optim::{grad_sq_norm, step, Grad, HalfParam, LambHyper, LambTensor};

/// Deterministic pseudo-random values in [-scale, scale).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale
        })
        .collect()
}

const SIZES: [(usize, usize); 3] = [(2048 * 2048, 2), (2048 * 512, 4), (2048, 8)];

struct Model {
    w: Vec<Vec<f32>>,
    g: Vec<Vec<f32>>,
    gb: Vec<Vec<bf16>>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    half: Vec<Vec<bf16>>,
}

fn model() -> Model {
    let sizes: Vec<usize> = SIZES
        .iter()
        .flat_map(|&(n, k)| std::iter::repeat_n(n, k))
        .collect();
    let w: Vec<Vec<f32>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| values(n, i as u64, 0.02))
        .collect();
    let g: Vec<Vec<f32>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| values(n, 100 + i as u64, 1e-3))
        .collect();
    let gb = g
        .iter()
        .map(|g| g.iter().map(|&x| bf16::from_f32(x)).collect())
        .collect();
    let half = w
        .iter()
        .map(|w| w.iter().map(|&x| bf16::from_f32(x)).collect())
        .collect();
    let zeros = || sizes.iter().map(|&n| vec![0f32; n]).collect::<Vec<_>>();
    Model {
        w,
        g,
        gb,
        m: zeros(),
        v: zeros(),
        half,
    }
}

fn tensors(s: &mut Model, bf16_params: bool) -> Vec<LambTensor<'_>> {
    s.w.iter_mut()
        .zip(s.g.iter().zip(&s.gb))
        .zip(s.m.iter_mut().zip(s.v.iter_mut()))
        .zip(s.half.iter_mut())
        .map(|(((w, (g, gb)), (m, v)), h)| LambTensor {
            param: w,
            grad: if bf16_params {
                Grad::Bf16(gb)
            } else {
                Grad::F32(g)
            },
            exp_avg: m,
            exp_avg_sq: v,
            half: if bf16_params {
                HalfParam::Bf16(h)
            } else {
                HalfParam::None
            },
        })
        .collect()
}

fn bench_step(c: &mut Criterion) {
    let mut s = model();
    let n: usize = s.w.iter().map(Vec::len).sum();
    let mut g = c.benchmark_group("lamb_step");
    g.sample_size(20);
    g.throughput(Throughput::Elements(n as u64));
    let adapt = LambHyper {
        clip_divisor: 1.5,
        ..LambHyper::default().at_step(10)
    };
    let plain = LambHyper {
        weight_decay: 0.0,
        ..adapt
    };
    for (name, h, bf) in [
        ("f32_adapt", adapt, false),
        ("f32_no_adapt", plain, false),
        ("bf16_adapt", adapt, true),
    ] {
        g.bench_function(BenchmarkId::new(name, format!("{}M", n >> 20)), |b| {
            b.iter(|| step(tensors(&mut s, bf), black_box(&h)).unwrap())
        });
    }
    g.finish();
    let mut g = c.benchmark_group("lamb_grad_sq_norm");
    g.sample_size(20);
    g.throughput(Throughput::Elements(n as u64));
    let grads: Vec<Grad<'_>> = s.g.iter().map(|g| Grad::F32(g)).collect();
    g.bench_function(BenchmarkId::new("f32", format!("{}M", n >> 20)), |b| {
        b.iter(|| grad_sq_norm(black_box(&grads)))
    });
    g.finish();
}

criterion_group!(benches, bench_step);
criterion_main!(benches);
