//! Token verification on the login hot path: with the provider's keys warm
//! (a new token: signature check), and a token seen before (verified-token
//! cache hit: no signature check).

#![allow(
    clippy::expect_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is a failing test"
)]
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::SystemTime;

use authgres_jwt::{ProviderConfig, Verifier};
use authgres_sandbox::{Issuer, KeyKind, TokenSpec};
use criterion::{Criterion, criterion_group, criterion_main};

fn verification(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let issuer = runtime.block_on(Issuer::start()).expect("issuer");
    let provider = ProviderConfig::new(
        "bench",
        issuer.issuer(),
        &issuer.jwks_url(),
        &["authenticated"],
    );
    let uncached = Verifier::with_token_cache(vec![provider.clone()], 0).expect("verifier");
    let cached = Verifier::new(vec![provider]).expect("verifier");
    let mut group = c.benchmark_group("verify");
    for kind in [KeyKind::Rsa, KeyKind::Ec, KeyKind::Ed25519] {
        let token = issuer.mint(&TokenSpec::new("user_bench").key(kind));
        for verifier in [&uncached, &cached] {
            runtime
                .block_on(verifier.verify(&token, "authenticated", SystemTime::now()))
                .expect("warm-up verifies");
        }
        group.bench_function(format!("warm_key/{}", kind.alg()), |b| {
            b.to_async(&runtime).iter(|| async {
                black_box(
                    uncached
                        .verify(black_box(&token), "authenticated", SystemTime::now())
                        .await,
                )
            })
        });
        if kind == KeyKind::Rsa {
            group.bench_function("cache_hit/RS256", |b| {
                b.to_async(&runtime).iter(|| async {
                    black_box(
                        cached
                            .verify(black_box(&token), "authenticated", SystemTime::now())
                            .await,
                    )
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, verification);
criterion_main!(benches);
