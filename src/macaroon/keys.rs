//! Root keys: the secret a homeserver configures, derived the libmacaroons way, and the key ring
//! that lets keys rotate (one key mints, every key in the ring verifies).

use std::fmt;
use std::sync::Arc;

pub(crate) use crate::macaroon::hmac_sha256::hmac32;
use crate::macaroon::hmac_sha256::PreparedKey;
use crate::macaroon::wire::SIGNATURE_LEN;

/// The fixed key libmacaroons (and so pymacaroons and the `macaroon` crate) uses to turn a
/// secret of any length into a 32-byte root key: `"macaroons-key-generator"`, zero-padded to 32
/// bytes. HMAC pads every key shorter than a block with zeros, so the padding changes nothing.
const KEY_GENERATOR: [u8; SIGNATURE_LEN] = {
    let name = b"macaroons-key-generator";
    let mut key = [0; SIGNATURE_LEN];
    let mut i = 0;
    while i < name.len() {
        key[i] = name[i];
        i += 1;
    }
    key
};

/// The shortest secret [`MacaroonSecret::from_passphrase`] takes without a warning: 32 bytes, as
/// many as the HMAC key it becomes.
pub const RECOMMENDED_SECRET_LEN: usize = 32;

/// An empty macaroon secret was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmptySecret;

impl fmt::Display for EmptySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the macaroon secret is empty: tokens signed with it can be forged by anyone")
    }
}

impl std::error::Error for EmptySecret {}

/// A macaroon root secret. Its `Debug` output never shows the key.
///
/// ```
/// use tower_matrix_auth::MacaroonSecret;
/// // A Synapse deployment's `macaroon_secret_key`, derived as pymacaroons does.
/// let secret = MacaroonSecret::from_passphrase("my synapse macaroon_secret_key");
/// assert_eq!(format!("{secret:?}"), "MacaroonSecret(<redacted>)");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct MacaroonSecret {
    root_key: [u8; SIGNATURE_LEN],
}

impl MacaroonSecret {
    /// Derives the root key from a secret the way libmacaroons and pymacaroons do: HMAC-SHA256
    /// keyed with `"macaroons-key-generator"` over the secret. This is what Synapse's
    /// `macaroon_secret_key` went through, so its tokens verify with this key.
    ///
    /// A secret shorter than [`RECOMMENDED_SECRET_LEN`](crate::macaroon::RECOMMENDED_SECRET_LEN) bytes is accepted (deployments carry the
    /// secrets they have) with a warning in the log; see [`MacaroonSecret::try_from_passphrase`]
    /// to handle an empty one without a panic.
    ///
    /// # Panics
    /// If `secret` is empty: every token would be forgeable by anyone who guesses that.
    pub fn from_passphrase(secret: impl AsRef<[u8]>) -> Self {
        match Self::try_from_passphrase(secret) {
            Ok(secret) => secret,
            Err(error) => panic!("{error}"),
        }
    }

    /// [`MacaroonSecret::from_passphrase`], with an error instead of a panic for an empty secret.
    ///
    /// ```
    /// use tower_matrix_auth::MacaroonSecret;
    /// assert!(MacaroonSecret::try_from_passphrase("").is_err());
    /// assert!(MacaroonSecret::try_from_passphrase("a long and random macaroon secret key").is_ok());
    /// ```
    pub fn try_from_passphrase(secret: impl AsRef<[u8]>) -> Result<Self, EmptySecret> {
        let secret = secret.as_ref();
        if secret.is_empty() {
            return Err(EmptySecret);
        }
        if secret.len() < RECOMMENDED_SECRET_LEN {
            tracing::warn!(
                len = secret.len(),
                "the macaroon secret is shorter than {RECOMMENDED_SECRET_LEN} bytes: tokens are \
                 only as hard to forge as the secret is to guess"
            );
        }
        Ok(Self {
            root_key: hmac32(&KEY_GENERATOR, secret),
        })
    }

    /// Uses 32 bytes as the root key as they are, with no derivation.
    pub fn from_root_key(root_key: [u8; SIGNATURE_LEN]) -> Self {
        Self { root_key }
    }

    pub(crate) fn root_key(&self) -> &[u8; SIGNATURE_LEN] {
        &self.root_key
    }
}

impl fmt::Debug for MacaroonSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MacaroonSecret(<redacted>)")
    }
}

/// One key of the ring: its identifier and the chain's first link, computed once.
#[derive(Clone)]
pub(crate) struct RingKey {
    pub(crate) identifier: Box<[u8]>,
    /// `HMAC(root_key, identifier)`: every token under this key starts its chain here, so it is
    /// computed when the key is added instead of on every request.
    pub(crate) first_link: [u8; SIGNATURE_LEN],
    /// `first_link` as an HMAC key with its pads hashed: the first caveat's step then costs two
    /// SHA-256 compressions instead of four.
    first_step: PreparedKey,
    /// The link after [`GEN_CAVEAT`], with which Synapse (and [`KeyRing::mint`]) starts every
    /// token: for those, the first caveat's step costs nothing.
    after_gen: [u8; SIGNATURE_LEN],
    /// `after_gen` as an HMAC key with its pads hashed: the second caveat's step (`user_id` in
    /// every Synapse token) then costs two compressions instead of four.
    after_gen_step: PreparedKey,
}

/// The first caveat of every token Synapse minted.
const GEN_CAVEAT: &[u8] = b"gen = 1";

impl RingKey {
    fn new(identifier: Box<[u8]>, secret: &MacaroonSecret) -> Self {
        let first_link = hmac32(secret.root_key(), &identifier);
        let first_step = PreparedKey::new(&first_link);
        let after_gen = first_step.sign(GEN_CAVEAT);
        Self {
            identifier,
            first_link,
            first_step,
            after_gen,
            after_gen_step: PreparedKey::new(&after_gen),
        }
    }

