//! Criterion benches for `slimforge::quant` (crate `_native`): INT4 pack/unpack against a plain
//! memcpy of the same bytes, and the fused GEMV kernels (4096 x 4096, batch 1, hot weights).
//!
//! `cargo bench --bench quant` (filter with e.g. `-- gemv`).

use std::hint::black_box;

use _native::quant::gemv::{self, Isa, QuantWeight, Route};
use _native::quant::{affine, pack};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn codes(n: usize) -> Vec<u8> {
    (0..n).map(|i| ((i * 7 + i / 5) % 16) as u8).collect()
}

fn bench_pack(c: &mut Criterion) {
    let mut group = c.benchmark_group("int4_pack");
    for &n in &[1usize << 16, 1 << 24] {
        let q = codes(n);
        let p = pack::pack_int4(&q).unwrap();
        group.throughput(Throughput::Bytes(n as u64));
        group.bench_with_input(BenchmarkId::new("pack", n), &q, |b, q| {
            b.iter(|| pack::pack_int4(black_box(q)).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("unpack", n), &p, |b, p| {
            b.iter(|| pack::unpack_int4(black_box(p)))
        });
        group.bench_with_input(BenchmarkId::new("memcpy", n), &q, |b, q| {
            b.iter(|| black_box(q).to_vec())
        });
    }
    group.finish();
}

fn bench_gemv(c: &mut Criterion) {
    let (n, k) = (4096usize, 4096usize);
    let mut s = 1u64;
    let w: Vec<f32> = (0..n * k)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    let x: Vec<f32> = w[..k].to_vec();
    let mut group = c.benchmark_group("gemv_4096");
    group.sample_size(20);
    for (bits, g) in [(8u32, k), (4, 128)] {
        let (scales, zeros) = affine::choose_qparams(&w, n, k, bits, g, bits == 8).unwrap();
        let q = affine::quantize(&w, n, k, &scales, &zeros, bits, g).unwrap();
        let qweight = if bits == 4 {
            pack::pack_int4(&q).unwrap()
        } else {
            q
        };
        let qw = QuantWeight {
            qweight: &qweight,
            scales: &scales,
            zeros: &zeros,
            out_features: n,
            in_features: k,
            bits,
            group_size: g,
        };
        group.throughput(Throughput::Bytes(qweight.len() as u64));
        let mut isas = vec![Isa::Portable];
        for isa in [Isa::Avx2Fma, Isa::Avx512, Isa::Avx512Vnni] {
            if isa <= gemv::detect_isa() {
                isas.push(isa);
            }
        }
        for isa in isas {
            for route in [Route::Float, Route::Int8Activations] {
                let id = format!("int{bits}/{}/{route:?}", isa.name());
                group.bench_function(id, |b| {
                    b.iter(|| {
                        gemv::linear_with_isa(black_box(&x), 1, &qw, None, route, isa).unwrap()
                    })
                });
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench_pack, bench_gemv);
criterion_main!(benches);
