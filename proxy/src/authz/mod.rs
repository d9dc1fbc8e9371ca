//! Step 4: decide with Cedar.
//!
//! Policies and schema are parsed and strictly validated once, off the request
//! path, into a [`PolicySnapshot`]. Per request only the principal, resource
//! and context are built, and under a set that names no context attribute a
//! request seen before is not built at all ([`cache`]). Default deny; `forbid`
//! wins. Every policy is named by its `@id` (else `<file>:<index>`).

mod cache;
mod index;
mod request;
mod shape;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use arc_swap::ArcSwap;
use cedar_policy::{PolicySet, Schema, ValidationMode, Validator};
use cedar_policy_core::ast;
use cedar_policy_core::authorizer::AuthorizationError;
use cedar_policy_core::extensions::Extensions;
use http::{HeaderMap, Request, Response};
use miette::Diagnostic;
use tower::{Layer, Service};

use crate::authn::Identity;
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

/// The file name policies without `@id` are named after.
fn file_name(file: &Path) -> String {
    file.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A policy's name everywhere a user sees one: its `@id`, else `<file>:<index>`.
fn policy_name(policy: &cedar_policy::Policy, stem: &str, index: usize) -> String {
    policy
        .annotation("id")
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{stem}:{index}"))
}

/// Parses and strictly validates a piece of one file, in file order, each
/// policy named by [`policy_name`] (`first` is the file index of the piece's
/// first policy) so that a validation error names it as the user does.
fn parse_whole(
    validator: &Validator,
    file: &Path,
    src: &str,
    first: usize,
) -> Result<Vec<(String, ast::Policy)>, String> {
    let pset: PolicySet = src
        .parse()
        .map_err(|e: cedar_policy::ParseErrors| located(file, src, &e, &e))?;
    if pset.templates().next().is_some() {
        return Err(format!(
            "{}: policy templates are not supported",
            file.display()
        ));
    }
    let stem = file_name(file);
    let mut named = PolicySet::new();
    let mut names = Vec::new();
    for (i, policy) in pset.policies().enumerate() {
        let name = policy_name(policy, &stem, first + i);
        named
            .add(policy.new_id(cedar_policy::PolicyId::new(&name)))
            .map_err(|_| format!("{}: policy id `{name}` is used twice", file.display()))?;
        names.push(name);
    }
    let result = validator.validate(&named, ValidationMode::Strict);
    if let Some(e) = result.validation_errors().next() {
        return Err(located(file, src, e, e));
    }
    let set: &ast::PolicySet = named.as_ref();
    Ok(names.into_iter().zip(set.policies().cloned()).collect())
}

/// `policy` named `id`, without its annotations: `@id` has been read, and
/// no annotation bears on a decision (each policy's map costs a B-tree node,
/// about 1 KB).
fn renamed(policy: &ast::Policy, id: ast::PolicyID) -> Result<ast::Policy, String> {
    let t = policy.template();
    ast::StaticPolicy::new(
        id,
        t.loc().cloned(),
        ast::Annotations::new(),
        t.effect(),
        t.principal_constraint().clone(),
        t.action_constraint().clone(),
        t.resource_constraint().clone(),
        t.non_scope_constraints().cloned(),
    )
    .map(ast::Policy::from)
    .map_err(|e| e.to_string())
}

/// [`parse_whole`], one statement at a time: the parse tree of a whole file
/// is several times the size of its policies (8 MB for 1 000 policies), and
/// the allocator keeps what a peak took. Any error is reported by parsing
/// the whole file, so that its line is the file's.
fn parse_file(
    validator: &Validator,
    file: &Path,
    src: &str,
) -> Result<Vec<(String, ast::Policy)>, String> {
    let mut out = Vec::new();
    for statement in statements(src) {
        match parse_whole(validator, file, statement, out.len()) {
            Ok(policies) => out.extend(policies),
            Err(piece) => return Err(parse_whole(validator, file, src, 0).err().unwrap_or(piece)),
        }
    }
    Ok(out)
}

/// `src` cut after each `;` that ends a statement: one outside a string
/// literal and a `//` comment, the only places Cedar's grammar allows any
/// other `;`. The last piece is whatever follows the last `;`.
fn statements(src: &str) -> Vec<&str> {
    #[derive(Clone, Copy)]
    enum At {
        Code,
        Str,
        Escape,
        Slash,
        Comment,
    }
    let mut at = At::Code;
    let mut start = 0;
    let mut cuts = Vec::new();
    for (i, b) in src.bytes().enumerate() {
        at = match (at, b) {
            (At::Code | At::Slash, b'"') => At::Str,
            (At::Code, b'/') => At::Slash,
            (At::Slash, b'/') => At::Comment,
            (At::Code | At::Slash, b';') => {
                cuts.extend(src.get(start..=i));
                start = i + 1;
                At::Code
            }
            (At::Code | At::Slash, _) => At::Code,
            (At::Str, b'\\') => At::Escape,
            (At::Str, b'"') => At::Code,
            (At::Str, _) | (At::Escape, _) => At::Str,
            (At::Comment, b'\n') => At::Code,
            (At::Comment, _) => At::Comment,
        };
    }
    cuts.extend(src.get(start..));
    cuts
}

/// One method's action entity, the `Action::"invoke"` group it is in, and
/// for each principal kind whether its requests were proved to conform to
/// the schema ([`shape`]) or must be validated one by one.
struct Action {
    store: request::ActionStore,
    proved: [bool; request::KINDS],
    /// The policies that can apply to this action ([`index`]).
    slice: index::Slice,
}

/// The parsed, validated policy set and everything a decision needs.
pub struct PolicySnapshot {
    schema: Schema,
    /// Method -> its action.
    actions: HashMap<String, Action>,
    names: request::Names,
    needs: request::Needs,
    service_entity: Arc<ast::Entity>,
    /// The set's policies, renamed by their ids, as the slices index them.
    all: Arc<[ast::Policy]>,
    /// Hash of the active set, for the decision log.
    pub hash: Arc<str>,
    /// Digest of everything the set was loaded from (schema included), so a
    /// reload can tell "nothing changed" without parsing.
    pub source: [u8; 32],
    /// When this set was loaded.
    pub loaded_at: std::time::SystemTime,
    pub mode: AuthzMode,
    service_arn: Option<String>,
    network_arn: Option<String>,
    /// Decisions by request, when the policies name no context attribute.
    decisions: Option<cache::DecisionCache>,
}

impl std::fmt::Debug for PolicySnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicySnapshot")
            .field("policies", &self.all.len())
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
/// Digest of the schema and every policy file, names included.
fn digest_sources((schema, files): &Sources) -> [u8; 32] {
    let mut d = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut part = |bytes: &[u8]| {
        d.update(&(bytes.len() as u64).to_be_bytes());
        d.update(bytes);
    };
    part(schema.as_bytes());
    for (path, text) in files {
        part(path.as_os_str().as_encoded_bytes());
        part(text.as_bytes());
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(d.finish().as_ref());
    out
}

/// The digest a set loaded from `dir` and `schema_path` now would have.
pub fn source_digest(dir: &Path, schema_path: &Path) -> Result<[u8; 32], String> {
    read_sources(dir, schema_path).map(|s| digest_sources(&s))
}

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
        let sources = read_stable(dir, schema_path)?;
        let source = digest_sources(&sources);
        let (schema_src, files) = sources;
        let (schema, _warnings) = Schema::from_cedarschema_str(&schema_src)
            .map_err(|e| located(schema_path, &schema_src, &e, &e))?;
        let validator = Validator::new(schema.clone());
        let mut all = Vec::new();
        let mut names: BTreeMap<String, String> = BTreeMap::new();
        let mut digest = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        for (file, src) in &files {
            digest.update(
                file.file_name()
                    .map(|n| n.as_encoded_bytes())
                    .unwrap_or_default(),
            );
            digest.update(src.as_bytes());
            let parsed = parse_file(&validator, file, src)?;
            let stem = file_name(file);
            for (name, policy) in &parsed {
                if let Some(prev) = names.insert(name.clone(), stem.clone()) {
                    return Err(format!(
                        "{}: policy id `{name}` is already used in {prev}",
                        file.display()
                    ));
                }
                all.push(
                    renamed(policy, ast::PolicyID::from_string(name))
                        .map_err(|e| format!("{}: {e}", file.display()))?,
                );
            }
        }
        let action_entities = schema
            .action_entities()
            .map_err(|e| format!("{}: {e}", schema_path.display()))?;
        let invoke = action_entities
            .iter()
            .find(|e| e.uid().id().unescaped() == "invoke")
            .map(|e| Arc::new(e.as_ref().clone()));
        let names = request::Names::new()?;
        let service_entity = names.service_entity(&service.name);
        let all: Arc<[ast::Policy]> = all.into();
        let needs = request::Needs::of(&all, &names);
        let mut actions = HashMap::new();
        for e in action_entities.iter() {
            let id = e.uid().id().unescaped().to_owned();
            if id == "invoke" {
                continue;
            }
            let store =
                request::ActionStore::new(&names, Arc::new(e.as_ref().clone()), invoke.clone())?;
            let fixed = request::Fixed {
                names: &names,
                needs: &needs,
                action: &store,
                service: &service_entity,
                service_arn: None,
                network_arn: None,
                trim_context: false,
            };
            let proved = shape::prove(schema.as_ref(), &fixed, &id)?;
            let slice = index::Slice::new(&all, e.as_ref());
            actions.insert(
                id,
                Action {
                    store,
                    proved,
                    slice,
                },
            );
        }
        Ok(Self {
            schema,
            actions,
            service_entity,
            names,
            all,
            hash: Arc::from(hex::encode(&digest.finish().as_ref()[..8])),
            source,
            loaded_at: std::time::SystemTime::now(),
            mode,
            service_arn: service.arn.clone(),
            network_arn: service.network_arn.clone(),
            decisions: needs.no_context().then(cache::DecisionCache::new),
            needs,
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
        let proved = action.proved[request::kind(&input.identity.principal)];
        // A proved request under a set that names no context attribute is
        // decided by its key alone ([`cache`]).
        let Some(cache) = self.decisions.as_ref().filter(|_| proved) else {
            return self.evaluate(action, proved, input);
        };
        let key = request::key(input);
        if let Some(hit) = cache.get(&key) {
            return Ok(hit);
        }
        let decision = self.evaluate(action, proved, input)?;
        cache.insert(&key, decision.clone());
        Ok(decision)
    }

    fn evaluate(
        &self,
        action: &Action,
        proved: bool,
        input: &AuthzInput<'_>,
    ) -> Result<Decision, ProxyError> {
        let internal = |e: String| {
            tracing::warn!(error = %e, "authorization request could not be built");
            ProxyError::Forbidden
        };
        let fixed = request::Fixed {
            names: &self.names,
            needs: &self.needs,
            action: &action.store,
            service: &self.service_entity,
            service_arn: self.service_arn.as_deref(),
            network_arn: self.network_arn.as_deref(),
            trim_context: proved,
        };
        let built = request::build(&fixed, input).map_err(internal)?;
        let request = if proved {
            ast::Request::new(
                (built.principal.clone(), None),
                (built.action, None),
                (built.resource.clone(), None),
                built.context,
                None::<&ast::RequestSchemaAllPass>,
                Extensions::all_available(),
            )
            .map_err(|e| match e {})?
        } else {
            // Not proved for this schema: validate this one (and refuse it
            // if it does not conform; see `shape`).
            ast::Request::new(
                (built.principal.clone(), None),
                (built.action, None),
                (built.resource.clone(), None),
                built.context,
                Some(self.schema.as_ref()),
                Extensions::all_available(),
            )
            .map_err(|e| internal(e.to_string()))?
        };
        let response = action.slice.authorize(
            &self.all,
            (&built.principal, &built.resource),
            request,
            &built.entities,
        );
        let errors: Vec<String> = response
            .errors
            .iter()
            .map(|err| {
                let AuthorizationError::PolicyEvaluationError { id, error } = err;
                let mut text = format!("error while evaluating policy `{id}`: {error}");
                tracing::warn!(error = %text, "policy evaluation error");
                // Bounded: a log line, not a dump.
                if let Some((i, _)) = text.char_indices().nth(200) {
                    text.truncate(i);
                }
                text
            })
            .collect();
        Ok(Decision {
            errors: errors.into(),
            allow: response.allow,
            policies: response.reasons.iter().map(ToString::to_string).collect(),
            policy_set: self.hash.clone(),
        })
    }
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
        let _ = trace.action.set(quoted("Action::", input.method));
        let _ = trace.resource.set(quoted("Http::Path::", input.path));
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

/// `prefix` and `s` as `format!("{prefix}{s:?}")` writes them (an entity uid
/// as the decision log shows it), without the formatter when `s` is plain
/// ASCII, as methods and normalized paths almost always are.
fn quoted(prefix: &str, s: &str) -> String {
    if !s
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        return format!("{prefix}{s:?}");
    }
    let mut out = String::with_capacity(prefix.len() + s.len() + 2);
    out.push_str(prefix);
    out.push('"');
    out.push_str(s);
    out.push('"');
    out
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub const SHIPPED: &str = include_str!("../../../policies/schema.cedarschema");

    /// A set of `policies` under `schema`.
    pub fn snapshot(schema: &str, policies: &str) -> PolicySnapshot {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("schema.cedarschema"), schema).expect("write");
        std::fs::write(dir.path().join("set.cedar"), policies).expect("write");
        PolicySnapshot::load(
            dir.path(),
            &dir.path().join("schema.cedarschema"),
            AuthzMode::Enforce,
            &ServiceConfig::default(),
        )
        .expect("load")
    }

    /// `src` parsed by Cedar's public API, each policy named by its `@id`:
    /// what a snapshot of `src` is compared with.
    pub fn reference(src: &str) -> PolicySet {
        let mut set = PolicySet::new();
        for p in src.parse::<PolicySet>().expect("policies").policies() {
            let id = p.annotation("id").expect("every test policy has an @id");
            set.add(p.new_id(cedar_policy::PolicyId::new(id)))
                .expect("add");
        }
        set
    }

    impl PolicySnapshot {
        /// The same request decided by Cedar's own authorizer over the
        /// whole `set` (this snapshot's, from [`reference`]), with every tag
        /// and path prefix built whatever the policies name: (allow,
        /// reasons, failed policies), sorted.
        pub fn decide_reference(
            &self,
            set: &PolicySet,
            input: &AuthzInput<'_>,
        ) -> (bool, Vec<String>, Vec<String>) {
            let action = self.actions.get(input.method).expect("action");
            let everything = request::Needs::all();
            let fixed = request::Fixed {
                names: &self.names,
                needs: &everything,
                action: &action.store,
                service: &self.service_entity,
                service_arn: self.service_arn.as_deref(),
                network_arn: self.network_arn.as_deref(),
                trim_context: false,
            };
            let built = request::build(&fixed, input).expect("build");
            let request = ast::Request::new(
                (built.principal, None),
                (built.action, None),
                (built.resource, None),
                built.context,
                Some(self.schema.as_ref()),
                Extensions::all_available(),
            )
            .expect("request");
            let r = cedar_policy_core::authorizer::Authorizer::new().is_authorized(
                request,
                set.as_ref(),
                &built.entities,
            );
            let mut reasons: Vec<String> = r
                .diagnostics
                .reason
                .iter()
                .map(ToString::to_string)
                .collect();
            reasons.sort();
            let mut failed: Vec<String> = r
                .diagnostics
                .errors
                .iter()
                .map(|AuthorizationError::PolicyEvaluationError { id, .. }| id.to_string())
                .collect();
            failed.sort();
            (
                r.decision == cedar_policy_core::authorizer::Decision::Allow,
                reasons,
                failed,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::SHIPPED;
    use super::*;

    #[test]
    fn quoted_is_what_debug_formatting_writes() {
        let plain: String = (0x20u8..0x7f).map(char::from).collect();
        for s in [
            "GET",
            "/api/orders/1",
            "",
            plain.as_str(),
            "/a\"b",
            "/a\\b",
            "/tab\there",
            "/é",
            "\u{7f}",
            "\u{200b}",
        ] {
            assert_eq!(
                quoted("Http::Path::", s),
                format!("Http::Path::{s:?}"),
                "{s:?}"
            );
        }
    }

    #[test]
    fn statements_end_only_at_a_semicolon_outside_strings_and_comments() {
        let src = concat!(
            "// a comment; with \"a quote\n",
            "@id(\"a;b\") permit (principal, action, resource) when { context.path == \"/x;\\\";y\" };\n",
            "forbid (principal, action, resource) // trailing; \"\n",
            "  when { context.host like \"*;*\" };",
            "\n// the end; \n"
        );
        let pieces = statements(src);
        assert_eq!(pieces.concat(), src);
        assert_eq!(pieces.len(), 3, "{pieces:#?}");
        assert!(pieces[0].ends_with("\" };"), "{:?}", pieces[0]);
        assert!(pieces[1].ends_with("\"*;*\" };"), "{:?}", pieces[1]);
        assert_eq!(pieces[2], "\n// the end; \n");
        // An unterminated string or a missing `;` is one piece, left to
        // the parser.
        assert_eq!(statements("permit (\"a;").len(), 1);
    }

    #[test]
    fn a_file_parsed_statement_by_statement_is_the_whole_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let schema_path = dir.path().join("schema.cedarschema");
        std::fs::write(&schema_path, SHIPPED).expect("write");
        let (schema, _) = Schema::from_cedarschema_str(SHIPPED).expect("schema");
        let validator = Validator::new(schema);
        let src = concat!(
            "// leading; \"comment\"\n",
            "permit (principal, action == Action::\"GET\", resource in Http::Path::\"/a;b/\");\n",
            "@id(\"named\") forbid (principal, action, resource) when { context.path like \"*\\\";*\" };\n",
            "permit (principal is Spiffe::Id, action, resource); // done; \"\n",
        );
        let file = dir.path().join("set.cedar");
        let text = |ps: Vec<(String, ast::Policy)>| -> Vec<String> {
            ps.iter().map(|(_, p)| p.to_string()).collect()
        };
        let whole = text(parse_whole(&validator, &file, src, 0).expect("whole"));
        assert_eq!(whole.len(), 3);
        assert_eq!(
            text(parse_file(&validator, &file, src).expect("pieces")),
            whole
        );

        // An error is the whole file's, with the file's line.
        let bad = format!("{src}\npermit (principal, action, resource) when {{ context.nope }};\n");
        let err = parse_file(&validator, &file, &bad).expect_err("invalid");
        assert!(
            err.contains("set.cedar:6: for policy `set.cedar:3`"),
            "{err}"
        );
        assert!(err.contains("attribute `nope`"), "{err}");
        // ... naming the policy as everything else does: by `@id` if it has one.
        let bad = format!("{src}\n@id(\"broken\")\npermit (principal, action, resource) when {{ context.nope }};\n");
        let err = parse_file(&validator, &file, &bad).expect_err("invalid");
        assert!(err.contains("set.cedar:7: for policy `broken`"), "{err}");
        let unterminated = format!("{src}permit (principal, action, resource)");
        assert!(parse_file(&validator, &file, &unterminated).is_err());
        let template = format!("{src}permit (principal == ?principal, action, resource);");
        assert!(parse_file(&validator, &file, &template)
            .expect_err("template")
            .contains("templates are not supported"));

        // The snapshot names unnamed policies by their place in the file.
        std::fs::write(&file, src).expect("write");
        let snapshot = PolicySnapshot::load(
            dir.path(),
            &schema_path,
            AuthzMode::Enforce,
            &ServiceConfig::default(),
        )
        .expect("load");
        let mut ids: Vec<String> = snapshot.all.iter().map(|p| p.id().to_string()).collect();
        ids.sort();
        assert_eq!(ids, ["named", "set.cedar:0", "set.cedar:2"]);
        let first = snapshot
            .all
            .iter()
            .find(|p| p.id().to_string() == "set.cedar:0")
            .expect("first");
        assert!(first.to_string().contains("/a;b/"), "{first}");
    }

    /// Two requests that differ in one thing the key must hold, with the
    /// decision each should get.
    struct Pair {
        what: &'static str,
        method: [&'static str; 2],
        path: [&'static str; 2],
        service: [Option<&'static str>; 2],
        samples: [shape::Sample; 2],
        allow: [bool; 2],
    }

    fn pairs() -> Vec<Pair> {
        let sample = |kind| shape::fullest(kind).expect("sample");
        let with = |kind, change: fn(&mut shape::Sample)| {
            let mut s = sample(kind);
            change(&mut s);
            s
        };
        let same = |kind| [sample(kind), sample(kind)];
        vec![
            Pair {
                what: "organization",
                method: ["GET"; 2],
                path: ["/x"; 2],
                service: [None; 2],
                samples: [
                    sample(0),
                    with(0, |s| {
                        s.identity.aws.iter_mut().for_each(|a| a.org_id = None);
                    }),
                ],
                allow: [true, false],
            },
            Pair {
                what: "principal tags",
                method: ["POST"; 2],
                path: ["/x"; 2],
                service: [None; 2],
                samples: [
                    sample(0),
                    with(0, |s| {
                        s.identity.aws.iter_mut().for_each(|a| {
                            a.tags.insert("team".into(), "billing".into());
                        });
                    }),
                ],
                allow: [true, false],
            },
            Pair {
                what: "path",
                method: ["GET"; 2],
                path: ["/a/b", "/b/b"],
                service: [None; 2],
                samples: same(2),
                allow: [true, false],
            },
            Pair {
                what: "service",
                method: ["GET"; 2],
                path: ["/x"; 2],
                service: [Some("orders"), Some("billing")],
                samples: same(4),
                allow: [true, false],
            },
            Pair {
                what: "cluster",
                method: ["GET"; 2],
                path: ["/x"; 2],
                service: [None; 2],
                samples: [
                    sample(3),
                    with(3, |s| {
                        if let crate::authn::Principal::K8s { cluster, .. } =
                            &mut s.identity.principal
                        {
                            *cluster = "other".into();
                        }
                    }),
                ],
                allow: [true, false],
            },
            Pair {
                what: "method",
                method: ["GET", "DELETE"],
                path: ["/x"; 2],
                service: [None; 2],
                samples: same(0),
                allow: [true, false],
            },
            Pair {
                what: "principal type",
                method: ["PUT"; 2],
                path: ["/x"; 2],
                service: [None; 2],
                samples: [sample(1), sample(0)],
                allow: [true, false],
            },
        ]
    }

    #[test]
    fn a_remembered_decision_is_never_another_requests() {
        let src = r#"
            @id("org") permit (principal, action == Action::"GET", resource) when { principal in Aws::Org::"o-sample" };
            @id("tag") permit (principal, action == Action::"POST", resource) when { principal.hasTag("team") && principal.getTag("team") == "orders" };
            @id("path") permit (principal is Spiffe::Id, action, resource in Http::Path::"/a/");
            @id("service") permit (principal is Oidc::Subject, action, resource in Http::Service::"orders");
            @id("cluster") permit (principal in K8s::Cluster::"cluster", action, resource);
            @id("user") permit (principal is Aws::User, action == Action::"PUT", resource);
        "#;
        let reference = testing::reference(src);
        let headers = HeaderMap::new();
        for pair in pairs() {
            // One set for both requests: the second is decided after the
            // first was remembered.
            let set = testing::snapshot(SHIPPED, src);
            assert!(
                set.decisions.is_some(),
                "this set names no context attribute"
            );
            for i in 0..2 {
                let input = AuthzInput {
                    identity: &pair.samples[i].identity,
                    method: pair.method[i],
                    path: pair.path[i],
                    query: None,
                    headers: &headers,
                    host: None,
                    conn: &pair.samples[i].conn,
                    service: pair.service[i],
                    service_arn: None,
                };
                for round in ["first", "remembered"] {
                    let d = set
                        .decide(&input)
                        .map_err(|e| e.to_string())
                        .expect("decide");
                    assert_eq!(d.allow, pair.allow[i], "{} {i} {round}", pair.what);
                    let (allow, reasons, _) = set.decide_reference(&reference, &input);
                    assert_eq!(
                        (d.allow, d.policies.to_vec()),
                        (allow, reasons),
                        "{}",
                        pair.what
                    );
                }
            }
        }
    }

    #[test]
    fn a_set_that_names_a_context_attribute_remembers_nothing() {
        let set = testing::snapshot(
            SHIPPED,
            r#"permit (principal, action, resource) when { context.host == "a" };"#,
        );
        assert!(set.decisions.is_none());
    }
}
