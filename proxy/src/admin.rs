//! The admin listener: `/metrics`, `/healthz`, `/readyz`.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::body::{self, Body};

/// What the admin endpoints read.
#[derive(Clone)]
pub struct Admin {
    pub registry: Arc<Registry>,
    /// Config, policies, certificates and keys loaded, and not draining.
    pub ready: Arc<AtomicBool>,
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
            "/readyz" if self.ready.load(Ordering::Acquire) => text(StatusCode::OK, "ready\n"),
            "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
            "/metrics" => {
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

    /// Serves until `shutdown` resolves.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let stream = tokio::select! {
                a = listener.accept() => match a {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        continue;
                    }
                },
                () = &mut shutdown => return,
            };
            let admin = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let rsp = admin.respond(&req);
                    async move { Ok::<_, Infallible>(rsp) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }
}
