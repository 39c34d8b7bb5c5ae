//! Criterion benches for MoE routing, dispatch plans and the permute/combine kernels.
//!
//! `cargo bench --bench moe` (Mixtral-like: T = 4096, E = 8, k = 2, D = 512; fine-grained:
//! E = 64, k = 6).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;

use _native::moe::{combine, dispatch_plan, permute, route, Gate};

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn routed(t: usize, e: usize, k: usize) -> (Vec<i64>, Vec<f32>) {
    let logits = values(t * e, 1);
    let mut idx = vec![0i64; t * k];
    let mut w = vec![0f32; t * k];
    route(&logits, e, k, Gate::Softmax, None, true, &mut idx, &mut w).unwrap();
    (idx, w)
}

fn bench_route(c: &mut Criterion) {
    let mut g = c.benchmark_group("moe_route");
    for &(t, e, k) in &[(4096usize, 8usize, 2usize), (4096, 64, 6)] {
        let logits = values(t * e, 1);
        let mut idx = vec![0i64; t * k];
        let mut w = vec![0f32; t * k];
        g.throughput(Throughput::Elements(t as u64));
        g.bench_function(
            BenchmarkId::new("softmax_topk", format!("T{t}_E{e}_k{k}")),
            |b| {
                b.iter(|| {
                    route(
                        black_box(&logits),
                        e,
                        k,
                        Gate::Softmax,
                        None,
                        true,
                        &mut idx,
                        &mut w,
                    )
                    .unwrap()
                })
            },
        );
        let (idx, _) = routed(t, e, k);
        g.bench_function(
            BenchmarkId::new("dispatch_plan", format!("T{t}_E{e}_k{k}")),
            |b| b.iter(|| dispatch_plan(black_box(&idx), k, e, None, false).unwrap()),
        );
    }
    g.finish();
}

fn bench_permute_combine(c: &mut Criterion) {
    let mut g = c.benchmark_group("moe_permute_combine");
    g.sample_size(20);
    let (t, e, k, d) = (4096usize, 8usize, 2usize, 512usize);
    let (idx, w) = routed(t, e, k);
    let plan = dispatch_plan(&idx, k, e, None, false).unwrap();
    let rows = plan.token_of.len();
    let x = values(t * d, 2);
    let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
    let mut xs = vec![0f32; rows * d];
    let mut xsb = vec![bf16::ZERO; rows * d];
    let mut y = vec![0f32; t * d];
    let mut yb = vec![bf16::ZERO; t * d];
    g.throughput(Throughput::Bytes((rows * d * 4) as u64));
    g.bench_function("permute_f32", |b| {
        b.iter(|| permute(black_box(&x), d, &plan.token_of, None, &mut xs).unwrap())
    });
    g.bench_function("combine_f32", |b| {
        b.iter(|| combine(black_box(&xs), d, &plan.pos, k, Some(&w), &mut y).unwrap())
    });
    g.throughput(Throughput::Bytes((rows * d * 2) as u64));
    g.bench_function("permute_bf16", |b| {
        b.iter(|| permute(black_box(&xb), d, &plan.token_of, None, &mut xsb).unwrap())
    });
    g.bench_function("combine_bf16", |b| {
        b.iter(|| combine(black_box(&xsb), d, &plan.pos, k, Some(&w), &mut yb).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench_route, bench_permute_combine);
criterion_main!(benches);
