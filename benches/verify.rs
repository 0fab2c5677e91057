//! Token verification with the provider's keys already cached: the cost a
//! login pays on the hot path, per algorithm.

#![allow(missing_docs)]

use std::hint::black_box;
use std::time::SystemTime;

use authgres_jwt::{ProviderConfig, Verifier};
use authgres_sandbox::{Issuer, KeyKind, TokenSpec};
use criterion::{Criterion, criterion_group, criterion_main};

fn warm_verification(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let issuer = runtime.block_on(Issuer::start()).expect("issuer");
    let verifier = Verifier::new(vec![ProviderConfig::new(
        "bench",
        issuer.issuer(),
        &issuer.jwks_url(),
        &["authenticated"],
    )])
    .expect("verifier");
    let mut group = c.benchmark_group("verify_warm");
    for kind in [KeyKind::Rsa, KeyKind::Ec, KeyKind::Ed25519] {
        let token = issuer.mint(&TokenSpec::new("user_bench").key(kind));
        runtime
            .block_on(verifier.verify(&token, "authenticated", SystemTime::now()))
            .expect("warm-up verifies");
        group.bench_function(kind.alg(), |b| {
            b.to_async(&runtime).iter(|| async {
                black_box(
                    verifier
                        .verify(black_box(&token), "authenticated", SystemTime::now())
                        .await,
                )
            })
        });
    }
    group.finish();
}

criterion_group!(benches, warm_verification);
criterion_main!(benches);
