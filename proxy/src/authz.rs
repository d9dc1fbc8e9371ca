//! Step 4: decide with Cedar.
//!
//! Policies and schema are parsed and strictly validated once, off the request
//! path, into a [`PolicySnapshot`]. Per request only the principal, resource
//! and context are built. Default deny; `forbid` wins. Every policy is named
//! by its `@id` (else `<file>:<index>`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use arc_swap::ArcSwap;
use cedar_policy::{
    Authorizer, Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId,
    PolicySet, Request as CedarRequest, RestrictedExpression, Schema, ValidationMode, Validator,
};
use http::{HeaderMap, Request, Response};
use miette::Diagnostic;
use tower::{Layer, Service};

use crate::authn::{Identity, Principal};
use crate::body::Body;
use crate::config::{AuthzMode, ServiceConfig};
use crate::error::ProxyError;
use crate::trace::{ConnInfo, Decision, Trace};

/// 1-based line of a byte offset.
fn line_of(src: &str, offset: usize) -> usize {
    src.as_bytes()[..offset.min(src.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// `file:line: message`, using the diagnostic's first label when it has one.
fn located(file: &Path, src: &str, d: &dyn Diagnostic, msg: impl std::fmt::Display) -> String {
    let line = d
        .labels()
        .and_then(|mut l| l.next())
        .map(|l| line_of(src, l.offset()));
    let help = d.help().map(|h| format!(" ({h})")).unwrap_or_default();
    match line {
        Some(n) => format!("{}:{n}: {msg}{help}", file.display()),
        None => format!("{}: {msg}{help}", file.display()),
    }
}

fn uid(ty: &str, id: &str) -> Result<EntityUid, String> {
    let ty: EntityTypeName = ty.parse().map_err(|e| format!("entity type `{ty}`: {e}"))?;
    Ok(EntityUid::from_type_name_and_id(ty, EntityId::new(id)))
}

/// The parsed, validated policy set and everything a decision needs.
pub struct PolicySnapshot {
    schema: Schema,
    policies: PolicySet,
    /// Method -> its action entity (member of `Action::"invoke"`).
    actions: HashMap<String, Entity>,
    invoke: Option<Entity>,
    authorizer: Authorizer,
    /// Hash of the active set, for the decision log.
    pub hash: Arc<str>,
    /// When this set was loaded.
    pub loaded_at: std::time::SystemTime,
    pub mode: AuthzMode,
    service: String,
    service_arn: Option<String>,
    network_arn: Option<String>,
}

impl std::fmt::Debug for PolicySnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicySnapshot")
            .field("policies", &self.policies.policies().count())
            .field("hash", &self.hash)
            .finish()
    }
}

/// The schema and every `*.cedar` file of `dir` (sorted), as text.
type Sources = (String, Vec<(PathBuf, String)>);

fn read_sources(dir: &Path, schema_path: &Path) -> Result<Sources, String> {
    let schema = std::fs::read_to_string(schema_path)
        .map_err(|e| format!("{}: {e}", schema_path.display()))?;
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "cedar") && p.is_file())
        .collect();
    paths.sort();
    let mut files = Vec::with_capacity(paths.len());
    for p in paths {
        let src = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        files.push((p, src));
    }
    Ok((schema, files))
}

/// Reads the sources until two reads in a row agree, so a directory swapped
/// while it is read (a ConfigMap's `..data` symlink, an editor's save) is
/// never loaded half old, half new.
fn read_stable(dir: &Path, schema_path: &Path) -> Result<Sources, String> {
    let mut last = read_sources(dir, schema_path)?;
    for _ in 0..8 {
        let again = read_sources(dir, schema_path)?;
        if again == last {
            return Ok(last);
        }
        last = again;
    }
    Err(format!(
        "{}: the policy directory kept changing while it was read",
        dir.display()
    ))
}

