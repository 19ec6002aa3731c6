//! How the homeserver authenticates itself to the introspection endpoint.

use std::fmt;

use base64::Engine;
use http::HeaderValue;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// What `application/x-www-form-urlencoded` leaves as it is (the WHATWG URL standard's
/// form-urlencoded set, minus the space, which is encoded as `%20`: equally valid).
pub(crate) const FORM: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'*')
    .remove(b'-')
    .remove(b'.')
    .remove(b'_');

/// The homeserver's credentials at the introspection endpoint. `Debug` never shows a secret.
///
/// ```
/// use tower_matrix_auth::hooks::oauth2::ClientAuth;
/// // The Matrix Authentication Service: the `matrix.secret` both sides share.
/// let mas = ClientAuth::shared_secret("the shared secret");
/// // Any OAuth 2.0 server: a confidential client (`client_secret_basic`, RFC 6749 §2.3.1).
/// let basic = ClientAuth::client_secret_basic("homeserver", "client secret");
/// assert!(!format!("{mas:?} {basic:?}").contains("secret\""));
/// ```
#[derive(Clone)]
pub struct ClientAuth {
    kind: Kind,
    /// The `Authorization` header, built once, marked sensitive.
    header: Option<HeaderValue>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    None,
    SharedSecret,
    ClientSecretBasic,
}

impl ClientAuth {
    /// No client authentication (an endpoint reachable only by the homeserver).
    pub fn none() -> Self {
        Self {
            kind: Kind::None,
            header: None,
        }
    }

    /// MAS style: `Authorization: Bearer <shared secret>` (MAS's `matrix.secret`, Synapse's
    /// `matrix_authentication_service.secret`).
    ///
    /// # Panics
    ///
    /// If the secret cannot be a header value (a control character in it): a configuration
    /// error, found at start-up.
    pub fn shared_secret(secret: impl AsRef<str>) -> Self {
        let mut header = HeaderValue::try_from(format!("Bearer {}", secret.as_ref()))
            .expect("the shared secret must be visible ASCII (it goes into a header)");
        header.set_sensitive(true);
        Self {
            kind: Kind::SharedSecret,
            header: Some(header),
        }
    }

    /// `client_secret_basic` (RFC 6749 §2.3.1): HTTP Basic with the client id and secret, each
    /// form-urlencoded first, as the RFC asks.
    pub fn client_secret_basic(client_id: impl AsRef<str>, client_secret: impl AsRef<str>) -> Self {
        let pair = format!(
            "{}:{}",
            utf8_percent_encode(client_id.as_ref(), FORM),
            utf8_percent_encode(client_secret.as_ref(), FORM)
        );
        let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
        let mut header =
            HeaderValue::try_from(format!("Basic {encoded}")).expect("base64 is a header value");
        header.set_sensitive(true);
        Self {
            kind: Kind::ClientSecretBasic,
            header: Some(header),
        }
    }

    /// The `Authorization` header to send, if any.
    pub(crate) fn header(&self) -> Option<&HeaderValue> {
        self.header.as_ref()
    }
}

impl fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Kind::None => "none",
            Kind::SharedSecret => "shared secret (bearer)",
            Kind::ClientSecretBasic => "client_secret_basic",
        };
        f.debug_tuple("ClientAuth").field(&kind).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers() {
        let mas = ClientAuth::shared_secret("s3cret");
        assert_eq!(mas.header().unwrap(), "Bearer s3cret");
        assert!(mas.header().unwrap().is_sensitive());
        // RFC 6749 §2.3.1: both parts form-urlencoded, then `id:secret` in base64.
        let basic = ClientAuth::client_secret_basic("my client", "p:ss/word");
        let expected =
            base64::engine::general_purpose::STANDARD.encode("my%20client:p%3Ass%2Fword");
        assert_eq!(basic.header().unwrap(), &format!("Basic {expected}"));
        assert!(ClientAuth::none().header().is_none());
        let debug = format!("{mas:?} {basic:?}");
        assert!(
            !debug.contains("s3cret") && !debug.contains("word"),
            "{debug}"
        );
    }
}
