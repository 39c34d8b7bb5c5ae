//! Criterion benches of the dedup core: signatures (1 and 2 threads), the exact-duplicate hash,
//! and banding + candidate pairs. Text is generated: Zipf-like words over a 20k vocabulary,
//! documents of 50 to 5,000 words.

use std::time::Duration;

use _native::dedup::shingle::splitmix64;
use _native::dedup::{
    band_hashes, candidate_pairs, exact_hashes, MinHasher, Permutations, Shingler, Tokenizer,
};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn corpus(docs: usize) -> Vec<String> {
    let mut state = 42u64;
    let vocab: Vec<String> = (0..20_000)
        .map(|_| {
            let len = 2 + (splitmix64(&mut state) % 9) as usize;
            (0..len)
                .map(|_| (b'a' + (splitmix64(&mut state) % 26) as u8) as char)
                .collect()
        })
        .collect();
    (0..docs)
        .map(|_| {
            let words = 50 + (splitmix64(&mut state) % 4_950) as usize;
            let mut doc = String::with_capacity(words * 7);
            for w in 0..words {
                // Squaring a uniform draw skews towards frequent words.
                let u = (splitmix64(&mut state) >> 11) as f64 / (1u64 << 53) as f64;
                doc.push_str(&vocab[(u * u * vocab.len() as f64) as usize]);
                doc.push(if w % 13 == 12 { '\n' } else { ' ' });
            }
            doc
        })
        .collect()
}

fn bench_signatures(c: &mut Criterion) {
    let texts = corpus(2_000);
    let bytes: usize = texts.iter().map(String::len).sum();
    let mut group = c.benchmark_group("dedup_signatures");
    group.throughput(Throughput::Bytes(bytes as u64));
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1));
    for (name, tokenizer, ngram) in [("word5", Tokenizer::Word, 5), ("char5", Tokenizer::Char, 5)] {
        let hasher = MinHasher::new(
            Shingler::new(ngram, tokenizer, 1).unwrap(),
            Permutations::new(128, 1).unwrap(),
        );
        for threads in [1, 2] {
            _native::parallel::set_num_threads(threads).unwrap();
            group.bench_with_input(
                BenchmarkId::new(format!("{name}_k128"), format!("{threads}t")),
                &texts,
                |b, t| b.iter(|| hasher.signatures(t).unwrap()),
            );
        }
    }
    _native::parallel::set_num_threads(1).unwrap();
    group.bench_function("exact_hashes/1t", |b| b.iter(|| exact_hashes(&texts)));
    group.finish();
}

fn bench_banding(c: &mut Criterion) {
    let texts = corpus(2_000);
    let hasher = MinHasher::new(
        Shingler::new(5, Tokenizer::Word, 1).unwrap(),
        Permutations::new(128, 1).unwrap(),
    );
    let sigs = hasher.signatures(&texts).unwrap();
    let mut group = c.benchmark_group("dedup_banding");
    group.throughput(Throughput::Elements(texts.len() as u64));
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    _native::parallel::set_num_threads(1).unwrap();
    group.bench_function("band_hashes+candidate_pairs/16x8/1t", |b| {
        b.iter(|| {
            candidate_pairs(&band_hashes(&sigs, 128, 16, 8).unwrap(), 16, usize::MAX).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench_signatures, bench_banding);
criterion_main!(benches);
