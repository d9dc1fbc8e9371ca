//! One HTTP request as Cedar's request, entities and context.
//!
//! Built in Cedar's core types, because the public constructors do work per
//! call that a proxy must not repeat per request: they parse every type name
//! and the `ip` function's name, evaluate every value, and compute the
//! transitive closure of the entity graph. Here type names are parsed once per
//! policy set ([`Names`]), values are built directly, and every entity is
//! handed over with its ancestors already closed (the graph is a few fixed
//! chains: principal → account → org, path → prefixes and service).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use cedar_policy_core::ast::{
    Context, Eid, Entity, EntityType, EntityUID, Name, PartialValue, Value,
};
use cedar_policy_core::entities::{Entities, NoEntitiesSchema, TCComputation};
use cedar_policy_core::extensions::Extensions;
use http::HeaderMap;

use super::AuthzInput;
use crate::authn::{Identity, Principal};

/// Every entity type and function name a request uses, parsed once.
pub(super) struct Names {
    aws_role: EntityType,
    aws_user: EntityType,
    aws_account: EntityType,
    aws_org: EntityType,
    spiffe_id: EntityType,
    spiffe_trust_domain: EntityType,
    k8s_service_account: EntityType,
    k8s_namespace: EntityType,
    k8s_cluster: EntityType,
    oidc_subject: EntityType,
    oidc_issuer: EntityType,
    anonymous: EntityType,
    service: EntityType,
    path: EntityType,
    headers: EntityType,
    query: EntityType,
    claims: EntityType,
    ip: Name,
}

impl Names {
    pub(super) fn new() -> Result<Self, String> {
        let ty = |s: &str| -> Result<EntityType, String> {
            s.parse().map_err(|e| format!("entity type `{s}`: {e}"))
        };
        Ok(Self {
            aws_role: ty("Aws::Role")?,
            aws_user: ty("Aws::User")?,
            aws_account: ty("Aws::Account")?,
            aws_org: ty("Aws::Org")?,
            spiffe_id: ty("Spiffe::Id")?,
            spiffe_trust_domain: ty("Spiffe::TrustDomain")?,
            k8s_service_account: ty("K8s::ServiceAccount")?,
            k8s_namespace: ty("K8s::Namespace")?,
            k8s_cluster: ty("K8s::Cluster")?,
            oidc_subject: ty("Oidc::Subject")?,
            oidc_issuer: ty("Oidc::Issuer")?,
            anonymous: ty("Warden::Anonymous")?,
            service: ty("Http::Service")?,
            path: ty("Http::Path")?,
            headers: ty("Http::Headers")?,
            query: ty("Http::Query")?,
            claims: ty("Warden::Claims")?,
            ip: Name::parse_unqualified_name("ip").map_err(|e| e.to_string())?,
        })
    }

    fn principal_type(&self, p: &Principal) -> &EntityType {
        // In the order of [`kind`].
        match p {
            Principal::Aws(a) => match a.kind {
                crate::authn::AwsKind::Role => &self.aws_role,
                crate::authn::AwsKind::User => &self.aws_user,
            },
            Principal::Spiffe(_) => &self.spiffe_id,
            Principal::K8s { .. } => &self.k8s_service_account,
            Principal::Oidc { .. } => &self.oidc_subject,
            Principal::Anonymous => &self.anonymous,
        }
    }

    /// `Http::Service::"<name>"`, which every path is in.
    pub(super) fn service_entity(&self, name: &str) -> Arc<Entity> {
        Arc::new(Entity::with_uid(uid(&self.service, name)))
    }
}

/// How many principal types there are.
pub(super) const KINDS: usize = 6;

/// The principal's type as an index: Aws::Role, Aws::User, Spiffe::Id,
/// K8s::ServiceAccount, Oidc::Subject, Warden::Anonymous.
pub(super) fn kind(p: &Principal) -> usize {
    match p {
        Principal::Aws(a) => match a.kind {
            crate::authn::AwsKind::Role => 0,
            crate::authn::AwsKind::User => 1,
        },
        Principal::Spiffe(_) => 2,
        Principal::K8s { .. } => 3,
        Principal::Oidc { .. } => 4,
        Principal::Anonymous => 5,
    }
}

