//! Which policies can apply to a request, found without evaluating the rest.
//!
//! A policy whose scope does not match a request is neither satisfied nor in
//! error (scope constraints compare entity identities and cannot fail), so
//! leaving it out changes nothing in Cedar's answer. Per action, policies are
//! filed under the entity their principal constraint names (`principal ==
//! E`, `principal in E`, `principal is T in E`); a request then evaluates only
//! the unfiled policies and those filed under its principal or one of the
//! principal's ancestors. The decision is combined as Cedar's authorizer
//! does: any satisfied `forbid` denies, else any satisfied `permit` allows,
//! else deny; a policy that fails to evaluate is skipped and reported.
//!
//! A candidate's scope is then checked directly, as its expression would
//! evaluate, and only its `when`/`unless` body goes through Cedar's
//! evaluator: no condition expression is built or kept per policy.

use std::collections::HashMap;
use std::sync::Arc;

use cedar_policy_core::ast::{
    ActionConstraint, Effect, Entity, EntityReference, EntityUID, Literal, Policy, PolicyID,
    PrincipalOrResourceConstraint, Request, ValueKind,
};
use cedar_policy_core::authorizer::AuthorizationError;
use cedar_policy_core::entities::{Dereference, Entities};
use cedar_policy_core::evaluator::Evaluator;
use cedar_policy_core::extensions::Extensions;

/// One action's policies, filed by the principal they name.
#[derive(Debug, Default)]
pub(super) struct Slice {
    unfiled: Vec<usize>,
    /// Keyed by the policies' own (shared) entity ids.
    by_principal: HashMap<Arc<EntityUID>, Vec<usize>>,
}

/// Every policy of the set, and what a request's evaluation found.
pub(super) struct Outcome {
    pub allow: bool,
    pub reasons: Vec<PolicyID>,
    pub errors: Vec<AuthorizationError>,
}

/// Whether an action constraint admits `action` (whose ancestors are closed).
fn admits(constraint: &ActionConstraint, action: &Entity) -> bool {
    let is = |uid: &EntityUID| uid == action.uid() || action.is_descendant_of(uid);
    match constraint {
        ActionConstraint::Eq(uid) => is(uid),
        ActionConstraint::In(uids) => uids.iter().any(|u| is(u)),
        // Anything else (including constraints this version adds): keep it.
        _ => true,
    }
}

impl Slice {
    /// The policies that can apply to `action`.
    pub(super) fn new(policies: &[Policy], action: &Entity) -> Self {
        let mut slice = Self::default();
        for (i, p) in policies.iter().enumerate() {
            if !admits(p.action_constraint(), action) {
                continue;
            }
            let named = match p.principal_constraint().as_inner() {
                PrincipalOrResourceConstraint::Eq(EntityReference::EUID(e))
                | PrincipalOrResourceConstraint::In(EntityReference::EUID(e))
                | PrincipalOrResourceConstraint::IsIn(_, EntityReference::EUID(e)) => {
                    Some(Arc::clone(e))
                }
                _ => None,
            };
            match named {
                Some(e) => slice.by_principal.entry(e).or_default().push(i),
                None => slice.unfiled.push(i),
            }
        }
        slice
    }

