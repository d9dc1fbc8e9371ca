//! One HTTP request as Cedar's request, entities and context.
//!
//! Built in Cedar's core types, because the public constructors do work per
//! call that a proxy must not repeat per request: they parse every type name
//! and the `ip` function's name, evaluate every value, and compute the
//! transitive closure of the entity graph. Here type names are parsed once per
//! policy set ([`Names`]), values are built directly, and every entity is
//! handed over with its ancestors already closed (the graph is a few fixed
//! chains: principal → account → org, path → prefixes and service).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use cedar_policy_core::ast::{
    BinaryOp, Context, Eid, Entity, EntityType, EntityUID, Expr, ExprKind, Literal, Name,
    PartialValue, Policy, Value, Var,
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

/// What of the request a policy set can observe beyond its scope, read from
/// the policies' syntax so that a request builds no more than that.
///
/// - A tag is reached only by `hasTag`/`getTag`. When every key they are given
///   is a string literal, only tags with those keys are built; with no key at
///   all, the tag entities are left out too (on a missing entity `hasTag` is
///   false and `has` false, as on an empty one; `getTag` and attribute access
///   fail either way).
/// - A path prefix is observable only as the right side of `in`, where it can
///   only come from an `Http::Path` literal or a template slot: request data
///   holds no path entities, and actions hold no attributes (the Cedar schema
///   format, the one warden loads, cannot declare any). Prefixes no policy
///   names are not built.
/// - A context attribute is observable only through `context.a`, `context
///   has a` (or `has a.b`); when `context` appears nowhere else, attributes no
///   policy names are left out (see [`Fixed::trim_context`]). A tag entity is
///   also reachable by its uid (`Http::Headers::"request"`): such a literal
///   names the attribute that holds the entity.
#[derive(Debug, Default)]
pub(super) struct Needs {
    /// The tag keys, or `None` when some key is computed.
    tags: Option<HashSet<String>>,
    /// The `Http::Path` ids named, or `None` when a slot may name any.
    paths: Option<HashSet<String>>,
    /// The length of the longest of `paths` (`usize::MAX` when any may be
    /// named): no longer prefix of a request's path is looked up, so a path
    /// of many segments costs time linear in its length, not its square.
    longest_path: usize,
    /// The context attributes named, or `None` when the whole record may be
    /// observed.
    context: Option<HashSet<String>>,
}

impl Needs {
    pub(super) fn of(policies: &[Policy], names: &Names) -> Self {
        // The tag entities a request builds, by the context attribute that
        // holds each (`context.jwt.claims` for the claims).
        let held = [
            (&names.headers, "headers"),
            (&names.query, "query"),
            (&names.claims, "jwt"),
        ];
        let mut tags = Some(HashSet::new());
        let mut paths = Some(HashSet::new());
        let mut context = HashSet::new();
        // Every use of `context`, and those that name an attribute.
        let (mut uses, mut named) = (0usize, 0usize);
        let is_context = |e: &Expr| matches!(e.expr_kind(), ExprKind::Var(Var::Context));
        for policy in policies {
            // Built for the walk only: scope and body as one expression.
            let condition = policy.condition();
            for e in condition.subexpressions() {
                match e.expr_kind() {
                    ExprKind::Var(Var::Context) => uses += 1,
                    ExprKind::GetAttr { expr, attr } | ExprKind::HasAttr { expr, attr }
                        if is_context(expr) =>
                    {
                        named += 1;
                        context.insert(attr.to_string());
                    }
                    ExprKind::ExtHasAttr { expr, attrs } if is_context(expr) => {
                        named += 1;
                        context.insert(attrs.first().to_string());
                    }
                    ExprKind::BinaryApp {
                        op: BinaryOp::HasTag | BinaryOp::GetTag,
                        arg2,
                        ..
                    } => match (arg2.expr_kind(), &mut tags) {
                        (ExprKind::Lit(Literal::String(key)), Some(keys)) => {
                            keys.insert(key.to_string());
                        }
                        (ExprKind::Lit(Literal::String(_)), None) => {}
                        _ => tags = None,
                    },
                    ExprKind::Lit(Literal::EntityUID(uid)) if uid.entity_type() == &names.path => {
                        if let Some(paths) = &mut paths {
                            paths.insert(uid.eid().as_ref().to_owned());
                        }
                    }
                    // A tag entity named by its uid, not through `context`:
                    // the attribute that holds it is needed all the same.
                    ExprKind::Lit(Literal::EntityUID(uid)) => {
                        if let Some((_, attr)) =
                            held.iter().find(|(ty, _)| *ty == uid.entity_type())
                        {
                            context.insert((*attr).to_owned());
                        }
                    }
                    ExprKind::Slot(_) => paths = None,
                    _ => {}
                }
            }
        }
        let longest_path = paths.as_ref().map_or(usize::MAX, |ids| {
            ids.iter().map(String::len).max().unwrap_or_default()
        });
        Self {
            tags,
            paths,
            longest_path,
            context: (uses == named).then_some(context),
        }
    }