impl PolicySnapshot {
    /// Loads every `*.cedar` in `dir`, validates strictly against `schema_path`.
    pub fn load(
        dir: &Path,
        schema_path: &Path,
        mode: AuthzMode,
        service: &ServiceConfig,
    ) -> Result<Self, String> {
        let (schema_src, files) = read_stable(dir, schema_path)?;
        let (schema, _warnings) = Schema::from_cedarschema_str(&schema_src)
            .map_err(|e| located(schema_path, &schema_src, &e, &e))?;
        let validator = Validator::new(schema.clone());
        let mut policies = PolicySet::new();
        let mut names: BTreeMap<String, String> = BTreeMap::new();
        let mut digest = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        for (file, src) in &files {
            digest.update(
                file.file_name()
                    .map(|n| n.as_encoded_bytes())
                    .unwrap_or_default(),
            );
            digest.update(src.as_bytes());
            let pset: PolicySet = src
                .parse()
                .map_err(|e: cedar_policy::ParseErrors| located(file, src, &e, &e))?;
            if pset.templates().next().is_some() {
                return Err(format!(
                    "{}: policy templates are not supported",
                    file.display()
                ));
            }
            let result = validator.validate(&pset, ValidationMode::Strict);
            if let Some(e) = result.validation_errors().next() {
                return Err(located(file, src, e, e));
            }
            let stem = file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            for (index, policy) in pset.policies().enumerate() {
                let name = policy
                    .annotation("id")
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("{stem}:{index}"));
                if let Some(prev) = names.insert(name.clone(), stem.clone()) {
                    return Err(format!(
                        "{}: policy id `{name}` is already used in {prev}",
                        file.display()
                    ));
                }
                policies
                    .add(policy.new_id(PolicyId::new(&name)))
                    .map_err(|e| format!("{}: {e}", file.display()))?;
            }
        }
        let action_entities = schema
            .action_entities()
            .map_err(|e| format!("{}: {e}", schema_path.display()))?;
        let mut actions = HashMap::new();
        let mut invoke = None;
        for e in action_entities.iter() {
            let id = e.uid().id().unescaped().to_owned();
            if id == "invoke" {
                invoke = Some(e.clone());
            } else {
                actions.insert(id, e.clone());
            }
        }
        Ok(Self {
            schema,
            policies,
            actions,
            invoke,
            authorizer: Authorizer::new(),
            hash: Arc::from(hex::encode(&digest.finish().as_ref()[..8])),
            loaded_at: std::time::SystemTime::now(),
            mode,
            service: service.name.clone(),
            service_arn: service.arn.clone(),
            network_arn: service.network_arn.clone(),
        })
    }

    /// Whether the schema declares this method as an action.
    pub fn knows_method(&self, method: &str) -> bool {
        self.actions.contains_key(method)
    }

    /// Decides one request. `Err` only for requests that cannot be expressed.
    pub fn decide(&self, input: &AuthzInput<'_>) -> Result<Decision, ProxyError> {
        let action = self
            .actions
            .get(input.method)
            .ok_or(ProxyError::MethodNotAllowed)?;
        let internal = |e: String| {
            tracing::warn!(error = %e, "authorization request could not be built");
            ProxyError::Forbidden
        };
        let mut entities = Vec::with_capacity(16);
        let principal = principal_entities(input.identity, &mut entities).map_err(internal)?;
        let service = input.service.unwrap_or(&self.service);
        let resource = path_entities(input.path, service, &mut entities).map_err(internal)?;
        entities.push(action.clone());
        if let Some(invoke) = &self.invoke {
            entities.push(invoke.clone());
        }
        let context = self.context(input, &mut entities).map_err(internal)?;
        let entities =
            Entities::from_entities(entities, None).map_err(|e| internal(e.to_string()))?;
        // Validated against the schema on every request: if the context ever
        // drifted from the schema, a `forbid` that failed to evaluate would be
        // skipped silently; this way the request is refused instead.
        let request = CedarRequest::new(
            principal,
            action.uid(),
            resource,
            context,
            Some(&self.schema),
        )
        .map_err(|e| internal(e.to_string()))?;
        let response = self
            .authorizer
            .is_authorized(&request, &self.policies, &entities);
        let errors: Vec<String> = response
            .diagnostics()
            .errors()
            .map(|err| {
                tracing::warn!(error = %err, "policy evaluation error");
                let mut text = err.to_string();
                // Bounded: a log line, not a dump.
                if let Some((i, _)) = text.char_indices().nth(200) {
                    text.truncate(i);
                }
                text
            })
            .collect();
        Ok(Decision {
            errors,
            allow: response.decision() == cedar_policy::Decision::Allow,
            policies: response
                .diagnostics()
                .reason()
                .map(|id| id.to_string())
                .collect(),
            policy_set: self.hash.clone(),
        })
    }

    fn context(
        &self,
        input: &AuthzInput<'_>,
        entities: &mut Vec<Entity>,
    ) -> Result<Context, String> {
        let s = |v: &str| RestrictedExpression::new_string(v.to_owned());
        let headers_uid = uid("Http::Headers", "request")?;
        let query_uid = uid("Http::Query", "request")?;
        entities.push(tag_entity(headers_uid.clone(), header_tags(input.headers))?);
        entities.push(tag_entity(query_uid.clone(), query_tags(input.query))?);
        let mut pairs = vec![
            ("method".to_owned(), s(input.method)),
            ("path".to_owned(), s(input.path)),
            ("host".to_owned(), s(input.host.unwrap_or(""))),
            (
                "port".to_owned(),
                RestrictedExpression::new_long(i64::from(input.conn.local.port())),
            ),
            (
                "source_ip".to_owned(),
                RestrictedExpression::new_ip(input.conn.peer.ip().to_string()),
            ),
            ("authn".to_owned(), s(input.identity.method)),
            (
                "headers".to_owned(),
                RestrictedExpression::new_entity_uid(headers_uid),
            ),
            (
                "query".to_owned(),
                RestrictedExpression::new_entity_uid(query_uid),
            ),
        ];
        if let Some(arn) = input.service_arn.or(self.service_arn.as_deref()) {
            pairs.push(("service_arn".to_owned(), s(arn)));
        }
        if let Some(arn) = &self.network_arn {
            pairs.push(("service_network_arn".to_owned(), s(arn)));
        }
        if let Some(tls) = &input.conn.tls {
            let mut rec = vec![("version".to_owned(), s(tls.version))];
            if let Some(crate::trace::PeerCert::Spiffe(id)) = &tls.peer {
                rec.push(("peer_spiffe_id".to_owned(), s(&id.to_string())));
            }
            pairs.push(("tls".to_owned(), record(rec)?));
        }
        if let (Some(aws), Principal::Aws(p)) = (&input.identity.aws, &input.identity.principal) {
            let mut rec = vec![
                ("access_key_id".to_owned(), s(&aws.access_key_id)),
                ("account".to_owned(), s(&p.account)),
                ("principal_arn".to_owned(), s(&p.arn)),
                (
                    "presigned".to_owned(),
                    RestrictedExpression::new_bool(aws.presigned),
                ),
            ];
            if let Some(org) = &aws.org_id {
                rec.push(("org_id".to_owned(), s(org)));
            }
            if let Some(sess) = &p.session_name {
                rec.push(("session_name".to_owned(), s(sess)));
            }
            pairs.push(("aws".to_owned(), record(rec)?));
        }
        if let Some(claims) = &input.identity.jwt {
            let claims_uid = uid("Warden::Claims", "request")?;
            entities.push(tag_entity(claims_uid.clone(), claims.selected.clone())?);
            let mut rec = vec![
                ("iss".to_owned(), s(&claims.iss)),
                (
                    "aud".to_owned(),
                    RestrictedExpression::new_set(claims.aud.iter().map(|a| s(a))),
                ),
                (
                    "claims".to_owned(),
                    RestrictedExpression::new_entity_uid(claims_uid),
                ),
            ];
            if let Some(sub) = &claims.sub {
                rec.push(("sub".to_owned(), s(sub)));
            }
            if let Some(k) = &claims.kubernetes {
                let fields = [
                    ("namespace", &k.namespace),
                    ("pod_name", &k.pod_name),
                    ("pod_uid", &k.pod_uid),
                    ("service_account_uid", &k.service_account_uid),
                ];
                let k8s = fields
                    .into_iter()
                    .filter_map(|(n, v)| v.as_deref().map(|v| (n.to_owned(), s(v))))
                    .collect();
                rec.push(("kubernetes".to_owned(), record(k8s)?));
            }
            pairs.push(("jwt".to_owned(), record(rec)?));
        }
        Context::from_pairs(pairs).map_err(|e| e.to_string())
    }
}

