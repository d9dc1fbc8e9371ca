//! The body type every layer of the pipeline speaks.

use std::fmt;

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};

/// A body error from either side of the proxy.
#[derive(Debug)]
pub struct BodyError(Box<dyn std::error::Error + Send + Sync>);

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl BodyError {
    pub fn new(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self(e.into())
    }

    /// Whether the error (or its cause) is `E`.
    pub fn is<E: std::error::Error + 'static>(&self) -> bool {
        self.0.is::<E>()
    }

    /// Whether the client reset its HTTP/2 stream: it has gone, as a
    /// client that closes its connection has, rather than sent a bad body.
    pub fn is_client_reset(&self) -> bool {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&*self.0);
        while let Some(e) = cause {
            if let Some(h2) = e.downcast_ref::<h2::Error>() {
                return h2.is_reset() && h2.is_remote();
            }
            cause = e.source();
        }
        false
    }

    /// Why a client's request body failed, as the client is told: it ended
    /// before the end its framing promised (the connection closed or was
    /// reset mid-body), it was malformed (a bad chunk), or neither is known
    /// (an HTTP/2 stream error).
    pub fn client_reason(&self) -> &'static str {
        use std::io::ErrorKind;
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&*self.0);
        while let Some(e) = cause {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                match io.kind() {
                    ErrorKind::UnexpectedEof
                    | ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted => {
                        return "request body ended early: the connection closed";
                    }
                    ErrorKind::InvalidInput | ErrorKind::InvalidData => {
                        return "malformed request body";
                    }
                    _ => {}
                }
            }
            cause = e.source();
        }
        "request body could not be read"
    }
}

/// A streaming request or response body.
pub type Body = UnsyncBoxBody<Bytes, BodyError>;

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Boxes any body whose error converts into a boxed error.
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    body.map_err(BodyError::new).boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error as hyper gives it: a wrapper whose cause is the I/O error.
    #[derive(Debug)]
    struct Wrapped(std::io::Error);

    impl fmt::Display for Wrapped {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("error reading a body from connection")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_client_body_error_is_told_by_its_cause() {
        use std::io::{Error, ErrorKind};
        let cases = [
            (
                ErrorKind::UnexpectedEof,
                "request body ended early: the connection closed",
            ),
            (
                ErrorKind::ConnectionReset,
                "request body ended early: the connection closed",
            ),
            (ErrorKind::InvalidInput, "malformed request body"),
            (ErrorKind::InvalidData, "malformed request body"),
            (ErrorKind::Other, "request body could not be read"),
        ];
        for (kind, reason) in cases {
            let e = BodyError::new(Wrapped(Error::new(kind, "x")));
            assert_eq!(e.client_reason(), reason, "{kind:?}");
        }
        // No I/O cause at all (an HTTP/2 stream error): neither claim is made.
        let e = BodyError::new("stream error received: operation was canceled");
        assert_eq!(e.client_reason(), "request body could not be read");
        // An HTTP/2 error that is no reset of the client's is not the client
        // going away, nor is a closed connection (a client's own reset is
        // in hostile.rs's stream-reset test: h2 makes no remote reset here).
        assert!(!BodyError::new(h2::Error::from(h2::Reason::CANCEL)).is_client_reset());
        assert!(
            !BodyError::new(Wrapped(Error::from(ErrorKind::ConnectionReset))).is_client_reset()
        );
    }
}
