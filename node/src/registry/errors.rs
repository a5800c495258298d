//! Errors: the public [`RegistryError`] for setting a registry up, and the
//! internal [`ApiError`] that becomes an OCI error response
//! (`{"errors":[{"code","message","detail"}]}`).

use std::path::PathBuf;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use cairn_chunkstore::StoreError;

/// Why a [`Registry`](super::Registry) could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A file-system operation on the uploads directory failed.
    #[error("{what} {path}: {source}", path = path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A metric could not be registered (for example, registered twice in
    /// the same Prometheus registry).
    #[error("registry metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The chunk store failed while cleaning up after an earlier run.
    #[error("chunk store: {0}")]
    Store(#[from] StoreError),
    /// The configuration is unusable.
    #[error("invalid registry configuration: {0}")]
    Config(String),
    /// Replicating a manifest in failed.
    #[error("replication: {0}")]
    Replication(String),
}

/// The error codes of the OCI distribution spec (plus `UNKNOWN` for
/// internal failures, and the reference registry's `PAGINATION_NUMBER_INVALID`,
/// `RANGE_INVALID` and `TAG_INVALID`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Code {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    Unauthorized,
    Unsupported,
    TooManyRequests,
    PaginationNumberInvalid,
    RangeInvalid,
    TagInvalid,
    Unknown,
}

impl Code {
    /// The code as it appears in the JSON body.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Code::BlobUnknown => "BLOB_UNKNOWN",
            Code::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            Code::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            Code::DigestInvalid => "DIGEST_INVALID",
            Code::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            Code::ManifestInvalid => "MANIFEST_INVALID",
            Code::ManifestUnknown => "MANIFEST_UNKNOWN",
            Code::NameInvalid => "NAME_INVALID",
            Code::NameUnknown => "NAME_UNKNOWN",
            Code::SizeInvalid => "SIZE_INVALID",
            Code::Unauthorized => "UNAUTHORIZED",
            Code::Unsupported => "UNSUPPORTED",
            Code::TooManyRequests => "TOOMANYREQUESTS",
            Code::PaginationNumberInvalid => "PAGINATION_NUMBER_INVALID",
            Code::RangeInvalid => "RANGE_INVALID",
            // Not in the spec's table; the reference registry uses it.
            Code::TagInvalid => "TAG_INVALID",
            Code::Unknown => "UNKNOWN",
        }
    }

    /// The status the spec (or the reference registry) gives the code.
    pub(crate) fn status(self) -> StatusCode {
        match self {
            Code::BlobUnknown
            | Code::BlobUploadUnknown
            | Code::ManifestUnknown
            | Code::NameUnknown => StatusCode::NOT_FOUND,
            Code::BlobUploadInvalid
            | Code::DigestInvalid
            | Code::ManifestBlobUnknown
            | Code::ManifestInvalid
            | Code::NameInvalid
            | Code::SizeInvalid
            | Code::PaginationNumberInvalid
            | Code::TagInvalid => StatusCode::BAD_REQUEST,
            Code::Unauthorized => StatusCode::UNAUTHORIZED,
            Code::Unsupported => StatusCode::METHOD_NOT_ALLOWED,
            Code::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            Code::RangeInvalid => StatusCode::RANGE_NOT_SATISFIABLE,
            Code::Unknown => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// An error answered to a client (boxed: it travels through many
/// `Result`s).
#[derive(Debug)]
pub(crate) struct ApiError(Box<ErrorBody>);

/// What an [`ApiError`] holds.
#[derive(Debug)]
pub(crate) struct ErrorBody {
    pub(crate) code: Code,
    pub(crate) status: StatusCode,
    pub(crate) message: String,
    pub(crate) detail: Option<serde_json::Value>,
    pub(crate) headers: HeaderMap,
}

impl std::ops::Deref for ApiError {
    type Target = ErrorBody;

    fn deref(&self) -> &ErrorBody {
        &self.0
    }
}

impl ApiError {
    /// An error with the code's usual status.
    pub(crate) fn new(code: Code, message: impl Into<String>) -> Self {
        Self(Box::new(ErrorBody {
            code,
            status: code.status(),
            message: message.into(),
            detail: None,
            headers: HeaderMap::new(),
        }))
    }

    /// An internal failure: logged, answered with 500 `UNKNOWN`.
    pub(crate) fn internal(what: impl std::fmt::Display) -> Self {
        tracing::error!(error = %what, "registry internal error");
        Self::new(Code::Unknown, format!("internal error: {what}"))
    }

    /// Override the HTTP status.
    pub(crate) fn status(mut self, status: StatusCode) -> Self {
        self.0.status = status;
        self
    }

    /// Attach the `detail` member.
    pub(crate) fn detail(mut self, detail: serde_json::Value) -> Self {
        self.0.detail = Some(detail);
        self
    }

    /// Add a response header (skipped if the value is not a valid header).
    pub(crate) fn header(mut self, name: HeaderName, value: &str) -> Self {
        if let Ok(v) = HeaderValue::from_str(value) {
            self.0.headers.insert(name, v);
        }
        self
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status,
            self.code.as_str(),
            self.message
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let e = *self.0;
        let mut err = serde_json::json!({
            "code": e.code.as_str(),
            "message": e.message,
        });
        if let Some(d) = e.detail {
            err["detail"] = d;
        }
        let body = serde_json::json!({ "errors": [err] }).to_string();
        let mut resp = (e.status, body).into_response();
        resp.headers_mut().insert(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        for (k, v) in e.headers.iter() {
            resp.headers_mut().insert(k.clone(), v.clone());
        }
        resp
    }
}
