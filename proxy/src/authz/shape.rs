//! Proving, once per policy set, that every request the proxy can build for
//! an action and principal type conforms to the schema, so those requests
//! need not be validated one by one.
//!
//! Why it must conform at all: a `forbid` that fails to evaluate is skipped,
//! so a context that drifted from the schema could silently lift a `forbid`.
//! Requests are therefore either proved here or validated per request, and a
//! request that fails validation is refused.
//!
//! Why the proof covers every request: Cedar checks a request's principal and
//! resource *types* against the action, and its context record attribute by
//! attribute — each attribute present must be declared with its type, each
//! required one must be there. The builder fixes every attribute's type; only
//! whether an optional attribute is present varies. So the fullest context
//! (every optional attribute present) together with, for each optional
//! attribute, the fullest context without it, exercises every check any real
//! context can meet.

use std::sync::Arc;

use cedar_policy_core::ast;
use cedar_policy_core::extensions::Extensions;
use cedar_policy_core::validator::ValidatorSchema;
use http::HeaderMap;

use super::request::{self, Fixed, KINDS};
use super::AuthzInput;
use crate::authn::jwt::{Claims, K8sClaims};
use crate::authn::mtls::SpiffeId;
use crate::authn::{AwsFacts, AwsKind, AwsPrincipal, Identity, Principal};
use crate::trace::{ConnInfo, PeerCert, TlsInfo};

/// One request the builder could be asked for.
pub(super) struct Sample {
    pub identity: Identity,
    pub conn: ConnInfo,
    pub service_arn: Option<&'static str>,
    pub network_arn: Option<&'static str>,
}

fn principal(kind: usize) -> Result<Principal, String> {
    let aws = |kind| {
        Principal::Aws(AwsPrincipal {
            kind,
            arn: "arn:aws:iam::123456789012:role/sample".into(),
            account: "123456789012".into(),
            session_name: Some("session".into()),
        })
    };
    let p = match kind {
        0 => aws(AwsKind::Role),
        1 => aws(AwsKind::User),
        2 => Principal::Spiffe(SpiffeId::parse("spiffe://sample.example/workload")?),
        3 => Principal::K8s {
            namespace: "ns".into(),
            name: "sa".into(),
            cluster: "cluster".into(),
        },
        4 => Principal::Oidc {
            sub: "sub".into(),
            iss: "https://issuer.example".into(),
        },
        _ => Principal::Anonymous,
    };
    Ok(p)
}

/// Every optional attribute present.
pub(super) fn fullest(kind: usize) -> Result<Sample, String> {
    let some = |s: &str| Some(s.to_owned());
    Ok(Sample {
        identity: Identity {
            principal: principal(kind)?,
            method: "mtls",
            aws: Some(AwsFacts {
                access_key_id: "AKIDSAMPLE".into(),
                org_id: some("o-sample"),
                tags: [("team".to_owned(), "orders".to_owned())].into(),
                presigned: false,
            }),
            jwt: Some(Arc::new(Claims {
                iss: "https://issuer.example".into(),
                sub: some("sub"),
                aud: vec!["orders".into()],
                exp: 0,
                kubernetes: Some(K8sClaims {
                    namespace: some("ns"),
                    pod_name: some("pod"),
                    pod_uid: some("uid"),
                    service_account_uid: some("sa-uid"),
                }),
                selected: [("groups".to_owned(), vec!["g".to_owned()])].into(),
            })),
        },
        conn: ConnInfo::new(
            ([127, 0, 0, 1], 1).into(),
            ([127, 0, 0, 1], 2).into(),
            Some(TlsInfo {
                version: "TLSv1.3",
                peer: Some(PeerCert::Spiffe(SpiffeId::parse(
                    "spiffe://sample.example/peer",
                )?)),
            }),
        ),
        service_arn: Some("arn:aws:vpc-lattice:us-east-1:123456789012:service/svc-1"),
        network_arn: Some("arn:aws:vpc-lattice:us-east-1:123456789012:servicenetwork/sn-1"),
    })
}

fn k8s(s: &mut Sample) -> Option<&mut K8sClaims> {
    jwt(s)?.kubernetes.as_mut()
}

fn jwt(s: &mut Sample) -> Option<&mut Claims> {
    s.identity.jwt.as_mut().map(Arc::make_mut)
}

/// Each takes one optional attribute away (a no-op where it is not there).
const REMOVALS: [fn(&mut Sample); 14] = [
    |s| s.service_arn = None,
    |s| s.network_arn = None,
    |s| s.conn.tls = None,
    |s| s.conn.tls.iter_mut().for_each(|t| t.peer = None),
    |s| s.identity.aws = None,
    |s| s.identity.aws.iter_mut().for_each(|a| a.org_id = None),
    |s| {
        if let Principal::Aws(p) = &mut s.identity.principal {
            p.session_name = None;
        }
    },
    |s| s.identity.jwt = None,
    |s| jwt(s).into_iter().for_each(|j| j.sub = None),
    |s| jwt(s).into_iter().for_each(|j| j.kubernetes = None),
    |s| k8s(s).into_iter().for_each(|k| k.namespace = None),
    |s| k8s(s).into_iter().for_each(|k| k.pod_name = None),
    |s| k8s(s).into_iter().for_each(|k| k.pod_uid = None),
    |s| {
        k8s(s)
            .into_iter()
            .for_each(|k| k.service_account_uid = None)
    },
];

