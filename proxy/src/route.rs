//! Gateway mode: choose the route (upstream and `Http::Service`) from the
//! host and path. Runs after normalization, before authentication; a host no
//! route matches is answered 404 before anything else happens.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{header, Request, Response};
use tower::{Layer, Service};

use crate::body::Body;
use crate::config::RouteConfig;
use crate::error::ProxyError;

/// The route a request took.
#[derive(Debug, Clone)]
pub struct Route {
    /// Index into the configured routes.
    pub index: usize,
    pub service: Arc<str>,
    pub service_arn: Option<Arc<str>>,
}

/// The host a request names, lowercase, without a port.
fn request_host<B>(req: &Request<B>) -> Option<String> {
    let raw = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))?;
    let host = match raw.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => raw.rsplit_once(':').map_or(raw, |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                raw
            }
        }),
    };
    Some(host.trim_end_matches('.').to_ascii_lowercase())
}

#[derive(Clone)]
pub struct RouteLayer {
    routes: Arc<Vec<Route>>,
    configs: Arc<Vec<RouteConfig>>,
}

impl RouteLayer {
    pub fn new(configs: &[RouteConfig]) -> Self {
        let routes = configs
            .iter()
            .enumerate()
            .map(|(index, r)| Route {
                index,
                service: Arc::from(r.service.as_str()),
                service_arn: r.service_arn.as_deref().map(Arc::from),
            })
            .collect();
        Self {
            routes: Arc::new(routes),
            configs: Arc::new(configs.to_vec()),
        }
    }
}

impl<S> Layer<S> for RouteLayer {
    type Service = Router<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Router {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Router<S> {
    inner: S,
    layer: RouteLayer,
}

impl<S> Service<Request<Body>> for Router<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = crate::error::Either<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        if self.layer.configs.is_empty() {
            return futures_util::future::Either::Left(self.inner.call(req));
        }
        let host = request_host(&req).unwrap_or_default();
        let path = req.uri().path();
        let found = self
            .layer
            .configs
            .iter()
            .position(|r| r.matches(&host, path))
            .and_then(|i| self.layer.routes.get(i).cloned());
        match found {
            Some(route) => {
                req.extensions_mut().insert(route);
                futures_util::future::Either::Left(self.inner.call(req))
            }
            None => crate::error::reject(ProxyError::NoRoute),
        }
    }
}
