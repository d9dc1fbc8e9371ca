//! The request path, assembled in one place. Read top to bottom, this is
//! what happens to every inbound request.

use std::convert::Infallible;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{Request, Response};
use tower::{Service, ServiceBuilder};

use crate::audit::DecisionLog;
use crate::authn::{Authenticator, AuthnLayer};
use crate::authz::{AuthzLayer, PolicySnapshot};
use crate::body::Body;
use crate::config::{AuthzMode, IdentityHeaders, UpstreamConfig};
use crate::forward::Forward;
use crate::identity::IdentityLayer;
use crate::metrics::Metrics;
use crate::normalize::NormalizeLayer;
use crate::observe::ObserveLayer;
use crate::strip::StripLayer;

/// What the pipeline reads at run time: reloadable snapshots and sinks.
#[derive(Clone)]
pub struct Shared {
    pub authn: Arc<ArcSwap<Authenticator>>,
    pub policies: Arc<ArcSwap<PolicySnapshot>>,
    /// Evaluated, logged and counted on every request; never enforced.
    pub shadow: Option<Arc<ArcSwap<PolicySnapshot>>>,
    pub metrics: Arc<Metrics>,
    pub log: DecisionLog,
    pub mode: AuthzMode,
    pub explain: bool,
    pub identity: IdentityHeaders,
    pub upstream: UpstreamConfig,
    pub routes: Vec<crate::config::RouteConfig>,
    /// Requests in the pipeline at once, at most.
    pub max_requests: usize,
    /// `runtime.max_header_bytes`.
    pub max_header_bytes: usize,
    /// `runtime.idle_timeout`: also how long an upgraded (WebSocket)
    /// connection may carry nothing either way.
    pub idle_timeout: std::time::Duration,
}

/// The outermost layer, also handed to the listener for the requests hyper
/// refuses before the stack sees them.
pub fn observer(shared: &Shared) -> ObserveLayer {
    ObserveLayer::new(
        shared.metrics.clone(),
        shared.log.clone(),
        shared.mode,
        shared.explain,
    )
}

/// Builds the request stack, in request order.
pub fn build(
    shared: &Shared,
) -> impl Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future: Send>
       + Clone
       + Send
       + 'static {
    ServiceBuilder::new()
        // request id, decision log, metrics; every error below becomes its response here
        .layer(observer(shared))
        // 503 overloaded past runtime.max_requests in flight, never an unbounded queue
        .layer(crate::shed::ShedLayer::new(shared.max_requests))
        // 431 for heads over runtime.max_header_bytes; 400 for malformed paths, CONNECT, h2c
        // and non-websocket upgrades; normalize the path
        .layer(NormalizeLayer {
            max_head: shared.max_header_bytes,
        })
        // drop client-sent identity and forwarding headers before anything reads them
        .layer(StripLayer)
        // gateway mode: pick the route (upstream, Http::Service) by host and path; 404 when none
        .layer(crate::route::RouteLayer::new(&shared.routes))
        // exactly one credential, verified; 401 when present but invalid
        .layer(AuthnLayer::new(shared.authn.clone()))
        // Cedar: 405 for undeclared methods, 403 on deny (audit mode: log, forward)
        .layer(AuthzLayer::new(
            shared.policies.clone(),
            shared.shadow.clone(),
        ))
        // hop-by-hop headers out; verified identity and forwarding headers in
        .layer(IdentityLayer {
            headers: shared.identity,
        })
        // pooled client to the local service; 502 / 504 when it fails
        .service(Forward::new(
            &shared.upstream,
            &shared.routes,
            shared.idle_timeout,
            shared.metrics.clone(),
        ))
}