fn uid(ty: &EntityType, id: &str) -> EntityUID {
    EntityUID::from_components(ty.clone(), Eid::new(id), None)
}

/// An entity with its direct parents and its further ancestors, already closed.
fn entity(
    me: EntityUID,
    parents: impl IntoIterator<Item = EntityUID>,
    further: impl IntoIterator<Item = EntityUID>,
    tags: BTreeMap<String, Value>,
) -> Arc<Entity> {
    Arc::new(Entity::new_with_attr_partial_value(
        me,
        [],
        further.into_iter().collect(),
        parents.into_iter().collect(),
        tags.into_iter()
            .map(|(k, v)| (k.into(), PartialValue::Value(v))),
    ))
}

/// Which request data the policy set can read at all. A policy reaches a
/// tag only by naming its entity (`context.headers`, `Http::Headers`), so a
/// set whose text never names one cannot observe its tags, and they are not
/// built.
#[derive(Debug, Clone, Copy)]
pub(super) struct Reads {
    pub headers: bool,
    pub query: bool,
    pub claims: bool,
}

impl Reads {
    /// Conservative: any mention, in any case, counts.
    pub(super) fn of<'a>(texts: impl IntoIterator<Item = &'a str>) -> Self {
        let mut reads = Self {
            headers: false,
            query: false,
            claims: false,
        };
        for text in texts {
            let text = text.to_ascii_lowercase();
            reads.headers |= text.contains("headers");
            reads.query |= text.contains("query");
            reads.claims |= text.contains("claims");
        }
        reads
    }
}

/// What a built request is evaluated with.
pub(super) struct Built {
    pub principal: EntityUID,
    pub action: EntityUID,
    pub resource: EntityUID,
    pub context: Context,
    pub entities: Entities,
}

/// The fixed parts of a policy set that every request shares.
#[derive(Clone, Copy)]
pub(super) struct Fixed<'a> {
    pub names: &'a Names,
    pub reads: Reads,
    /// The action and the `Action::"invoke"` group it is in.
    pub actions: &'a [Arc<Entity>],
    /// `Http::Service::"<[service] name>"`.
    pub service: &'a Arc<Entity>,
    pub service_arn: Option<&'a str>,
    pub network_arn: Option<&'a str>,
}

pub(super) fn build(fixed: &Fixed<'_>, input: &AuthzInput<'_>) -> Result<Built, String> {
    let names = fixed.names;
    let action = fixed
        .actions
        .first()
        .map(|a| a.uid().clone())
        .ok_or("no action entity")?;
    let mut entities: Vec<Arc<Entity>> = Vec::with_capacity(12);
    entities.extend(fixed.actions.iter().cloned());
    let principal = principal_entities(names, input.identity, &mut entities);
    let service = match input.service {
        Some(name) => names.service_entity(name),
        None => fixed.service.clone(),
    };
    let resource = path_entity(names, input.path, service.uid().clone());
    entities.push(service);
    let resource_uid = resource.uid().clone();
    entities.push(resource);
    let context = context(fixed, input, &mut entities)?;
    let entities = Entities::new()
        .add_entities(
            entities,
            None::<&NoEntitiesSchema>,
            TCComputation::AssumeAlreadyComputed,
            Extensions::all_available(),
        )
        .map_err(|e| e.to_string())?;
    Ok(Built {
        principal,
        action,
        resource: resource_uid,
        context,
        entities,
    })
}

