//! The admin listener: `/metrics`, `/healthz`, `/readyz`.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use arc_swap::ArcSwap;

use crate::authn::Authenticator;
use crate::body::{self, Body};
use crate::metrics::{IssuerOnly, Metrics};

/// Admin connections open at once, at most.
pub const ADMIN_CONNECTIONS: usize = 64;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct Admin {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    /// Config, policies and certificates loaded, and not draining.
    pub ready: Arc<AtomicBool>,
    /// Ready also needs every issuer's keys.
    pub authn: Arc<ArcSwap<Authenticator>>,
    /// The active policy set, named in `/readyz`.
    pub policies: Arc<ArcSwap<crate::authz::PolicySnapshot>>,
}

impl Admin {
    pub fn respond(&self, req: &Request<Incoming>) -> Response<Body> {
        let text = |status: StatusCode, s: &'static str| {
            let mut rsp = Response::new(body::full(s));
            *rsp.status_mut() = status;
            rsp
        };
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        }
        match req.uri().path() {
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => self.readyz(),
            "/metrics" => {
                self.update_gauges();
                let mut out = String::new();
                if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
                    return text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n");
                }
                let mut rsp = Response::new(body::full(out));
                rsp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                rsp
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    fn readyz(&self) -> Response<Body> {
        let (status, msg) = if !self.ready.load(Ordering::Acquire) {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: draining\n".to_owned(),
            )
        } else {
            let missing = self.authn.load().jwt.missing_keys();
            if missing.is_empty() {
                let set = self.policies.load();
                (StatusCode::OK, format!("ready\npolicy set: {}\n", set.hash))
            } else {
                let names: Vec<String> = missing.iter().map(|i| format!("`{i}`")).collect();
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: no keys yet for issuer {}\n", names.join(", ")),
                )
            }
        };
        let mut rsp = Response::new(body::full(msg));
        *rsp.status_mut() = status;
        rsp
    }

    /// Gauges computed at scrape time.
    fn update_gauges(&self) {
        let now = std::time::SystemTime::now();
        for issuer in self.authn.load().jwt.issuers() {
            if let Some(keys) = issuer.source.current() {
                let age = now.duration_since(keys.fetched_at).unwrap_or_default();
                self.metrics
                    .jwks_age
                    .get_or_create(&IssuerOnly {
                        issuer: issuer.source.issuer.clone(),
                    })
                    .set(age.as_secs_f64());
            }
        }
    }

    /// Serves until `shutdown` resolves. The port may be reachable beyond
    /// the host (a task's or pod's scrape target) and shares the process's
    /// descriptors with the proxy, so what a client can hold is bounded:
    /// HTTP/1.1 only (scrapers and probes speak it), a request head within
    /// `header_read_timeout` (which also bounds a kept-alive connection's
    /// wait for its next request), and at most [`ADMIN_CONNECTIONS`] open,
    /// past which a new one is closed on accept.
    pub async fn serve(
        self,
        listener: TcpListener,
        header_read_timeout: Duration,
        shutdown: impl Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let slots = Arc::new(tokio::sync::Semaphore::new(ADMIN_CONNECTIONS));
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout);
        loop {
            let stream = tokio::select! {
                a = listener.accept() => match a {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        // Out of descriptors and similar: back off instead of spinning.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => return,
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                drop(stream);
                continue;
            };
            let admin = self.clone();
            let conn = http.serve_connection(
                TokioIo::new(stream),
                hyper::service::service_fn(move |req: Request<Incoming>| {
                    let rsp = admin.respond(&req);
                    async move { Ok::<_, Infallible>(rsp) }
                }),
            );
            tokio::spawn(async move {
                let _slot = slot;
                let _ = conn.await;
            });
        }
    }
}
