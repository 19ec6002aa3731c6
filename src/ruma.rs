//! Conversions to [ruma](https://ruma.dev)'s types (feature `ruma`, through `ruma-common` 0.20,
//! the version `ruma` 0.17 and `ruma-client-api` 0.25 use).
//!
//! A handler written against ruma gets its identifiers from the [`MatrixUser`] the layer
//! attached, and a homeserver that renders errors with ruma turns a [`Rejection`] into the same
//! [`ruma_common::api::error::Error`] its endpoints return; the JSON ruma then sends is the JSON
//! this layer sends. The mapping is documented on [`Rejection::ruma_error_kind`].

use ruma_common::api::error::{
    Error, ErrorBody, ErrorKind, StandardErrorBody, UnknownTokenErrorData,
};
use ruma_common::{IdParseError, OwnedDeviceId, OwnedUserId};

use crate::{MatrixUser, Rejection};

impl MatrixUser {
    /// [`Self::user_id`] as ruma's [`OwnedUserId`].
    ///
    /// ruma parses user ids with the lenient grammar it uses for ids from clients: historical ids
    /// such as `@Alice:example.org` convert (and [`ruma_common::UserId::is_historical`] says so).
    /// It is stricter than [`crate::macaroon::is_valid_user_id`] about the server name, so a token whose
    /// `user_id` caveat passed this layer can still fail here: a port above 65535
    /// (`@a:example.org:99999`) or a bracketed host that is not an IPv6 address (`@a:[1:2]`).
    /// An id a [`crate::hooks::TokenResolver`] vouched for is converted as it is, unchecked by the layer.
    pub fn ruma_user_id(&self) -> Result<OwnedUserId, IdParseError> {
        OwnedUserId::try_from(self.user_id())
    }

    /// [`Self::device_id`] as ruma's [`OwnedDeviceId`] (device ids are opaque strings: any
    /// device id converts).
    pub fn ruma_device_id(&self) -> Option<OwnedDeviceId> {
        self.device_id().map(OwnedDeviceId::from)
    }
}

impl TryFrom<&MatrixUser> for OwnedUserId {
    type Error = IdParseError;

    /// See [`MatrixUser::ruma_user_id`].
    fn try_from(user: &MatrixUser) -> Result<Self, Self::Error> {
        user.ruma_user_id()
    }
}

impl Rejection {
    #[doc = include_str!("../docs/ruma.md")]
    pub fn ruma_error_kind(&self) -> ErrorKind {
        match self.errcode() {
            "M_MISSING_TOKEN" => ErrorKind::MissingToken,
            "M_UNKNOWN_TOKEN" => {
                let mut data = UnknownTokenErrorData::new();
                data.soft_logout = self.soft_logout();
                ErrorKind::UnknownToken(data)
            }
            "M_USER_LOCKED" => ErrorKind::UserLocked,
            "M_GUEST_ACCESS_FORBIDDEN" => ErrorKind::GuestAccessForbidden,
            "M_USER_SUSPENDED" => ErrorKind::UserSuspended,
            "M_FORBIDDEN" => ErrorKind::Forbidden,
            "M_UNKNOWN_DEVICE" => ErrorKind::UnknownDevice,
            "M_UNKNOWN" => ErrorKind::Unknown,
            // An errcode added to `Rejection` later: let ruma read our own JSON, which keeps the
            // errcode and every extra field (as ruma's custom kind) rather than guessing.
            _ => serde_json::from_str::<StandardErrorBody>(&self.to_json())
                .map(|body| body.kind)
                .unwrap_or(ErrorKind::Unknown),
        }
    }
}

impl From<&Rejection> for Error {
    /// [`Rejection::status`], [`Rejection::ruma_error_kind`] and [`Rejection::message`] as ruma's
    /// endpoint error.
    fn from(rejection: &Rejection) -> Self {
        Error::new(
            rejection.status(),
            ErrorBody::Standard(StandardErrorBody::new(
                rejection.ruma_error_kind(),
                rejection.message().to_owned(),
            )),
        )
    }
}

impl From<Rejection> for Error {
    /// See `From<&Rejection>`: the same conversion, by value.
    fn from(rejection: Rejection) -> Self {
        Self::from(&rejection)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Kind, Missing, Unknown};

    /// Every kind of rejection, through both the explicit table and ruma's own parser of our
    /// JSON: the same kind, and ruma serializes it back to exactly our body.
    #[test]
    fn every_kind_matches_what_ruma_reads_from_our_json() {
        let all = [
            Kind::Missing(Missing::NoToken),
            Kind::Missing(Missing::Mixed),
            Kind::Unknown(Unknown::BadSignature),
            Kind::Unknown(Unknown::Expired),
            Kind::Unknown(Unknown::Deactivated),
            Kind::GuestForbidden,
            Kind::Unavailable,
            Kind::Locked,
            Kind::Suspended,
            Kind::AppserviceForbidden,
            Kind::UnknownDevice,
        ];
        for kind in all {
            let rejection = Rejection::of(kind);
            let parsed: StandardErrorBody = serde_json::from_str(&rejection.to_json()).unwrap();
            assert_eq!(rejection.ruma_error_kind(), parsed.kind, "{rejection:?}");
            assert!(
                parsed.kind.custom_json_data().is_none(),
                "{rejection:?}: ruma has a variant"
            );
            let error = Error::from(&rejection);
            assert_eq!(error.status_code, rejection.status());
            let ErrorBody::Standard(body) = error.body else {
                unreachable!()
            };
            assert_eq!(
                serde_json::to_value(&body).unwrap(),
                serde_json::from_str::<serde_json::Value>(&rejection.to_json()).unwrap(),
                "{rejection:?}"
            );
        }
    }
}