/// The principal and its parent chain (DESIGN §5).
fn principal_entities(names: &Names, identity: &Identity, out: &mut Vec<Arc<Entity>>) -> EntityUID {
    let (_, id) = identity.principal.uid();
    let me = uid(names.principal_type(&identity.principal), &id);
    let none = || Vec::<EntityUID>::new();
    let mut tags = BTreeMap::new();
    let (parents, further) = match &identity.principal {
        Principal::Aws(p) => {
            let account = uid(&names.aws_account, &p.account);
            let org = identity.org_id().map(|o| uid(&names.aws_org, o));
            if let Some(org) = &org {
                out.push(entity(org.clone(), none(), none(), BTreeMap::new()));
            }
            out.push(entity(
                account.clone(),
                org.clone(),
                none(),
                BTreeMap::new(),
            ));
            if let Some(aws) = &identity.aws {
                tags = aws
                    .tags
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
                    .collect();
            }
            (vec![account], org.into_iter().collect())
        }
        Principal::Spiffe(sid) => {
            let td = uid(&names.spiffe_trust_domain, sid.trust_domain());
            out.push(entity(td.clone(), none(), none(), BTreeMap::new()));
            (vec![td], none())
        }
        Principal::K8s {
            namespace, cluster, ..
        } => {
            let cl = uid(&names.k8s_cluster, cluster);
            let ns = uid(&names.k8s_namespace, namespace);
            out.push(entity(cl.clone(), none(), none(), BTreeMap::new()));
            out.push(entity(ns.clone(), [cl.clone()], none(), BTreeMap::new()));
            (vec![ns], vec![cl])
        }
        Principal::Oidc { iss, .. } => {
            let is = uid(&names.oidc_issuer, iss);
            out.push(entity(is.clone(), none(), none(), BTreeMap::new()));
            (vec![is], none())
        }
        Principal::Anonymous => (none(), none()),
    };
    out.push(entity(me.clone(), parents, further, tags));
    me
}

/// The resource `Http::Path::"<path>"`, in its segment-aware prefixes and in
/// the service. The prefixes are ancestors only: no policy can tell them
/// apart from entities with no parents of their own.
fn path_entity(names: &Names, path: &str, service: EntityUID) -> Arc<Entity> {
    let mut parents = HashSet::with_capacity(8);
    parents.insert(service);
    if !path.ends_with('/') {
        parents.insert(uid(&names.path, &format!("{path}/")));
    }
    for (i, _) in path.match_indices('/') {
        let prefix = &path[..=i];
        if prefix != path {
            parents.insert(uid(&names.path, prefix));
        }
    }
    entity(uid(&names.path, path), parents, [], BTreeMap::new())
}

fn set(values: &[String]) -> Value {
    Value::set(values.iter().map(|v| Value::from(v.as_str())), None)
}

/// A tag entity (`Http::Headers`, `Http::Query`, `Warden::Claims`) named
/// `"request"`; its tags only when the policy set reads them.
fn tag_entity(
    ty: &EntityType,
    read: bool,
    tags: impl FnOnce() -> BTreeMap<String, Vec<String>>,
    out: &mut Vec<Arc<Entity>>,
) -> Value {
    let me = uid(ty, "request");
    let tags = if read {
        tags().into_iter().map(|(k, vs)| (k, set(&vs))).collect()
    } else {
        BTreeMap::new()
    };
    out.push(entity(me.clone(), [], [], tags));
    Value::from(me)
}

fn record<'a>(fields: impl IntoIterator<Item = (&'a str, Value)>) -> Value {
    Value::record(fields, None)
}

