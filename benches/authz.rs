//! Cedar authorization with 10, 100 and 1 000 policies, including building
//! the principal, resource, entities and context for each request; and path
//! normalization.

use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http::HeaderMap;
use warden::authn::{AwsFacts, AwsPrincipal, Identity, Principal};
use warden::authz::{AuthzInput, PolicySnapshot};
use warden::config::{AuthzMode, ServiceConfig};
use warden::trace::ConnInfo;

const SCHEMA: &str = include_str!("../policies/schema.cedarschema");

/// `n` role-per-service policies, a few org and forbid rules among them.
fn policy_set(n: usize) -> PolicySnapshot {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut text = String::new();
    for i in 0..n {
        let p = match i % 10 {
            0 => format!(
                "@id(\"org-{i}\")\npermit (principal in Aws::Org::\"o-org{i}\", action == Action::\"GET\", resource in Http::Path::\"/svc{i}/\");\n"
            ),
            1 => format!(
                "@id(\"forbid-{i}\")\nforbid (principal, action == Action::\"DELETE\", resource in Http::Path::\"/svc{i}/admin/\")\nunless {{ context.headers.hasTag(\"x-break-glass\") }};\n"
            ),
            _ => format!(
                "@id(\"role-{i}\")\npermit (principal == Aws::Role::\"arn:aws:iam::123456789012:role/r{i}\", action in Action::\"invoke\", resource in Http::Path::\"/svc{i}/\")\nwhen {{ context.source_ip.isInRange(ip(\"10.0.0.0/8\")) }};\n"
            ),
        };
        text.push_str(&p);
    }
    std::fs::write(dir.path().join("p.cedar"), text).expect("write");
    std::fs::write(dir.path().join("schema.cedarschema"), SCHEMA).expect("write");
    PolicySnapshot::load(
        dir.path(),
        &dir.path().join("schema.cedarschema"),
        AuthzMode::Enforce,
        &ServiceConfig {
            name: "orders".to_owned(),
            ..ServiceConfig::default()
        },
    )
    .expect("policies")
}

fn authz(c: &mut Criterion) {
    let identity = Identity {
        principal: Principal::Aws(
            AwsPrincipal::from_arn("arn:aws:iam::123456789012:role/r5").expect("arn"),
        ),
        method: "sigv4",
        aws: Some(AwsFacts {
            access_key_id: "AKID".into(),
            org_id: Some("o-exampleorgid".into()),
            tags: Default::default(),
            presigned: false,
        }),
        jwt: None,
    };
    let mut headers = HeaderMap::new();
    for (k, v) in [
        ("host", "orders.local"),
        ("user-agent", "bench"),
        ("accept", "application/json"),
        ("x-tenant", "acme"),
    ] {
        headers.insert(k, v.parse().expect("value"));
    }
    let conn = ConnInfo::new(
        SocketAddr::from(([10, 1, 2, 3], 40000)),
        SocketAddr::from(([10, 1, 2, 4], 15000)),
        None,
    );
    let mut g = c.benchmark_group("authorize");
    for n in [10, 100, 1000] {
        let set = policy_set(n);
        let input = AuthzInput {
            identity: &identity,
            method: "GET",
            path: "/svc5/orders/42",
            query: Some("view=full&lang=en"),
            headers: &headers,
            host: Some("orders.local"),
            conn: &conn,
            service: None,
            service_arn: None,
        };
        assert!(
            set.decide(&input).expect("decision").allow,
            "the bench request is allowed"
        );
        g.bench_with_input(BenchmarkId::from_parameter(n), &set, |b, set| {
            b.iter(|| set.decide(&input).expect("decision"))
        });
    }
    g.finish();
    c.bench_function("normalize_path", |b| {
        b.iter(|| {
            warden::normalize::normalize_path("/api//v1/./orders/%61bc/../42/items%20x")
                .expect("path")
        })
    });
}

/// The binary's allocator (proxy/src/main.rs), so an allocation costs here
/// what it costs in the proxy.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

criterion_group!(benches, authz);
criterion_main!(benches);
