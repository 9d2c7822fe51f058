//! Micro-benchmarks of the per-request pure functions: routing a typical path and computing
//! the Hawk header (target: ≤ 2 µs), with and without temporary credentials.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use taskcluster_proxy::credentials::{Credentials, Identity};
use taskcluster_proxy::routing::{dispatch, Dispatch};
use taskcluster_proxy::signing::Target;

const CERT: &str = r#"{"version":1,"scopes":["queue:create-artifact:abc/0","queue:get-artifact:*"],"start":1438964811744,"expiry":1439051211744,"seed":"JYR4wzMCTG6XeDS2cDUCMwH0RFUXGfQjK7LgqD-e6lSQ","signature":"nNEaLtZMiw627NuDbF5Z8HDFc57MGWCptXBQSYNFgBk=","issuer":"def/ghi@XXX"}"#;

fn benches(c: &mut Criterion) {
    let path =
        b"/api/queue/v1/task/DSlhVLpwQhS-3fLhmbo1eQ/runs/0/artifacts/public%2Flogs%2Flive.log?x=1";
    c.bench_function("route typical path", |b| {
        b.iter(|| match dispatch("", black_box(path)) {
            Ok(Dispatch::Proxy(route)) => route.target.len(),
            _ => 0,
        })
    });

    let target = Target {
        method: "GET",
        resource: b"/api/queue/v1/task/DSlhVLpwQhS-3fLhmbo1eQ/runs/0/artifacts/public%2Flogs%2Flive.log?x=1",
        host: "tc.example.com",
        port: 443,
    };
    let perm = Identity::new(
        &Credentials::new("project/ci", "secret-token", None).unwrap(),
        None,
    );
    c.bench_function("hawk header, permanent", |b| {
        b.iter(|| perm.authorization(black_box(&target)).len())
    });
    let scopes: Vec<String> = (0..10)
        .map(|i| format!("queue:get-artifact:path/{i}/*"))
        .collect();
    let temp = Identity::new(
        &Credentials::new(
            "abc/def/ghi",
            "R4OVHWpIvy6KsqS4AWE51QwbvgLvsstS6e6UW8IfHUY",
            Some(CERT),
        )
        .unwrap(),
        Some(&scopes),
    );
    c.bench_function("hawk header, temporary + 10 scopes", |b| {
        b.iter(|| temp.authorization(black_box(&target)).len())
    });
}

criterion_group!(hot_paths, benches);
criterion_main!(hot_paths);
