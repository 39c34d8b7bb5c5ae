//! Criterion bench of the tiled attention forward (f32, B = 1, H = 8, D = 64).
//! Throughput is reported in elements; FLOPs = 4 * B * H * N^2 * D (halved for causal).

use _native::attention::{forward, Options, Shape};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn data(n: usize, seed: u32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9).wrapping_add(1);
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

fn bench_forward(c: &mut Criterion) {
    let (heads, d) = (8, 64);
    let mut group = c.benchmark_group("attention_forward_f32");
    group.sample_size(10);
    for &n in &[1024usize, 2048] {
        let shape = Shape::batched(1, n, n, heads, heads, d).unwrap();
        let q = data(n * heads * d, 1);
        let k = data(n * heads * d, 2);
        let v = data(n * heads * d, 3);
        for (name, causal, window_left) in [
            ("full", false, -1),
            ("causal", true, -1),
            ("window256", true, 256),
        ] {
            let opts = Options {
                softmax_scale: 0.125,
                softcap: 0.0,
                causal,
                window_left,
                window_right: -1,
                num_global: 0,
            };
            let flops = 4 * heads * n * n * d / if causal { 2 } else { 1 };
            group.throughput(Throughput::Elements(flops as u64));
            group.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter(|| forward(&q, &k, &v, &shape, &opts).unwrap())
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_forward);
criterion_main!(benches);
