//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`): thin wrappers around the
//! crate-private wire parser and serializer, so a target can compare them with the `macaroon`
//! crate and build tokens with arbitrary caveats. Not a public API: nothing here is stable, and
//! nothing on the request path depends on it.

use crate::macaroon::keys::hmac32;
use crate::macaroon::wire::{self, MacaroonFields, OwnedCaveat};
use crate::macaroon::{MacaroonFormat, MacaroonSecret};

pub use crate::macaroon::v2json_dialect::crate_dialect;

/// What the wire parser read from a token: every field, caveats as `(id, third_party)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedView {
    /// The format the bytes were in (V2JSON is converted to V2 binary, so it reads as `V2`).
    pub format: MacaroonFormat,
    /// The unsigned location field.
    pub location: Option<Vec<u8>>,
    /// The identifier, which selects the key.
    pub identifier: Vec<u8>,
    /// Each caveat's identifier and whether it is a third-party caveat.
    pub caveats: Vec<(Vec<u8>, bool)>,
    /// The final signature.
    pub signature: [u8; 32],
}

fn view(binary: &[u8]) -> Option<ParsedView> {
    let m = wire::parse_binary(binary, usize::MAX).ok()?;
    Some(ParsedView {
        format: m.format,
        location: m.location.map(<[u8]>::to_vec),
        identifier: m.identifier.to_vec(),
        caveats: m
            .caveats()
            .map(|c| (c.id.to_vec(), c.third_party))
            .collect(),
        signature: *m.signature,
    })
}

/// Reads a token as sent (base64 of V1/V2 binary in either alphabet, or V2JSON), with no caveat
/// limit. `None` where the verifier would refuse the token as "not a macaroon".
pub fn parse_token(token: &[u8]) -> Option<ParsedView> {
    let decoded = wire::decode_token(token).ok()?;
    view(decoded.bytes())
}

/// Reads V1 or V2 binary (already base64-decoded), with no caveat limit.
pub fn parse_binary(binary: &[u8]) -> Option<ParsedView> {
    view(binary)
}

impl ParsedView {
    /// Serializes the view again (third-party caveats with an empty location and verifier id).
    ///
    /// # Panics
    /// In V1, a field longer than a V1 packet holds (about 64 KiB) trips a debug assertion.
    pub fn serialize(&self, format: MacaroonFormat) -> String {
        self.fields().serialize(format)
    }

    /// The V1 or V2 binary of the view.
    pub fn to_binary(&self, format: MacaroonFormat) -> Vec<u8> {
        match format {
            MacaroonFormat::V1 => self.fields().to_v1(),
            _ => self.fields().to_v2(),
        }
    }

    fn fields(&self) -> MacaroonFields {
        MacaroonFields {
            location: self.location.clone(),
            identifier: self.identifier.clone(),
            caveats: self
                .caveats
                .iter()
                .map(|(id, third_party)| OwnedCaveat {
                    id: id.clone(),
                    location: third_party.then(Vec::new),
                    vid: third_party.then(Vec::new),
                })
                .collect(),
            signature: self.signature,
        }
    }
}

/// A correctly signed token under `secret` and `identifier` with exactly these first-party
/// caveats (any bytes), in `format`, no location. What a minter that wrote arbitrary caveats
/// would produce: the caveat rules are then all that stands between the token and a request.
pub fn sign(
    secret: &MacaroonSecret,
    identifier: &[u8],
    caveats: &[&[u8]],
    format: MacaroonFormat,
) -> String {
    let mut signature = hmac32(secret.root_key(), identifier);
    for caveat in caveats {
        signature = hmac32(&signature, caveat);
    }
    MacaroonFields {
        location: None,
        identifier: identifier.to_vec(),
        caveats: caveats
            .iter()
            .map(|id| OwnedCaveat {
                id: id.to_vec(),
                location: None,
                vid: None,
            })
            .collect(),
        signature,
    }
    .serialize(format)
}