    /// Everything, as if no policy were known: what the tests compare with.
    #[cfg(test)]
    pub(super) fn all() -> Self {
        Self {
            tags: None,
            paths: None,
            longest_path: usize::MAX,
            context: None,
        }
    }

    /// Whether no policy can observe any context attribute (and so a
    /// trimmed context is empty).
    pub(super) fn no_context(&self) -> bool {
        self.context.as_ref().is_some_and(HashSet::is_empty)
    }

    fn context(&self, attr: &str) -> bool {
        self.context
            .as_ref()
            .is_none_or(|attrs| attrs.contains(attr))
    }

    fn tag(&self, key: &str) -> bool {
        self.tags.as_ref().is_none_or(|keys| keys.contains(key))
    }

    fn any_tag(&self) -> bool {
        self.tags.as_ref().is_none_or(|keys| !keys.is_empty())
    }

    fn path(&self, id: &str) -> bool {
        id.len() <= self.longest_path && self.paths.as_ref().is_none_or(|ids| ids.contains(id))
    }
}

/// How many entities a request adds at most: the principal and two
/// ancestors, the service, the path, and three tag entities.
const ROOM: usize = 8;

/// A method's action, and the entity store every request of that method
/// starts from: the action and the `Action::"invoke"` group it is in, with
/// room for a request's own entities so that adding them never grows the
/// table. (A cloned table keeps its capacity; removing entries never shrinks
/// it.)
pub(super) struct ActionStore {
    uid: EntityUID,
    store: Entities,
}

impl ActionStore {
    pub(super) fn new(
        names: &Names,
        action: Arc<Entity>,
        invoke: Option<Arc<Entity>>,
    ) -> Result<Self, String> {
        let uid = action.uid().clone();
        let room: Vec<EntityUID> = (0..ROOM)
            .map(|i| self::uid(&names.anonymous, &format!("room-{i}")))
            .collect();
        let add = |store: Entities, entities: Vec<Arc<Entity>>| {
            store
                .add_entities(
                    entities,
                    None::<&NoEntitiesSchema>,
                    TCComputation::AssumeAlreadyComputed,
                    Extensions::all_available(),
                )
                .map_err(|e| e.to_string())
        };
        let store = add(
            Entities::new(),
            [action].into_iter().chain(invoke).collect(),
        )?;
        let store = add(
            store,
            room.iter()
                .map(|u| Arc::new(Entity::with_uid(u.clone())))
                .collect(),
        )?
        .remove_entities(room, TCComputation::AssumeAlreadyComputed)
        .map_err(|e| e.to_string())?;
        Ok(Self { uid, store })
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
    pub needs: &'a Needs,
    /// The action, and the store its requests start from.
    pub action: &'a ActionStore,
    /// `Http::Service::"<[service] name>"`.
    pub service: &'a Arc<Entity>,
    pub service_arn: Option<&'a str>,
    pub network_arn: Option<&'a str>,
    /// Leave out the context attributes no policy names ([`Needs`]). Only
    /// for requests whose shape is proved to conform to the schema: one that
    /// is validated instead needs every attribute the schema requires.
    pub trim_context: bool,
}

pub(super) fn build(fixed: &Fixed<'_>, input: &AuthzInput<'_>) -> Result<Built, String> {
    let names = fixed.names;
    let action = fixed.action.uid.clone();
    let mut entities: Vec<Arc<Entity>> = Vec::with_capacity(ROOM);
    let principal = principal_entities(names, &Caller::of(input.identity), &mut entities);
    let service = match input.service {
        Some(name) => names.service_entity(name),
        None => fixed.service.clone(),
    };
    let resource = path_entity(names, fixed.needs, input.path, service.uid().clone());
    entities.push(service);
    let resource_uid = resource.uid().clone();
    entities.push(resource);
    let context = context(fixed, input, &mut entities)?;
    let entities = fixed
        .action
        .store
        .clone()
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

/// All of an identity its principal entities are built from (nothing else
/// of it reaches them), and so all a cached decision keys them by.
pub(super) struct Caller<'a> {
    principal: &'a Principal,
    org: Option<&'a str>,
    tags: Option<&'a BTreeMap<String, String>>,
}

impl<'a> Caller<'a> {
    pub(super) fn of(identity: &'a Identity) -> Self {
        Self {
            principal: &identity.principal,
            org: identity.org_id(),
            tags: identity.aws.as_ref().map(|aws| &aws.tags),
        }
    }