fn context(
    fixed: &Fixed<'_>,
    input: &AuthzInput<'_>,
    entities: &mut Vec<Arc<Entity>>,
) -> Result<Context, String> {
    let names = fixed.names;
    let s = |v: &str| Value::from(v);
    let source_ip = Extensions::all_available()
        .func(&names.ip)
        .map_err(|e| e.to_string())?
        .call(&[Value::from(input.conn.peer.ip().to_string())])
        .map_err(|e| e.to_string())
        .and_then(|v| Value::try_from(v).map_err(|e| e.to_string()))?;
    let reads = fixed.reads;
    let headers = tag_entity(
        &names.headers,
        reads.headers,
        || header_tags(input.headers),
        entities,
    );
    let query = tag_entity(
        &names.query,
        reads.query,
        || query_tags(input.query),
        entities,
    );
    let mut ctx: BTreeMap<_, Value> = BTreeMap::new();
    let mut put = |k: &str, v: Value| {
        ctx.insert(k.into(), v);
    };
    put("method", s(input.method));
    put("path", s(input.path));
    put("host", s(input.host.unwrap_or("")));
    put("port", Value::from(i64::from(input.conn.local.port())));
    put("source_ip", source_ip);
    put("authn", s(input.identity.method));
    put("headers", headers);
    put("query", query);
    if let Some(arn) = input.service_arn.or(fixed.service_arn) {
        put("service_arn", s(arn));
    }
    if let Some(arn) = fixed.network_arn {
        put("service_network_arn", s(arn));
    }
    if let Some(tls) = &input.conn.tls {
        let mut rec = vec![("version", s(tls.version))];
        let peer = match &tls.peer {
            Some(crate::trace::PeerCert::Spiffe(id)) => Some(id.to_string()),
            _ => None,
        };
        if let Some(id) = &peer {
            rec.push(("peer_spiffe_id", s(id)));
        }
        put("tls", record(rec));
    }
    if let (Some(aws), Principal::Aws(p)) = (&input.identity.aws, &input.identity.principal) {
        let mut rec = vec![
            ("access_key_id", s(&aws.access_key_id)),
            ("account", s(&p.account)),
            ("principal_arn", s(&p.arn)),
            ("presigned", Value::from(aws.presigned)),
        ];
        if let Some(org) = &aws.org_id {
            rec.push(("org_id", s(org)));
        }
        if let Some(sess) = &p.session_name {
            rec.push(("session_name", s(sess)));
        }
        put("aws", record(rec));
    }
    if let Some(claims) = &input.identity.jwt {
        let selected = tag_entity(
            &names.claims,
            reads.claims,
            || claims.selected.clone(),
            entities,
        );
        let mut rec = vec![
            ("iss", s(&claims.iss)),
            ("aud", set(&claims.aud)),
            ("claims", selected),
        ];
        if let Some(sub) = &claims.sub {
            rec.push(("sub", s(sub)));
        }
        if let Some(k) = &claims.kubernetes {
            let fields = [
                ("namespace", &k.namespace),
                ("pod_name", &k.pod_name),
                ("pod_uid", &k.pod_uid),
                ("service_account_uid", &k.service_account_uid),
            ];
            rec.push((
                "kubernetes",
                record(
                    fields
                        .into_iter()
                        .filter_map(|(n, v)| v.as_deref().map(|v| (n, s(v)))),
                ),
            ));
        }
        put("jwt", record(rec));
    }
    Ok(Context::Value(Arc::new(ctx)))
}

/// Header name -> all its values (values that are not UTF-8 are left out).
fn header_tags(headers: &HeaderMap) -> BTreeMap<String, Vec<String>> {
    let mut tags: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in headers {
        if let Ok(v) = value.to_str() {
            tags.entry(name.as_str().to_owned())
                .or_default()
                .push(v.to_owned());
        }
    }
    tags
}

/// Query key -> all its values, percent-decoded.
fn query_tags(query: Option<&str>) -> BTreeMap<String, Vec<String>> {
    let mut tags: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let dec = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        tags.entry(dec(k)).or_default().push(dec(v));
    }
    tags
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_that_never_names_request_data_does_not_read_it() {
        let r =
            Reads::of(["permit (principal, action, resource) when { context.authn == \"mtls\" };"]);
        assert!(!r.headers && !r.query && !r.claims);
        // Every way to reach a tag entity names it: attribute, index, type.
        for (text, headers, query, claims) in [
            ("context.headers.hasTag(\"x\")", true, false, false),
            ("context[\"Headers\"].hasTag(\"x\")", true, false, false),
            ("Http::Query::\"request\".getTag(\"a\")", false, true, false),
            ("context.jwt.claims.hasTag(\"groups\")", false, false, true),
            (
                "Warden::Claims::\"request\".hasTag(\"g\")",
                false,
                false,
                true,
            ),
        ] {
            let r = Reads::of(["permit (principal, action, resource);", text]);
            assert_eq!(
                (r.headers, r.query, r.claims),
                (headers, query, claims),
                "{text}"
            );
        }
    }
}
