//! Small typed errors and the one place that turns them into responses.
//!
//! Every layer fails with a [`ProxyError`]; [`rescue`] maps it to the status and
//! JSON body of the contract (or a trailers-only gRPC answer). Clients see a
//! short reason; operators see the detail in the log.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use http::{header, HeaderValue, Response, StatusCode};

use crate::body::{self, Body};

/// A short, client-safe reason. Never holds a secret.
pub type Reason = Cow<'static, str>;

/// Why a request was not forwarded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    #[error("bad request: {0}")]
    BadRequest(Reason),
    #[error("unauthenticated ({method}): {reason}")]
    Unauthenticated {
        /// Authentication method that failed (a fixed label value).
        method: &'static str,
        /// Fixed label value for metrics.
        code: &'static str,
        reason: Reason,
    },
    #[error("forbidden")]
    Forbidden,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("no route for this host")]
    NoRoute,
    #[error("payload too large")]
    PayloadTooLarge,
    /// A request head over `runtime.max_header_bytes`.
    #[error("request head too large")]
    HeadersTooLarge,
    #[error("unavailable: {reason}")]
    Unavailable {
        reason: Reason,
        retry_after: Duration,
    },
    #[error("upstream unavailable: {0}")]
    UpstreamUnavailable(Reason),
    #[error("upstream timed out")]
    UpstreamTimeout,
    /// The client paused its request body for longer than the request
    /// timeout.
    #[error("request body not received in time")]
    RequestTimeout,
    /// The client went away before the response (it reset its HTTP/2
    /// stream mid-body): logged and counted with nginx's 499, answered to
    /// nobody.
    #[error("{CLIENT_GONE}")]
    ClientGone,
}

/// Why a request that got no answer is logged with status 499.
const CLIENT_GONE: &str = "connection closed before the response";

/// nginx's "client closed request".
const CLIENT_CLOSED_REQUEST: u16 = 499;

impl ProxyError {
    pub fn bad_request(reason: impl Into<Reason>) -> Self {
        Self::BadRequest(reason.into())
    }

    pub fn unauthenticated(
        method: &'static str,
        code: &'static str,
        reason: impl Into<Reason>,
    ) -> Self {
        Self::Unauthenticated {
            method,
            code,
            reason: reason.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamUnavailable(_) => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::ClientGone => {
                StatusCode::from_u16(CLIENT_CLOSED_REQUEST).unwrap_or(StatusCode::BAD_REQUEST)
            }
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::Unauthenticated { .. } => "unauthenticated",
            Self::Forbidden => "forbidden",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::NoRoute => "no_route",
            Self::PayloadTooLarge => "payload_too_large",
            Self::HeadersTooLarge => "headers_too_large",
            Self::Unavailable { .. } => "unavailable",
            Self::UpstreamUnavailable(_) | Self::UpstreamTimeout => "upstream_unavailable",
            Self::RequestTimeout => "request_timeout",
            Self::ClientGone => "client_gone",
        }
    }

    /// The reason shown to clients, if this kind of error carries one.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Self::BadRequest(r)
            | Self::Unauthenticated { reason: r, .. }
            | Self::Unavailable { reason: r, .. }
            | Self::UpstreamUnavailable(r) => Some(r),
            Self::UpstreamTimeout => Some("upstream timed out"),
            Self::RequestTimeout => Some("request body not received in time"),
            Self::ClientGone => Some(CLIENT_GONE),
            Self::PayloadTooLarge => Some("body larger than the configured limit"),
            Self::HeadersTooLarge => Some("request head larger than the configured limit"),
            Self::Forbidden | Self::MethodNotAllowed => None,
            Self::NoRoute => Some("no route for this host"),
        }
    }

    fn grpc_status(&self) -> u16 {
        match self {
            Self::Unauthenticated { .. } => 16,
            Self::Forbidden => 7,
            Self::Unavailable { .. } | Self::UpstreamUnavailable(_) | Self::UpstreamTimeout => 14,
            Self::BadRequest(_) | Self::MethodNotAllowed => 3,
            Self::NoRoute => 12,
            Self::RequestTimeout => 4,
            Self::PayloadTooLarge | Self::HeadersTooLarge => 8,
            // CANCELLED
            Self::ClientGone => 1,
        }
    }
}

/// A boxed response future, for layers that answer before calling inward.
pub type BoxResponse = Pin<Box<dyn Future<Output = Result<Response<Body>, ProxyError>> + Send>>;

/// The future of a layer that either calls inward (`F`) or refuses here.
pub type Either<F> = futures_util::future::Either<F, BoxResponse>;

/// Refuses a request from a layer whose future is [`Either`].
pub fn reject<F>(e: ProxyError) -> Either<F> {
    futures_util::future::Either::Right(Box::pin(async move { Err(e) }))
}

/// Turns an error into the response the client receives.
pub fn rescue(err: &ProxyError, request_id: &str, grpc: bool) -> Response<Body> {
    let mut rsp = if grpc {
        let mut rsp = Response::new(body::empty());
        let headers = rsp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from(err.grpc_status()));
        if let Some(msg) = err
            .reason()
            .and_then(|r| HeaderValue::try_from(pct(r)).ok())
        {
            headers.insert("grpc-message", msg);
        }
        rsp
    } else {
        let mut json = serde_json::json!({ "error": err.code(), "request_id": request_id });
        if let Some(reason) = err.reason() {
            json["reason"] = serde_json::Value::from(reason);
        }
        let mut rsp = Response::new(body::full(json.to_string()));
        *rsp.status_mut() = err.status();
        rsp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        rsp
    };
    if let ProxyError::Unavailable { retry_after, .. } = err {
        rsp.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(retry_after.as_secs().max(1)),
        );
    }
    if let Ok(id) = HeaderValue::from_str(request_id) {
        rsp.headers_mut().insert("x-request-id", id);
    }
    rsp
}

/// Percent-encodes a gRPC message as the gRPC spec asks.
fn pct(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