fn record(fields: Vec<(String, RestrictedExpression)>) -> Result<RestrictedExpression, String> {
    RestrictedExpression::new_record(fields).map_err(|e| e.to_string())
}

fn tag_entity(uid: EntityUid, tags: BTreeMap<String, Vec<String>>) -> Result<Entity, String> {
    let tags = tags.into_iter().map(|(k, vs)| {
        (
            k,
            RestrictedExpression::new_set(vs.into_iter().map(RestrictedExpression::new_string)),
        )
    });
    Entity::new_with_tags(uid, [], [], tags).map_err(|e| e.to_string())
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

/// Builds the principal and its parent chain (DESIGN §5).
fn principal_entities(identity: &Identity, out: &mut Vec<Entity>) -> Result<EntityUid, String> {
    let (ty, id) = identity.principal.uid();
    let me = uid(ty, &id)?;
    let mut parents = Vec::new();
    let mut tags = Vec::new();
    match &identity.principal {
        Principal::Aws(p) => {
            let account = uid("Aws::Account", &p.account)?;
            let mut account_parents = Vec::new();
            if let Some(org) = identity.org_id() {
                let org = uid("Aws::Org", org)?;
                out.push(Entity::new_no_attrs(org.clone(), Default::default()));
                account_parents.push(org);
            }
            out.push(Entity::new_no_attrs(
                account.clone(),
                account_parents.into_iter().collect(),
            ));
            parents.push(account);
            if let Some(aws) = &identity.aws {
                tags = aws
                    .tags
                    .iter()
                    .map(|(k, v)| (k.clone(), RestrictedExpression::new_string(v.clone())))
                    .collect();
            }
        }
        Principal::Spiffe(sid) => {
            let td = uid("Spiffe::TrustDomain", sid.trust_domain())?;
            out.push(Entity::new_no_attrs(td.clone(), Default::default()));
            parents.push(td);
        }
        Principal::K8s {
            namespace, cluster, ..
        } => {
            let cl = uid("K8s::Cluster", cluster)?;
            let ns = uid("K8s::Namespace", namespace)?;
            out.push(Entity::new_no_attrs(cl.clone(), Default::default()));
            out.push(Entity::new_no_attrs(ns.clone(), [cl].into_iter().collect()));
            parents.push(ns);
        }
        Principal::Oidc { iss, .. } => {
            let is = uid("Oidc::Issuer", iss)?;
            out.push(Entity::new_no_attrs(is.clone(), Default::default()));
            parents.push(is);
        }
        Principal::Anonymous => {}
    }
    out.push(Entity::new_with_tags(me.clone(), [], parents, tags).map_err(|e| e.to_string())?);
    Ok(me)
}

/// The resource `Http::Path::"<path>"` with its segment-aware ancestors, all
/// in `Http::Service::"<service>"`.
fn path_entities(path: &str, service: &str, out: &mut Vec<Entity>) -> Result<EntityUid, String> {
    let svc = uid("Http::Service", service)?;
    out.push(Entity::new_no_attrs(svc.clone(), Default::default()));
    let me = uid("Http::Path", path)?;
    let mut parents = vec![svc];
    if !path.ends_with('/') {
        parents.push(uid("Http::Path", &format!("{path}/"))?);
    }
    for (i, _) in path.match_indices('/') {
        let prefix = &path[..=i];
        if prefix != path {
            parents.push(uid("Http::Path", prefix)?);
        }
    }
    out.push(Entity::new_no_attrs(
        me.clone(),
        parents.into_iter().collect(),
    ));
    Ok(me)
}

/// What one decision needs to know about the request.
pub struct AuthzInput<'a> {
    pub identity: &'a Identity,
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    pub host: Option<&'a str>,
    pub conn: &'a ConnInfo,
    /// Gateway mode: the route's service and ARN instead of `[service]`'s.
    pub service: Option<&'a str>,
    pub service_arn: Option<&'a str>,
}