/// For each principal kind, whether every request of `method` with that
/// kind conforms to `schema`.
pub(super) fn prove(
    schema: &ValidatorSchema,
    fixed: &Fixed<'_>,
    method: &str,
) -> Result<[bool; KINDS], String> {
    let headers = HeaderMap::new();
    let mut proved = [false; KINDS];
    for (kind, slot) in proved.iter_mut().enumerate() {
        let mut samples = vec![fullest(kind)?];
        for remove in REMOVALS {
            let mut s = fullest(kind)?;
            remove(&mut s);
            samples.push(s);
        }
        *slot = samples.iter().all(|s| {
            let fixed = Fixed {
                service_arn: None,
                network_arn: s.network_arn,
                ..*fixed
            };
            let input = AuthzInput {
                identity: &s.identity,
                method,
                path: "/sample/path",
                query: Some("a=1"),
                headers: &headers,
                host: Some("sample.example"),
                conn: &s.conn,
                service: None,
                service_arn: s.service_arn,
            };
            request::build(&fixed, &input).is_ok_and(|built| {
                ast::Request::new(
                    (built.principal, None),
                    (built.action, None),
                    (built.resource, None),
                    built.context,
                    Some(schema),
                    Extensions::all_available(),
                )
                .is_ok()
            })
        });
    }
    Ok(proved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::PolicySnapshot;
    use crate::error::ProxyError;

    use crate::authz::testing::SHIPPED;

    /// A set that permits everything, under `schema`.
    fn snapshot(schema: &str) -> PolicySnapshot {
        crate::authz::testing::snapshot(schema, "permit (principal, action, resource);")
    }

    fn decide(set: &PolicySnapshot, s: &Sample) -> Result<bool, ProxyError> {
        let headers = HeaderMap::new();
        set.decide(&AuthzInput {
            identity: &s.identity,
            method: "GET",
            path: "/a",
            query: None,
            headers: &headers,
            host: None,
            conn: &s.conn,
            service: None,
            service_arn: s.service_arn,
        })
        .map(|d| d.allow)
    }

    fn proved(set: &PolicySnapshot, method: &str) -> [bool; KINDS] {
        set.actions.get(method).expect("action").proved
    }

    #[test]
    fn the_shipped_schema_is_proved_for_every_action_and_principal() {
        let set = snapshot(SHIPPED);
        assert_eq!(set.actions.len(), 7);
        for method in set.actions.keys() {
            assert_eq!(proved(&set, method), [true; KINDS], "{method}");
        }
        let s = fullest(2).expect("sample");
        assert!(decide(&set, &s).expect("decide"));
    }

    #[test]
    fn kinds_are_numbered_as_the_samples_are() {
        for kind in 0..KINDS {
            assert_eq!(request::kind(&principal(kind).expect("principal")), kind);
        }
    }

    #[test]
    fn a_required_attribute_the_proxy_may_omit_is_not_proved_and_is_checked_per_request() {
        // `tls` required: a plaintext request cannot conform.
        let set = snapshot(&SHIPPED.replace("tls?: Tls", "tls: Tls"));
        assert_eq!(proved(&set, "GET"), [false; KINDS]);
        let mut s = fullest(2).expect("sample");
        assert_eq!(decide(&set, &s).ok(), Some(true));
        s.conn.tls = None;
        assert!(matches!(decide(&set, &s), Err(ProxyError::Forbidden)));

        // Nested: a token's `kubernetes.namespace` required.
        let set = snapshot(&SHIPPED.replace("namespace?: String", "namespace: String"));
        assert_eq!(proved(&set, "GET"), [false; KINDS]);
        let mut s = fullest(3).expect("sample");
        assert_eq!(decide(&set, &s).ok(), Some(true));
        k8s(&mut s).expect("k8s").namespace = None;
        assert!(matches!(decide(&set, &s), Err(ProxyError::Forbidden)));
    }

    #[test]
    fn a_principal_type_an_action_does_not_apply_to_is_refused() {
        let set = snapshot(&SHIPPED.replace(", Warden::Anonymous]", "]"));
        assert_eq!(proved(&set, "GET"), [true, true, true, true, true, false]);
        assert!(matches!(
            decide(&set, &fullest(5).expect("sample")),
            Err(ProxyError::Forbidden)
        ));
        assert_eq!(decide(&set, &fullest(0).expect("sample")).ok(), Some(true));
    }

    #[test]
    fn an_undeclared_attribute_is_not_proved() {
        // The proxy sends `service_network_arn`; a schema without it rejects it.
        let set = snapshot(&SHIPPED.replace("service_network_arn?: String,", ""));
        assert_eq!(proved(&set, "GET"), [false; KINDS]);
    }
}