    /// Appends every field, each length-prefixed after the principal's
    /// [`kind`], so two callers append the same bytes only if they are the
    /// same caller.
    fn key(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(kind(self.principal) as u64).to_le_bytes());
        match self.principal {
            Principal::Aws(p) => {
                text(out, &p.arn);
                text(out, &p.account);
                option(out, p.session_name.as_deref());
            }
            Principal::Spiffe(id) => text(out, id.as_str()),
            Principal::K8s {
                namespace,
                name,
                cluster,
            } => {
                text(out, namespace);
                text(out, name);
                text(out, cluster);
            }
            Principal::Oidc { sub, iss } => {
                text(out, sub);
                text(out, iss);
            }
            Principal::Anonymous => {}
        }
        option(out, self.org);
        match self.tags {
            Some(tags) => {
                out.push(1);
                out.extend_from_slice(&(tags.len() as u64).to_le_bytes());
                for (k, v) in tags {
                    text(out, k);
                    text(out, v);
                }
            }
            None => out.push(0),
        }
    }
}

fn text(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn option(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => {
            out.push(1);
            text(out, s);
        }
        None => out.push(0),
    }
}

/// Everything [`build`] reads of a request when the context is left empty
/// (`trim_context` under a set that names no attribute): method, service,
/// path and caller. The key of a cached decision ([`super::cache`]).
pub(super) fn key(input: &AuthzInput<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    text(&mut out, input.method);
    option(&mut out, input.service);
    text(&mut out, input.path);
    Caller::of(input.identity).key(&mut out);
    out
}