#[derive(Clone)]
pub struct AuthzLayer {
    policies: Arc<ArcSwap<PolicySnapshot>>,
    shadow: Option<Arc<ArcSwap<PolicySnapshot>>>,
}

impl AuthzLayer {
    pub fn new(
        policies: Arc<ArcSwap<PolicySnapshot>>,
        shadow: Option<Arc<ArcSwap<PolicySnapshot>>>,
    ) -> Self {
        Self { policies, shadow }
    }
}

impl<S> Layer<S> for AuthzLayer {
    type Service = Authz<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Authz {
            inner,
            policies: self.policies.clone(),
            shadow: self.shadow.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Authz<S> {
    inner: S,
    policies: Arc<ArcSwap<PolicySnapshot>>,
    shadow: Option<Arc<ArcSwap<PolicySnapshot>>>,
}

impl<S> Service<Request<Body>> for Authz<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = crate::error::Either<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        match self.authorize(&req) {
            Ok(()) => futures_util::future::Either::Left(self.inner.call(req)),
            Err(e) => crate::error::reject(e),
        }
    }
}

impl<S> Authz<S> {
    fn authorize(&self, req: &Request<Body>) -> Result<(), ProxyError> {
        let snapshot = self.policies.load();
        let trace = req.extensions().get::<Arc<Trace>>();
        let (Some(identity), Some(trace)) = (req.extensions().get::<Identity>(), trace) else {
            // Fail closed: the pipeline always provides both.
            return Err(ProxyError::Forbidden);
        };
        let route = req.extensions().get::<crate::route::Route>();
        let host = req
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()));
        let input = AuthzInput {
            identity,
            method: req.method().as_str(),
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
            host,
            conn: &trace.conn,
            service: route.map(|r| &*r.service),
            service_arn: route.and_then(|r| r.service_arn.as_deref()),
        };
        let _ = trace.action.set(format!("Action::{:?}", input.method));
        let _ = trace.resource.set(format!("Http::Path::{:?}", input.path));
        let decision = snapshot.decide(&input)?;
        if let Some(shadow) = &self.shadow {
            // Never enforced: an error there is logged, not answered.
            match shadow.load().decide(&input) {
                Ok(d) => {
                    let _ = trace.shadow.set(d);
                }
                Err(e) => tracing::warn!(error = %e, "shadow policy set could not decide"),
            }
        }
        let allow = decision.allow;
        let _ = trace.decision.set(decision);
        if allow || snapshot.mode == AuthzMode::Audit {
            Ok(())
        } else {
            Err(ProxyError::Forbidden)
        }
    }
}
