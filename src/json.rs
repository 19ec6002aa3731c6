//! Matrix JSON responses, in one place: the layer's rejections, the refresh endpoints' answers
//! and the axum extractors' errors are all written here.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

/// A JSON response: `status`, `Content-Type: application/json` and `body`.
pub(crate) fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Bytes> {
    let mut response = Response::new(Bytes::from(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A Matrix error: `{"errcode", "error"}`.
pub(crate) fn matrix_error(status: StatusCode, errcode: &str, error: &str) -> Response<Bytes> {
    json_response(
        status,
        &serde_json::json!({"errcode": errcode, "error": error}),
    )
}