    /// The candidate policies for `principal`, in set order.
    fn candidates(&self, principal: &EntityUID, entities: &Entities) -> Vec<usize> {
        let mut out = self.unfiled.clone();
        out.extend(self.by_principal.get(principal).into_iter().flatten());
        if let Dereference::Data(e) = entities.entity(principal) {
            for a in e.ancestors() {
                out.extend(self.by_principal.get(a).into_iter().flatten());
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Evaluates the candidates for `request`.
    pub(super) fn authorize(
        &self,
        policies: &[Policy],
        (principal, resource): (&EntityUID, &EntityUID),
        request: Request,
        entities: &Entities,
    ) -> Outcome {
        let candidates = self.candidates(principal, entities);
        let eval = Evaluator::new(request, entities, Extensions::all_available());
        let mut permits = Vec::new();
        let mut forbids = Vec::new();
        let mut errors = Vec::new();
        for p in candidates.into_iter().filter_map(|i| policies.get(i)) {
            let scope = match (
                in_scope(
                    p.template().principal_constraint().as_inner(),
                    principal,
                    entities,
                ),
                decided_action(p.action_constraint()),
                in_scope(
                    p.template().resource_constraint().as_inner(),
                    resource,
                    entities,
                ),
            ) {
                (Some(principal), true, Some(resource)) => Some(principal && resource),
                _ => None,
            };
            // The condition is `principal && action && resource && body`:
            // a scope that does not match leaves the body unevaluated.
            let satisfied = match (scope, p.non_scope_constraints()) {
                (Some(false), _) => Ok(false),
                (Some(true), None) => Ok(true),
                (Some(true), Some(body)) => match eval.interpret(body, p.env()) {
                    Ok(v) => match v.value_kind() {
                        ValueKind::Lit(Literal::Bool(b)) => Ok(*b),
                        _ => eval.evaluate(p),
                    },
                    Err(error) => Err(error),
                },
                // A scope this module cannot check: Cedar's own path.
                (None, _) => eval.evaluate(p),
            };
            match satisfied {
                Ok(true) => match p.effect() {
                    Effect::Permit => permits.push(p.id().clone()),
                    Effect::Forbid => forbids.push(p.id().clone()),
                },
                Ok(false) => {}
                Err(error) => errors.push(AuthorizationError::PolicyEvaluationError {
                    id: p.id().clone(),
                    error,
                }),
            }
        }
        let (allow, reasons) = if !forbids.is_empty() {
            (false, forbids)
        } else {
            (!permits.is_empty(), permits)
        };
        Outcome {
            allow,
            reasons,
            errors,
        }
    }
}

/// Whether `uid` meets a principal or resource scope constraint, as the
/// constraint's expression (`==`, `in`, `is`, `is .. in`) evaluates: such an
/// expression cannot fail. `None` for a slot, which a set without templates
/// never holds.
fn in_scope(
    constraint: &PrincipalOrResourceConstraint,
    uid: &EntityUID,
    entities: &Entities,
) -> Option<bool> {
    let is_in = |target: &EntityReference| match target {
        EntityReference::EUID(target) => Some(
            uid == target.as_ref()
                || matches!(entities.entity(uid), Dereference::Data(e) if e.is_descendant_of(target)),
        ),
        EntityReference::Slot(_) => None,
    };
    match constraint {
        PrincipalOrResourceConstraint::Any => Some(true),
        PrincipalOrResourceConstraint::Eq(EntityReference::EUID(target)) => {
            Some(uid == target.as_ref())
        }
        PrincipalOrResourceConstraint::Eq(EntityReference::Slot(_)) => None,
        PrincipalOrResourceConstraint::In(target) => is_in(target),
        PrincipalOrResourceConstraint::Is(ty) => Some(uid.entity_type() == ty.as_ref()),
        PrincipalOrResourceConstraint::IsIn(ty, target) => {
            if uid.entity_type() == ty.as_ref() {
                is_in(target)
            } else {
                Some(false)
            }
        }
    }
}

/// Whether a slice's admission ([`admits`]) already decided the action
/// constraint, which is then true for every policy in the slice.
fn decided_action(constraint: &ActionConstraint) -> bool {
    matches!(
        constraint,
        ActionConstraint::Any | ActionConstraint::Eq(_) | ActionConstraint::In(_)
    )
}

#[cfg(test)]
mod tests {
    use crate::authz::shape::fullest;
    use crate::authz::testing::{reference, snapshot, SHIPPED};
    use crate::authz::AuthzInput;
    use crate::error::ProxyError;

    /// Scopes of every shape, forbids, an evaluation error, and filler
    /// policies filed under principals no request is.
    fn policies() -> String {
        let mut set = String::from(
            r#"
@id("role-get") permit (principal == Aws::Role::"arn:aws:iam::123456789012:role/sample", action == Action::"GET", resource in Http::Path::"/sample/");
@id("org-write") permit (principal in Aws::Org::"o-sample", action in [Action::"POST", Action::"PUT"], resource);
@id("account-no-delete") forbid (principal in Aws::Account::"123456789012", action == Action::"DELETE", resource);
@id("td-any") permit (principal is Spiffe::Id in Spiffe::TrustDomain::"sample.example", action in Action::"invoke", resource);
@id("spiffe-no-admin") forbid (principal is Spiffe::Id, action, resource) when { context.path like "/admin/*" };
@id("cluster-get") permit (principal in K8s::Cluster::"cluster", action == Action::"GET", resource);
@id("anon-head") permit (principal, action, resource) when { context.authn == "none" && context.method == "HEAD" };
@id("oidc-overflow") forbid (principal == Oidc::Subject::"sub", action, resource) when { context.port * 4611686018427387904 > 0 };
@id("issuer-any") permit (principal in Oidc::Issuer::"https://issuer.example", action, resource);
@id("anon-options") permit (principal == Warden::Anonymous::"anonymous", action == Action::"OPTIONS", resource);
@id("role-is") permit (principal is Aws::Role, action == Action::"PATCH", resource in Http::Path::"/admin/");
@id("glass") permit (principal, action == Action::"DELETE", resource) when { context.headers.hasTag("x-break-glass") };
@id("tenant") forbid (principal, action == Action::"PUT", resource) when { context.headers.hasTag("x-tenant") && context.headers.getTag("x-tenant").contains("evil") };
@id("debug") permit (principal, action == Action::"HEAD", resource in Http::Path::"/sample/path/") when { context.query.hasTag("debug") };
@id("no-dir") forbid (principal, action == Action::"GET", resource in Http::Path::"/admin") when { context.query.hasTag("debug") };
@id("admin-exact") forbid (principal is K8s::ServiceAccount in K8s::Namespace::"ns", action, resource == Http::Path::"/admin");
@id("user-in-account") permit (principal is Aws::User in Aws::Account::"123456789012", action, resource);
@id("sample-paths") permit (principal is Spiffe::Id, action == Action::"POST", resource is Http::Path in Http::Path::"/sample/");
@id("jwt-options") permit (principal, action == Action::"OPTIONS", resource) when { context has jwt && context.jwt.iss == "https://issuer.example" };
@id("tls13-patch") forbid (principal, action == Action::"PATCH", resource) when { context has tls && context.tls.version == "TLSv1.3" && context.path == "/admin" };
@id("scope-first") forbid (principal, action, resource == Http::Path::"/nowhere") when { context.port * 4611686018427387904 > 0 };
"#,
        );
        for i in 0..50 {
            set.push_str(&format!(
                "@id(\"filler-{i}\") forbid (principal == Aws::Role::\"arn:aws:iam::123456789012:role/other-{i}\", action, resource);\n"
            ));
        }
        set
    }

    #[test]
    fn the_index_decides_as_cedar_does_over_the_whole_set() {
        // The second set computes a tag key, so every tag is built for it.
        let computed = "@id(\"computed\") permit (principal, action == Action::\"PATCH\", resource) when { context.headers.hasTag(context.host) };\n";
        let mut some_headers = http::HeaderMap::new();
        for (k, v) in [
            ("x-break-glass", "1"),
            ("x-tenant", "evil"),
            ("host", "x-other"),
            ("x-other", "1"),
        ] {
            some_headers.insert(k, http::HeaderValue::from_static(v));
        }
        let mut other_tenant = some_headers.clone();
        other_tenant.insert("x-tenant", http::HeaderValue::from_static("good"));
        let (mut allowed, mut forbidden, mut failed) = (0, 0, 0);
        for src in [policies(), policies() + computed] {
            let set = snapshot(SHIPPED, &src);
            let whole = reference(&src);
            for kind in 0..crate::authz::request::KINDS {
                let mut s = fullest(kind).expect("sample");
                if kind == 5 {
                    s.identity.method = "none";
                }
                for method in ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
                    for path in ["/sample/path", "/admin/x", "/admin", "/"] {
                        for headers in [&http::HeaderMap::new(), &some_headers, &other_tenant] {
                            for query in [None, Some("debug=1&x=%41")] {
                                let input = AuthzInput {
                                    identity: &s.identity,
                                    method,
                                    path,
                                    query,
                                    headers,
                                    host: headers.get("host").and_then(|h| h.to_str().ok()),
                                    conn: &s.conn,
                                    service: None,
                                    service_arn: None,
                                };
                                let d = set.decide(&input).map_err(|e: ProxyError| e.to_string());
                                let d = d.expect("decide");
                                let mut reasons = d.policies.to_vec();
                                reasons.sort();
                                let mut errs: Vec<String> = d
                                    .errors
                                    .iter()
                                    .filter_map(|e| e.split('`').nth(1).map(str::to_owned))
                                    .collect();
                                errs.sort();
                                let want = set.decide_reference(&whole, &input);
                                assert_eq!(
                                    (d.allow, reasons.clone(), errs.clone()),
                                    want,
                                    "kind {kind} {method} {path} {headers:?} {query:?}"
                                );
                                allowed += usize::from(d.allow);
                                forbidden += usize::from(!d.allow && !reasons.is_empty());
                                failed += usize::from(!errs.is_empty());
                            }
                        }
                    }
                }
            }
        }
        // The grid exercises every outcome.
        assert!(
            allowed > 10 && forbidden > 3 && failed > 3,
            "{allowed} {forbidden} {failed}"
        );
    }
}
