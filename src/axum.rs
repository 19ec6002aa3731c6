//! axum extractors for the identity the layer verified.

use std::fmt;

use axum_core::extract::{FromRequestParts, OptionalFromRequestParts};
use axum_core::response::{IntoResponse, Response};
use http::request::Parts;
use http::StatusCode;

use crate::identity::MatrixUser;

/// The rejection of the [`MatrixUser`] extractor: the request has no verified user, which on a
/// route the layer covers can only mean the layer is missing or skips this route.
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct MissingMatrixUser;

impl fmt::Display for MissingMatrixUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "no MatrixUser in the request extensions: is `MatrixAuthLayer` applied to this \
             route (and not skipped or optional here)? Use `Option<MatrixUser>` on optional routes.",
        )
    }
}

impl std::error::Error for MissingMatrixUser {}

/// A Matrix JSON error as an axum response.
fn matrix_error(status: StatusCode, errcode: &str, error: &str) -> Response {
    crate::json::matrix_error(status, errcode, error).map(axum_core::body::Body::from)
}

impl IntoResponse for MissingMatrixUser {
    fn into_response(self) -> Response {
        // A server misconfiguration, not the client's fault: 500 with the Matrix error shape.
        tracing::error!("{self}");
        matrix_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "M_UNKNOWN",
            "The server is misconfigured: authentication layer missing.",
        )
    }
}

impl<S: Send + Sync> FromRequestParts<S> for MatrixUser {
    type Rejection = MissingMatrixUser;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<MatrixUser>()
            .cloned()
            .ok_or(MissingMatrixUser)
    }
}

/// `Option<MatrixUser>` in a handler: `None` on routes where the layer is optional and the
/// request came without a token.
impl<S: Send + Sync> OptionalFromRequestParts<S> for MatrixUser {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<MatrixUser>().cloned())
    }
}

/// An application service's request, for endpoints only application services may call
/// (e.g. `POST /_matrix/client/v1/appservice/{id}/ping`). Other callers get `403 M_FORBIDDEN`;
/// `Option<AppServiceRequest>` accepts everyone and says who is an application service.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AppServiceRequest {
    /// Who the application service acts as (its sender, or `?user_id=`).
    pub user: MatrixUser,
    /// The registration id of the application service.
    pub appservice: String,
}

/// The rejection of [`AppServiceRequest`].
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum AppServiceRejection {
    /// No identity at all: the layer is missing (a server misconfiguration).
    MissingLayer,
    /// A user, not an application service: `403 M_FORBIDDEN`.
    NotAnAppService,
}

impl IntoResponse for AppServiceRejection {
    fn into_response(self) -> Response {
        match self {
            AppServiceRejection::MissingLayer => MissingMatrixUser.into_response(),
            AppServiceRejection::NotAnAppService => matrix_error(
                StatusCode::FORBIDDEN,
                "M_FORBIDDEN",
                "Only application services may call this endpoint.",
            ),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for AppServiceRequest {
    type Rejection = AppServiceRejection;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let user = parts
            .extensions
            .get::<MatrixUser>()
            .ok_or(AppServiceRejection::MissingLayer)?;
        let appservice = user
            .appservice()
            .ok_or(AppServiceRejection::NotAnAppService)?
            .to_owned();
        Ok(Self {
            user: user.clone(),
            appservice,
        })
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for AppServiceRequest {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<MatrixUser>().and_then(|user| {
            user.appservice().map(|id| Self {
                user: user.clone(),
                appservice: id.to_owned(),
            })
        }))
    }
}