    /// The signature a token under this key must end with: the chain over its caveat ids.
    pub(crate) fn chain<'c>(
        &self,
        mut caveats: impl Iterator<Item = &'c [u8]>,
    ) -> [u8; SIGNATURE_LEN] {
        let mut signature = match caveats.next() {
            None => return self.first_link,
            Some(GEN_CAVEAT) => match caveats.next() {
                None => return self.after_gen,
                Some(second) => self.after_gen_step.sign(second),
            },
            Some(first) => self.first_step.sign(first),
        };
        for caveat in caveats {
            signature = hmac32(&signature, caveat);
        }
        signature
    }
}

/// The keys a layer verifies with, looked up by the macaroon identifier.
///
/// The first key added mints (see [`KeyRing::minting_key`]); every key verifies.
/// [`with_key`](Self::with_key) appends, so to rotate, build a new ring that starts with the new
/// key, followed by the old ones, which keep verifying until their tokens have expired (or are
/// removed from the ring, which kills every token under them). `Debug` lists the identifiers only.
///
/// ```
/// use tower_matrix_auth::{KeyRing, MacaroonSecret};
/// let ring = KeyRing::new()
///     .with_key("key2", MacaroonSecret::from_passphrase("the new secret"))
///     .with_key("key", MacaroonSecret::from_passphrase("the old synapse secret"));
/// assert_eq!(ring.minting_key(), Some("key2".as_bytes()));
/// assert!(format!("{ring:?}").contains("key2"));
/// assert!(!format!("{ring:?}").contains("secret"));
/// ```
#[must_use = "a configuration unused configures nothing: builder methods return the configured value"]
#[derive(Clone, Default)]
pub struct KeyRing {
    keys: Arc<[RingKey]>,
}

impl KeyRing {
    /// An empty ring: it verifies nothing until keys are added.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a key under a macaroon identifier (Synapse used `key`), after the keys already in the
    /// ring: it mints only if the ring was empty. A key with an identifier already in the ring
    /// replaces that key, in its place.
    pub fn with_key(self, identifier: impl AsRef<[u8]>, secret: MacaroonSecret) -> Self {
        let identifier: Box<[u8]> = identifier.as_ref().into();
        let mut keys: Vec<RingKey> = self
            .keys
            .iter()
            .filter(|k| k.identifier != identifier)
            .cloned()
            .collect();
        let key = RingKey::new(identifier, &secret);
        // Replacing keeps the position: the minting key stays the minting key.
        match self
            .keys
            .iter()
            .position(|k| k.identifier == key.identifier)
        {
            Some(at) => keys.insert(at, key),
            None => keys.push(key),
        }
        Self { keys: keys.into() }
    }

    /// The identifier of the key that mints (the first one added).
    pub fn minting_key(&self) -> Option<&[u8]> {
        self.keys.first().map(|k| &*k.identifier)
    }

    /// How many keys the ring holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the ring holds no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key for a macaroon identifier. Identifiers are public, so a plain comparison is fine.
    pub(crate) fn find(&self, identifier: &[u8]) -> Option<&RingKey> {
        self.keys.iter().find(|k| &*k.identifier == identifier)
    }

    pub(crate) fn minting(&self) -> Option<&RingKey> {
        self.keys.first()
    }
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.keys
                    .iter()
                    .map(|k| String::from_utf8_lossy(&k.identifier).into_owned()),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derivation_matches_the_macaroon_crate() {
        let ours = MacaroonSecret::from_passphrase("a secret");
        let theirs = macaroon::MacaroonKey::generate(b"a secret");
        assert_eq!(&ours.root_key[..], &theirs[..]);
    }

    #[test]
    fn replacing_a_key_keeps_its_place() {
        let ring = KeyRing::new()
            .with_key("a", MacaroonSecret::from_passphrase("1"))
            .with_key("b", MacaroonSecret::from_passphrase("2"))
            .with_key("a", MacaroonSecret::from_passphrase("3"));
        assert_eq!(ring.len(), 2);
        assert_eq!(ring.minting_key(), Some(&b"a"[..]));
        let expected = hmac32(MacaroonSecret::from_passphrase("3").root_key(), b"a");
        assert_eq!(ring.find(b"a").unwrap().first_link, expected);
        assert!(ring.find(b"c").is_none());
    }

    #[test]
    fn the_precomputed_first_step_gives_the_plain_chain() {
        let ring = KeyRing::new().with_key("key", MacaroonSecret::from_passphrase("s"));
        let key = ring.find(b"key").unwrap();
        let with_gen: [&[u8]; 3] = [b"gen = 1", b"user_id = @a:b", b""];
        let without: [&[u8]; 3] = [b"gen = 2", b"gen = 1", b"user_id = @a:b"];
        for caveats in [with_gen, without] {
            for n in 0..=caveats.len() {
                let mut expected = key.first_link;
                for caveat in &caveats[..n] {
                    expected = hmac32(&expected, caveat);
                }
                assert_eq!(key.chain(caveats[..n].iter().copied()), expected, "{n}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "the macaroon secret is empty")]
    fn an_empty_secret_is_refused() {
        let _ = MacaroonSecret::from_passphrase("");
    }

    #[test]
    fn a_short_secret_is_accepted() {
        // Deployments carry the secrets they have: short ones work (with a warning).
        assert_eq!(
            MacaroonSecret::from_passphrase("s"),
            MacaroonSecret::try_from_passphrase("s").unwrap()
        );
    }
}
