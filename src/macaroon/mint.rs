//! Minting tokens with the ring's minting key, in the shape Synapse minted them, and attenuating
//! existing tokens as a client may.

use std::fmt;

use crate::identity::TokenType;
use crate::macaroon::keys::{hmac32, KeyRing};
use crate::macaroon::wire::{self, MacaroonFields, MacaroonFormat, OwnedCaveat};

/// Builds one token. Caveats are written in Synapse's order: `gen = 1`, `user_id`, `type`,
/// `nonce`, then `guest`, `device_id` and `time <` when set.
///
/// ```
/// use tower_matrix_auth::{KeyRing, MacaroonSecret, TokenType};
/// let keys = KeyRing::new().with_key("key", MacaroonSecret::from_passphrase("secret"));
/// let token = keys
///     .mint("@alice:example.org", TokenType::Access)
///     .expect("the ring has a key")
///     .nonce("q0mP8wYb5J2sRxL1")
///     .device_id("PHONE")
///     .expires_at_ms(1_900_000_000_000)
///     .to_token();
/// assert!(!token.contains('='));
/// ```
#[must_use = "a configuration unused configures nothing: builder methods return the configured value"]
#[derive(Clone)]
pub struct TokenBuilder<'k> {
    keys: &'k KeyRing,
    location: Option<String>,
    caveats: Vec<String>,
    nonce: Option<String>,
    /// Write the nonce as the first caveat (the issuer's session nonces; see
    /// [`TokenBuilder::session_nonce`](crate::macaroon::TokenBuilder::session_nonce)).
    nonce_first: bool,
    guest: bool,
    device_id: Option<String>,
    expires_at_ms: Option<u64>,
}

impl KeyRing {
    /// Starts a token for `user_id` under the minting key; `None` if the ring is empty.
    pub fn mint(&self, user_id: &str, token_type: TokenType) -> Option<TokenBuilder<'_>> {
        self.minting()?;
        Some(TokenBuilder {
            keys: self,
            location: None,
            caveats: vec![
                "gen = 1".to_owned(),
                format!("user_id = {user_id}"),
                format!("type = {}", token_type.as_str()),
            ],
            nonce: None,
            nonce_first: false,
            guest: false,
            device_id: None,
            expires_at_ms: None,
        })
    }
}

impl TokenBuilder<'_> {
    /// The location field (Synapse wrote its server name; it is not signed or checked).
    pub fn location(mut self, location: impl Into<String>) -> Self {
        self.location = Some(location.into());
        self
    }

    /// A unique value that gives the token its [`crate::TokenId`] for revocation.
    pub fn nonce(mut self, nonce: impl Into<String>) -> Self {
        self.nonce = Some(nonce.into());
        self
    }

    /// A nonce written as the token's first caveat, before `gen = 1`: a caveat no holder of the
    /// token can add (holders can only append), so a store can trust what it names. The
    /// [`crate::Issuer`] writes its session nonces this way.
    pub(crate) fn session_nonce(mut self, nonce: impl Into<String>) -> Self {
        self.nonce = Some(nonce.into());
        self.nonce_first = true;
        self
    }

    /// Marks a guest token (`guest = true`).
    pub fn guest(mut self) -> Self {
        self.guest = true;
        self
    }

    /// The device the token is issued to (`device_id = …`).
    pub fn device_id(mut self, device_id: impl Into<String>) -> Self {
        self.device_id = Some(device_id.into());
        self
    }

    /// The token is valid until this instant (`time < T`, ms since the epoch).
    pub fn expires_at_ms(mut self, at_ms: u64) -> Self {
        self.expires_at_ms = Some(at_ms);
        self
    }

    /// Serializes in `format`: base64url without padding for V1 and V2.
    pub fn serialize(self, format: MacaroonFormat) -> String {
        let key = self.keys.minting().expect("checked in KeyRing::mint");
        let mut caveats = self.caveats;
        if let Some(nonce) = self.nonce {
            let at = if self.nonce_first { 0 } else { caveats.len() };
            caveats.insert(at, format!("nonce = {nonce}"));
        }
        if self.guest {
            caveats.push("guest = true".to_owned());
        }
        caveats.extend(self.device_id.map(|d| format!("device_id = {d}")));
        caveats.extend(self.expires_at_ms.map(|t| format!("time < {t}")));
        let mut signature = key.first_link;
        for caveat in &caveats {
            signature = hmac32(&signature, caveat.as_bytes());
        }
        MacaroonFields {
            location: self.location.map(String::into_bytes),
            identifier: key.identifier.to_vec(),
            caveats: caveats
                .into_iter()
                .map(|c| OwnedCaveat {
                    id: c.into_bytes(),
                    location: None,
                    vid: None,
                })
                .collect(),
            signature,
        }
        .serialize(format)
    }

    /// Serializes as Synapse did: V1, base64url without padding.
    pub fn to_token(self) -> String {
        self.serialize(MacaroonFormat::V1)
    }
}

impl fmt::Debug for TokenBuilder<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenBuilder")
            .field("keys", self.keys)
            .finish_non_exhaustive()
    }
}

/// Appends a first-party caveat to a token, as any holder can: the result is valid only where
/// the original is and the new caveat holds. The token keeps its format (binary ones come back
/// as base64url without padding). `None` if `token` is not a macaroon.
///
/// ```
/// use tower_matrix_auth::{KeyRing, MacaroonSecret, TokenType, macaroon::attenuate};
/// let keys = KeyRing::new().with_key("key", MacaroonSecret::from_passphrase("secret"));
/// let token = keys.mint("@alice:example.org", TokenType::Access).unwrap().to_token();
/// let narrower = attenuate(&token, "time < 1900000000000").unwrap();
/// assert_ne!(token, narrower);
/// ```
pub fn attenuate(token: &str, caveat: &str) -> Option<String> {
    let decoded = wire::decode_token(token.as_bytes()).ok()?;
    let parsed = wire::parse_binary(decoded.bytes(), usize::MAX).ok()?;
    let format = if token.starts_with('{') {
        MacaroonFormat::V2Json
    } else {
        parsed.format
    };
    if parsed.caveats().any(|c| c.third_party) {
        return None;
    }
    let mut fields = parsed.to_fields();
    fields.signature = hmac32(&fields.signature, caveat.as_bytes());
    fields.caveats.push(OwnedCaveat {
        id: caveat.as_bytes().to_vec(),
        location: None,
        vid: None,
    });
    Some(fields.serialize(format))
}