/// The principal and its parent chain (DESIGN §5).
fn principal_entities(names: &Names, caller: &Caller<'_>, out: &mut Vec<Arc<Entity>>) -> EntityUID {
    let principal = caller.principal;
    let (_, id) = principal.uid();
    let me = uid(names.principal_type(principal), &id);
    let none = || Vec::<EntityUID>::new();
    let mut tags = BTreeMap::new();
    let (parents, further) = match principal {
        Principal::Aws(p) => {
            let account = uid(&names.aws_account, &p.account);
            let org = caller.org.map(|o| uid(&names.aws_org, o));
            if let Some(org) = &org {
                out.push(entity(org.clone(), none(), none(), BTreeMap::new()));
            }
            out.push(entity(
                account.clone(),
                org.clone(),
                none(),
                BTreeMap::new(),
            ));
            if let Some(aws) = caller.tags {
                tags = aws
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
/// apart from entities with no parents of their own; and only those the
/// policies name ([`Needs`]).
fn path_entity(names: &Names, needs: &Needs, path: &str, service: EntityUID) -> Arc<Entity> {
    let mut parents = HashSet::with_capacity(4);
    parents.insert(service);
    if !path.ends_with('/') && path.len() < needs.longest_path {
        let mut dir = String::with_capacity(path.len() + 1);
        dir.push_str(path);
        dir.push('/');
        if needs.path(&dir) {
            parents.insert(uid(&names.path, &dir));
        }
    }
    for (i, _) in path.match_indices('/') {
        // The prefixes only grow: past the longest id named, none is named.
        if i >= needs.longest_path {
            break;
        }
        let prefix = &path[..=i];
        if prefix != path && needs.path(prefix) {
            parents.insert(uid(&names.path, prefix));
        }
    }
    entity(uid(&names.path, path), parents, [], BTreeMap::new())
}

fn set(values: &[String]) -> Value {
    Value::set(values.iter().map(|v| Value::from(v.as_str())), None)
}

/// A tag entity (`Http::Headers`, `Http::Query`, `Warden::Claims`) named
/// `"request"`, with the tags the policy set can ask for ([`Needs`]).
fn tag_entity(
    ty: &EntityType,
    needs: &Needs,
    tags: impl FnOnce(&dyn Fn(&str) -> bool) -> BTreeMap<String, Vec<String>>,
    out: &mut Vec<Arc<Entity>>,
) -> Value {
    let me = uid(ty, "request");
    if needs.any_tag() {
        let tags = tags(&|key| needs.tag(key))
            .into_iter()
            .map(|(k, vs)| (k, set(&vs)))
            .collect();
        out.push(entity(me.clone(), [], [], tags));
    }
    Value::from(me)
}

fn record<'a>(fields: impl IntoIterator<Item = (&'a str, Value)>) -> Value {
    Value::record(fields, None)
}

/// `ip("<addr>")`. The last one is kept per thread: a workload's callers
/// come from few addresses, and parsing one costs more than the rest of
/// the context.
fn source_ip(names: &Names, addr: IpAddr) -> Result<Value, String> {
    thread_local! {
        static LAST: RefCell<Option<(IpAddr, Value)>> = const { RefCell::new(None) };
    }
    let hit = LAST.with(|last| {
        let last = last.try_borrow().ok()?;
        last.as_ref()
            .filter(|(a, _)| *a == addr)
            .map(|(_, v)| v.clone())
    });
    if let Some(v) = hit {
        return Ok(v);
    }
    let v = Extensions::all_available()
        .func(&names.ip)
        .map_err(|e| e.to_string())?
        .call(&[Value::from(addr.to_string())])
        .map_err(|e| e.to_string())
        .and_then(|v| Value::try_from(v).map_err(|e| e.to_string()))?;
    LAST.with(|last| {
        if let Ok(mut last) = last.try_borrow_mut() {
            *last = Some((addr, v.clone()));
        }
    });
    Ok(v)
}

fn context(
    fixed: &Fixed<'_>,
    input: &AuthzInput<'_>,
    entities: &mut Vec<Arc<Entity>>,
) -> Result<Context, String> {
    let names = fixed.names;
    let needs = fixed.needs;
    let want = |attr: &str| !fixed.trim_context || needs.context(attr);
    let s = |v: &str| Value::from(v);
    let mut ctx: BTreeMap<_, Value> = BTreeMap::new();
    let mut put = |k: &str, v: Value| {
        ctx.insert(k.into(), v);
    };
    let service_arn = input.service_arn.or(fixed.service_arn);
    let strings = [
        ("method", Some(input.method)),
        ("path", Some(input.path)),
        ("host", Some(input.host.unwrap_or(""))),
        ("authn", Some(input.identity.method)),
        ("service_arn", service_arn),
        ("service_network_arn", fixed.network_arn),
    ];
    for (k, v) in strings {
        if let (Some(v), true) = (v, want(k)) {
            put(k, s(v));
        }
    }
    if want("port") {
        put("port", Value::from(i64::from(input.conn.local.port())));
    }
    if want("source_ip") {
        put("source_ip", source_ip(names, input.conn.peer().ip())?);
    }
    type Tags<'t> = &'t dyn Fn(&dyn Fn(&str) -> bool) -> BTreeMap<String, Vec<String>>;
    let tagged: [(&str, &EntityType, Tags<'_>); 2] = [
        ("headers", &names.headers, &|wanted| {
            header_tags(input.headers, wanted)
        }),
        ("query", &names.query, &|wanted| {
            query_tags(input.query, wanted)
        }),
    ];
    for (attr, ty, tags) in tagged {
        if want(attr) {
            put(attr, tag_entity(ty, needs, tags, entities));
        }
    }
    if let Some(tls) = input.conn.tls.as_ref().filter(|_| want("tls")) {
        let mut rec = vec![("version", s(tls.version))];
        if let Some(crate::trace::PeerCert::Spiffe(id)) = &tls.peer {
            rec.push(("peer_spiffe_id", s(id.as_str())));
        }
        put("tls", record(rec));
    }
    if let (Some(aws), Principal::Aws(p), true) =
        (&input.identity.aws, &input.identity.principal, want("aws"))
    {
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
    if let Some(claims) = input.identity.jwt.as_ref().filter(|_| want("jwt")) {
        let selected = tag_entity(
            &names.claims,
            needs,
            |wanted| {
                claims
                    .selected
                    .iter()
                    .filter(|(k, _)| wanted(k))
                    .map(|(k, vs)| (k.clone(), vs.clone()))
                    .collect()
            },
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

/// Header name -> all its values (values that are not UTF-8 are left out),
/// for the `wanted` names.
fn header_tags(
    headers: &HeaderMap,
    wanted: &dyn Fn(&str) -> bool,
) -> BTreeMap<String, Vec<String>> {
    let mut tags: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in headers {
        if !wanted(name.as_str()) {
            continue;
        }
        if let Ok(v) = value.to_str() {
            tags.entry(name.as_str().to_owned())
                .or_default()
                .push(v.to_owned());
        }
    }
    tags
}

/// Query key -> all its values, percent-decoded, for the `wanted` keys.
fn query_tags(query: Option<&str>, wanted: &dyn Fn(&str) -> bool) -> BTreeMap<String, Vec<String>> {
    let mut tags: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let dec = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let key = dec(k);
        if wanted(&key) {
            tags.entry(key).or_default().push(dec(v));
        }
    }
    tags
}

#[cfg(test)]
mod tests {
    use super::*;

    fn needs(text: &str) -> Needs {
        let set = cedar_policy_core::parser::parse_policyset(text).expect("policies");
        let names = Names::new().expect("names");
        Needs::of(&set.policies().cloned().collect::<Vec<_>>(), &names)
    }

    fn keys(set: &Option<HashSet<String>>) -> Option<Vec<&str>> {
        set.as_ref().map(|s| {
            let mut v: Vec<&str> = s.iter().map(String::as_str).collect();
            v.sort_unstable();
            v
        })
    }

    #[test]
    fn a_set_needs_only_the_tags_and_path_prefixes_it_names() {
        let n = needs(
            r#"
permit (principal, action, resource in Http::Path::"/api/") when { context.headers.hasTag("x-a") };
permit (principal, action, resource) when {
  context.query.getTag("q") == "1" && resource in [Http::Path::"/b/", Http::Service::"/c/"]
};
"#,
        );
        assert_eq!(keys(&n.tags), Some(vec!["q", "x-a"]));
        assert_eq!(keys(&n.paths), Some(vec!["/api/", "/b/"]));
        assert!(n.tag("x-a") && !n.tag("x-b") && n.any_tag());
        assert!(n.path("/api/") && !n.path("/c/"));

        assert_eq!(keys(&n.context), Some(vec!["headers", "query"]));

        let none =
            needs(r#"permit (principal, action, resource) when { context.authn == "mtls" };"#);
        assert!(!none.any_tag() && !none.path("/"));
        assert_eq!(keys(&none.context), Some(vec!["authn"]));
        assert!(none.context("authn") && !none.context("path"));

        let nested = needs(
            r#"permit (principal, action, resource) when { context has aws.org_id && context.jwt.iss == "i" };"#,
        );
        assert_eq!(keys(&nested.context), Some(vec!["aws", "jwt"]));
    }

    #[test]
    fn a_path_of_many_segments_gets_the_named_prefixes_and_no_others() {
        let n = needs(
            r#"permit (principal, action, resource in Http::Path::"/api/v1/") when { resource in Http::Path::"/api/" };"#,
        );
        assert_eq!(n.longest_path, "/api/v1/".len());
        let names = Names::new().expect("names");
        let service = uid(&names.service, "svc");
        let ids = |path: &str| {
            let e = path_entity(&names, &n, path, service.clone());
            let mut v: Vec<String> = e.ancestors().map(|a| a.eid().as_ref().to_owned()).collect();
            v.sort_unstable();
            v
        };
        // 20 000 segments: each prefix hashed in turn was 400 MB of hashing.
        let long = format!("/api/v1/{}x", "a/".repeat(20_000));
        assert_eq!(ids(&long), ["/api/", "/api/v1/", "svc"]);
        assert_eq!(ids("/api/v1"), ["/api/", "/api/v1/", "svc"]);
        assert_eq!(ids("/api/v2/x"), ["/api/", "svc"]);
        assert_eq!(ids(&format!("/b/{}", "a/".repeat(20_000))), ["svc"]);

        // With every prefix needed, every one is built, the bare path's
        // directory form included.
        let all = Needs::all();
        let e = path_entity(&names, &all, "/a/b/c", service.clone());
        let mut v: Vec<String> = e.ancestors().map(|a| a.eid().as_ref().to_owned()).collect();
        v.sort_unstable();
        assert_eq!(v, ["/", "/a/", "/a/b/", "/a/b/c/", "svc"]);
    }

    #[test]
    fn the_whole_context_used_as_a_value_needs_every_attribute() {
        for text in [
            r#"permit (principal, action, resource) when { context == {"path": "/"} };"#,
            r#"permit (principal, action, resource) when { context.path == "/" && [context].contains({"a": 1}) };"#,
            r#"permit (principal, action, resource) when { {"c": context}.c has tls };"#,
        ] {
            let n = needs(text);
            assert_eq!(n.context, None, "{text}");
            assert!(n.context("anything"), "{text}");
        }
    }

    #[test]
    fn a_proved_request_carries_only_the_context_attributes_its_policies_name() {
        let set = crate::authz::testing::snapshot(
            crate::authz::testing::SHIPPED,
            r#"permit (principal, action, resource) when { context.path like "/a/*" && context has jwt };"#,
        );
        let s = crate::authz::shape::fullest(4).expect("sample");
        let headers = HeaderMap::new();
        let input = AuthzInput {
            identity: &s.identity,
            method: "GET",
            path: "/a/b",
            query: Some("q=1"),
            headers: &headers,
            host: Some("h"),
            conn: &s.conn,
            service: None,
            service_arn: None,
        };
        let attrs = |trim_context: bool| -> Vec<String> {
            let action = set.actions.get("GET").expect("action");
            let fixed = Fixed {
                names: &set.names,
                needs: &set.needs,
                action: &action.store,
                service: &set.service_entity,
                service_arn: None,
                network_arn: None,
                trim_context,
            };
            match build(&fixed, &input).expect("build").context {
                Context::Value(map) => map.keys().map(ToString::to_string).collect(),
                Context::RestrictedResidual(_) => panic!("a built context is a value"),
            }
        };
        assert_eq!(attrs(true), ["jwt", "path"]);
        let all = attrs(false);
        for attr in [
            "method",
            "path",
            "host",
            "port",
            "source_ip",
            "authn",
            "headers",
            "query",
            "tls",
            "jwt",
        ] {
            assert!(all.iter().any(|a| a == attr), "{attr} in {all:?}");
        }
        assert!(
            set.decide(&input)
                .map_err(|e| e.to_string())
                .expect("decide")
                .allow
        );
    }

    #[test]
    fn a_tag_entity_named_by_its_uid_is_built_as_through_the_context() {
        // `Http::Headers::"request"` is the entity `context.headers` holds: a
        // policy can name it without naming the context attribute, so its
        // tags must be there all the same, or these forbids would not apply.
        let forbids = [
            r#"Http::Headers::"request".hasTag("x-evil")"#,
            r#"Http::Query::"request".hasTag("debug")"#,
            r#"Warden::Claims::"request".hasTag("groups")"#,
        ];
        for (i, condition) in forbids.into_iter().enumerate() {
            let src = format!(
                r#"@id("all") permit (principal, action, resource);
                   @id("tagged") forbid (principal, action, resource) when {{ {condition} }};"#
            );
            let set = crate::authz::testing::snapshot(crate::authz::testing::SHIPPED, &src);
            let reference = crate::authz::testing::reference(&src);
            let mut s = crate::authz::shape::fullest(4).expect("sample");
            let mut headers = HeaderMap::new();
            let mut query = None;
            let decide =
                |headers: &HeaderMap, query: Option<&str>, s: &crate::authz::shape::Sample| {
                    let input = AuthzInput {
                        identity: &s.identity,
                        method: "GET",
                        path: "/a",
                        query,
                        headers,
                        host: Some("h"),
                        conn: &s.conn,
                        service: None,
                        service_arn: None,
                    };
                    let d = set
                        .decide(&input)
                        .map_err(|e| e.to_string())
                        .expect("decide");
                    let (allow, reasons, _) = set.decide_reference(&reference, &input);
                    assert_eq!(
                        (d.allow, d.policies.to_vec()),
                        (allow, reasons),
                        "{condition}"
                    );
                    d.allow
                };
            // Without the tag the request is allowed; with it, forbidden.
            let claims = s.identity.jwt.take();
            assert!(decide(&headers, query, &s), "{condition}");
            match i {
                0 => {
                    headers.insert("x-evil", "1".parse().expect("value"));
                }
                1 => query = Some("debug=1"),
                _ => s.identity.jwt = claims,
            }
            assert!(!decide(&headers, query, &s), "{condition}");
        }
    }

    #[test]
    fn a_computed_tag_key_or_a_template_slot_needs_everything() {
        let n = needs(
            r#"permit (principal, action, resource) when { context.headers.hasTag(context.method) };"#,
        );
        assert_eq!(n.tags, None);
        assert!(n.tag("anything") && n.any_tag());
        // A linked template: its slot's value is not in the text.
        let mut set = cedar_policy_core::parser::parse_policyset(
            r#"permit (principal, action, resource in ?resource);"#,
        )
        .expect("template");
        let template = set.templates().next().expect("template").id().clone();
        let value: EntityUID = r#"Http::Path::"/linked/""#.parse().expect("uid");
        set.link(
            template,
            cedar_policy_core::ast::PolicyID::from_string("linked"),
            [(cedar_policy_core::ast::SlotId::resource(), value)].into(),
        )
        .expect("link");
        let names = Names::new().expect("names");
        let n = Needs::of(&set.policies().cloned().collect::<Vec<_>>(), &names);
        assert_eq!(n.paths, None);
        assert!(n.path("/any/"));
    }

    #[test]
    fn the_source_address_is_the_connection_peer_on_every_request() {
        let set = crate::authz::testing::snapshot(
            crate::authz::testing::SHIPPED,
            r#"permit (principal, action, resource) when { context.source_ip.isInRange(ip("10.0.0.0/8")) };"#,
        );
        let mut s = crate::authz::shape::fullest(0).expect("sample");
        let headers = HeaderMap::new();
        // Alternating addresses on one thread: the kept value is never
        // another address's.
        for (peer, allowed) in [
            ([10, 1, 2, 3], true),
            ([192, 168, 1, 1], false),
            ([192, 168, 1, 1], false),
            ([10, 9, 9, 9], true),
            ([11, 0, 0, 1], false),
        ] {
            s.conn = crate::trace::ConnInfo::new(
                std::net::SocketAddr::from((peer, 40000)),
                s.conn.local,
                s.conn.tls.clone(),
            );
            let input = AuthzInput {
                identity: &s.identity,
                method: "GET",
                path: "/",
                query: None,
                headers: &headers,
                host: None,
                conn: &s.conn,
                service: None,
                service_arn: None,
            };
            let d = set
                .decide(&input)
                .map_err(|e| e.to_string())
                .expect("decide");
            assert_eq!(d.allow, allowed, "{peer:?}");
        }
    }
}
