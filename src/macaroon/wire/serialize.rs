//! Writing tokens: V1 and V2 binary, V2JSON, inside base64url.

use super::v2::{V2_EOS, V2_IDENTIFIER, V2_LOCATION, V2_SIGNATURE, V2_VID};
use super::*;
/// A caveat to serialize.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OwnedCaveat {
    pub(crate) id: Vec<u8>,
    pub(crate) location: Option<Vec<u8>>,
    pub(crate) vid: Option<Vec<u8>>,
}

/// Everything a serialized macaroon holds. `Debug` leaves the signature out.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct MacaroonFields {
    pub(crate) location: Option<Vec<u8>>,
    pub(crate) identifier: Vec<u8>,
    pub(crate) caveats: Vec<OwnedCaveat>,
    pub(crate) signature: [u8; SIGNATURE_LEN],
}

impl fmt::Debug for MacaroonFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MacaroonFields")
            .field(
                "location",
                &self.location.as_deref().map(String::from_utf8_lossy),
            )
            .field("identifier", &String::from_utf8_lossy(&self.identifier))
            .field("caveats", &self.caveats.len())
            .field("signature", &"<redacted>")
            .finish()
    }
}

pub(super) fn push_v1_packet(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    let size = 4 + key.len() + 1 + value.len() + 1;
    debug_assert!(size <= 0xffff, "V1 packets hold at most 65535 bytes");
    out.extend_from_slice(format!("{size:04x}").as_bytes());
    out.extend_from_slice(key.as_bytes());
    out.push(b' ');
    out.extend_from_slice(value);
    out.push(b'\n');
}

pub(super) fn push_v2_field(out: &mut Vec<u8>, tag: u8, value: &[u8]) {
    out.push(tag);
    let mut len = value.len();
    while len >= 0x80 {
        out.push((len as u8 & 0x7f) | 0x80);
        len >>= 7;
    }
    out.push(len as u8);
    out.extend_from_slice(value);
}

impl MacaroonFields {
    pub(crate) fn to_v1(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128 + self.caveats.len() * 40);
        if let Some(location) = &self.location {
            push_v1_packet(&mut out, "location", location);
        }
        push_v1_packet(&mut out, "identifier", &self.identifier);
        for caveat in &self.caveats {
            push_v1_packet(&mut out, "cid", &caveat.id);
            if let (Some(vid), Some(location)) = (&caveat.vid, &caveat.location) {
                push_v1_packet(&mut out, "vid", vid);
                push_v1_packet(&mut out, "cl", location);
            }
        }
        push_v1_packet(&mut out, "signature", &self.signature);
        out
    }

    pub(crate) fn to_v2(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.caveats.len() * 32);
        out.push(2);
        if let Some(location) = &self.location {
            push_v2_field(&mut out, V2_LOCATION, location);
        }
        push_v2_field(&mut out, V2_IDENTIFIER, &self.identifier);
        out.push(V2_EOS);
        for caveat in &self.caveats {
            if let Some(location) = &caveat.location {
                push_v2_field(&mut out, V2_LOCATION, location);
            }
            push_v2_field(&mut out, V2_IDENTIFIER, &caveat.id);
            if let Some(vid) = &caveat.vid {
                push_v2_field(&mut out, V2_VID, vid);
            }
            out.push(V2_EOS);
        }
        out.push(V2_EOS);
        push_v2_field(&mut out, V2_SIGNATURE, &self.signature);
        out
    }

    pub(crate) fn to_v2json(&self) -> String {
        fn put(object: &mut serde_json::Map<String, serde_json::Value>, name: &str, v: &[u8]) {
            // The `macaroon` crate reads `i64` (and `v64`) in the standard alphabet only, `l64`
            // and `s64` in the URL-safe one only; libmacaroons and pymacaroons read either.
            let engine = if name == "i" { &STANDARD } else { &URL_SAFE };
            match std::str::from_utf8(v) {
                Ok(text) => object.insert(name.into(), text.into()),
                Err(_) => object.insert(format!("{name}64"), engine.encode(v).into()),
            };
        }
        let mut object = serde_json::Map::new();
        object.insert("v".into(), 2.into());
        if let Some(location) = &self.location {
            put(&mut object, "l", location);
        }
        put(&mut object, "i", &self.identifier);
        let caveats = self
            .caveats
            .iter()
            .map(|caveat| {
                let mut c = serde_json::Map::new();
                put(&mut c, "i", &caveat.id);
                if let Some(location) = &caveat.location {
                    put(&mut c, "l", location);
                }
                if let Some(vid) = &caveat.vid {
                    c.insert("v64".into(), STANDARD.encode(vid).into());
                }
                serde_json::Value::Object(c)
            })
            .collect();
        object.insert("c".into(), serde_json::Value::Array(caveats));
        object.insert("s64".into(), URL_SAFE.encode(self.signature).into());
        serde_json::Value::Object(object).to_string()
    }

    /// The token text: base64url without padding for the binary formats (Synapse's choice).
    pub(crate) fn serialize(&self, format: MacaroonFormat) -> String {
        match format {
            MacaroonFormat::V1 => URL_SAFE.encode(self.to_v1()),
            MacaroonFormat::V2 => URL_SAFE.encode(self.to_v2()),
            MacaroonFormat::V2Json => self.to_v2json(),
        }
    }
}

impl Macaroon<'_> {
    /// Copies the parsed fields out (tests, attenuation, re-serialization).
    pub(crate) fn to_fields(self) -> MacaroonFields {
        MacaroonFields {
            location: self.location.map(<[u8]>::to_vec),
            identifier: self.identifier.to_vec(),
            caveats: self
                .caveats()
                .map(|c| OwnedCaveat {
                    id: c.id.to_vec(),
                    // Third-party details are never needed past parsing: such tokens are rejected.
                    location: c.third_party.then(Vec::new),
                    vid: c.third_party.then(Vec::new),
                })
                .collect(),
            signature: *self.signature,
        }
    }
}
