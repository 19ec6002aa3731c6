//! The macaroon wire formats: V1 and V2 binary (inside base64, either alphabet, padded or not) and
//! V2JSON, as libmacaroons, pymacaroons and the `macaroon` crate write them.
//!
//! Parsing is zero-copy: [`parse_binary`] borrows every field from the decoded bytes, and
//! [`Macaroon::caveats`] walks the caveat section again instead of collecting it, so the hot path
//! allocates nothing. The parser is deliberately stricter than the `macaroon` crate (it rejects a
//! missing or misplaced signature, duplicate fields and trailing bytes, which that crate lets
//! through); `src/differential_tests.rs` checks that whatever this module accepts, the crate
//! accepts with the same identifier, caveats and signature. The exceptions are V2JSON spellings
//! that pymacaroons and libmacaroons write and the crate cannot read (no `"v"`, no `"c"`, either
//! base64 alphabet in any field); the test rewrites those for the crate and compares again.

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;

/// Length of an HMAC-SHA256 signature.
pub(crate) const SIGNATURE_LEN: usize = 32;

/// Largest field libmacaroons writes in the V2 format.
const V2_MAX_FIELD: usize = 65535;

const PADDING_INDIFFERENT: GeneralPurposeConfig = GeneralPurposeConfig::new()
    .with_encode_padding(false)
    .with_decode_padding_mode(DecodePaddingMode::Indifferent)
    .with_decode_allow_trailing_bits(false);
const URL_SAFE: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, PADDING_INDIFFERENT);
const STANDARD: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, PADDING_INDIFFERENT);

/// Why bytes are not a macaroon. Only ever logged at debug level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FormatError {
    Empty,
    Base64,
    UnknownVersion,
    Truncated,
    BadPacket,
    UnexpectedField,
    MissingIdentifier,
    BadSignature,
    TrailingBytes,
    TooManyCaveats,
    Json,
}

/// The serialization a token arrived in (or is to be written in).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Format {
    /// libmacaroons V1: hex-length-prefixed text packets. What Synapse minted.
    V1,
    /// libmacaroons V2: compact binary fields.
    V2,
    /// libmacaroons V2JSON.
    V2Json,
}

/// A caveat as it sits in the token: its identifier and whether it is a third-party caveat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawCaveat<'a> {
    pub(crate) id: &'a [u8],
    pub(crate) third_party: bool,
}

/// A parsed macaroon that borrows from the decoded token.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Macaroon<'a> {
    pub(crate) format: Format,
    pub(crate) location: Option<&'a [u8]>,
    pub(crate) identifier: &'a [u8],
    pub(crate) signature: &'a [u8; SIGNATURE_LEN],
    /// The bytes holding the caveats, re-walked by [`Macaroon::caveats`].
    caveat_section: &'a [u8],
}

impl<'a> Macaroon<'a> {
    /// The caveats in order. Infallible: [`parse_binary`] validated the section.
    pub(crate) fn caveats(&self) -> Caveats<'a> {
        Caveats {
            format: self.format,
            rest: self.caveat_section,
        }
    }
}

/// Iterator over the caveats of a validated macaroon.
#[derive(Debug, Clone)]
pub(crate) struct Caveats<'a> {
    format: Format,
    rest: &'a [u8],
}

impl<'a> Iterator for Caveats<'a> {
    type Item = RawCaveat<'a>;

    fn next(&mut self) -> Option<RawCaveat<'a>> {
        let step = match self.format {
            Format::V1 => v1_caveat(self.rest),
            Format::V2 | Format::V2Json => v2_caveat(self.rest),
        };
        match step {
            Ok(Some((caveat, rest))) => {
                self.rest = rest;
                Some(caveat)
            }
            _ => None,
        }
    }
}

// The stack variant is large on purpose: it spares ordinary tokens a heap allocation.
#[allow(clippy::large_enum_variant)]
/// Where a token's binary form lives: on the stack for ordinary tokens, on the heap otherwise.
pub(crate) enum Decoded {
    Stack { buf: [u8; STACK_BUF], len: usize },
    Heap(Vec<u8>),
}

/// Tokens up to 4 KiB of base64 decode into this many bytes.
pub(crate) const STACK_BUF: usize = 3072;

impl Decoded {
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            Decoded::Stack { buf, len } => &buf[..*len],
            Decoded::Heap(v) => v,
        }
    }
}

/// Turns the token as sent into macaroon binary (V1 or V2). V2JSON is converted to V2 binary.
pub(crate) fn decode_token(token: &[u8]) -> Result<Decoded, FormatError> {
    match token.first() {
        None => Err(FormatError::Empty),
        Some(b'{') => v2json_to_binary(token).map(Decoded::Heap),
        Some(_) => {
            // pymacaroons' rule: a `-` or `_` means the URL-safe alphabet.
            let engine = if token.iter().any(|&b| b == b'-' || b == b'_') {
                &URL_SAFE
            } else {
                &STANDARD
            };
            let mut buf = [0u8; STACK_BUF];
            if base64::decoded_len_estimate(token.len()) <= STACK_BUF {
                let len = engine
                    .decode_slice(token, &mut buf)
                    .map_err(|_| FormatError::Base64)?;
                Ok(Decoded::Stack { buf, len })
            } else {
                engine
                    .decode(token)
                    .map(Decoded::Heap)
                    .map_err(|_| FormatError::Base64)
            }
        }
    }
}

/// Parses V1 or V2 binary, telling them apart by the first byte as libmacaroons does.
pub(crate) fn parse_binary(data: &[u8], max_caveats: usize) -> Result<Macaroon<'_>, FormatError> {
    match data.first() {
        None => Err(FormatError::Empty),
        Some(2) => parse_v2(data, max_caveats, Format::V2),
        Some(b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F') => parse_v1(data, max_caveats),
        Some(_) => Err(FormatError::UnknownVersion),
    }
}

// ---- V1 -------------------------------------------------------------------------------------

/// A V1 packet's key, its value, and the bytes after it.
type V1Packet<'a> = (&'a [u8], &'a [u8], &'a [u8]);

/// One V1 packet: `XXXX key value\n`, `XXXX` the packet's whole length in hex.
fn v1_packet(data: &[u8]) -> Result<V1Packet<'_>, FormatError> {
    let header = data.get(..4).ok_or(FormatError::Truncated)?;
    let mut size = 0usize;
    for &b in header {
        let digit = (b as char).to_digit(16).ok_or(FormatError::BadPacket)?;
        size = size * 16 + digit as usize;
    }
    let packet = data.get(4..size).ok_or(FormatError::Truncated)?;
    let (&last, body) = packet.split_last().ok_or(FormatError::BadPacket)?;
    if last != b'\n' {
        return Err(FormatError::BadPacket);
    }
    let space = body
        .iter()
        .position(|&b| b == b' ')
        .ok_or(FormatError::BadPacket)?;
    Ok((&body[..space], &body[space + 1..], &data[size..]))
}

type CaveatStep<'a> = Result<Option<(RawCaveat<'a>, &'a [u8])>, FormatError>;

/// Locations must be text, as the `macaroon` crate and pymacaroons read them.
fn utf8(value: &[u8]) -> Result<&[u8], FormatError> {
    std::str::from_utf8(value)
        .map(str::as_bytes)
        .map_err(|_| FormatError::BadPacket)
}

/// The next caveat of a V1 caveat section: `cid`, then `vid` and `cl` together for a third party.
fn v1_caveat(data: &[u8]) -> CaveatStep<'_> {
    if data.is_empty() {
        return Ok(None);
    }
    let (key, id, mut rest) = v1_packet(data)?;
    if key != b"cid" {
        return Err(FormatError::UnexpectedField);
    }
    let (mut vid, mut cl) = (false, false);
    while !rest.is_empty() {
        let (key, value, after) = v1_packet(rest)?;
        match key {
            b"vid" if !vid => vid = true,
            b"cl" if !cl => {
                utf8(value)?;
                cl = true;
            }
            // The next caveat, the signature, or something the caller will refuse.
            _ => break,
        }
        rest = after;
    }
    if vid != cl {
        return Err(FormatError::UnexpectedField);
    }
    Ok(Some((
        RawCaveat {
            id,
            third_party: vid,
        },
        rest,
    )))
}

fn parse_v1(data: &[u8], max_caveats: usize) -> Result<Macaroon<'_>, FormatError> {
    let (mut key, mut value, mut rest) = v1_packet(data)?;
    let mut location = None;
    if key == b"location" {
        location = Some(utf8(value)?);
        (key, value, rest) = v1_packet(rest)?;
    }
    if key != b"identifier" || value.is_empty() {
        return Err(FormatError::MissingIdentifier);
    }
    let identifier = value;
    let caveat_section = rest;
    let mut caveat_count = 0;
    loop {
        if rest.is_empty() {
            return Err(FormatError::BadSignature);
        }
        let (key, value, after) = v1_packet(rest)?;
        if key == b"signature" {
            if !after.is_empty() {
                return Err(FormatError::TrailingBytes);
            }
            let signature = value.try_into().map_err(|_| FormatError::BadSignature)?;
            let section_len = caveat_section.len() - rest.len();
            return Ok(Macaroon {
                format: Format::V1,
                location,
                identifier,
                signature,
                caveat_section: &caveat_section[..section_len],
            });
        }
        let (_, after) = v1_caveat(rest)?.ok_or(FormatError::Truncated)?;
        caveat_count += 1;
        if caveat_count > max_caveats {
            return Err(FormatError::TooManyCaveats);
        }
        rest = after;
    }
}

// ---- V2 -------------------------------------------------------------------------------------

const V2_EOS: u8 = 0;
const V2_LOCATION: u8 = 1;
const V2_IDENTIFIER: u8 = 2;
const V2_VID: u8 = 4;
const V2_SIGNATURE: u8 = 6;

/// Reads one `tag varint-length bytes` field; `None` at an end-of-section byte.
fn v2_field(data: &[u8]) -> Result<(u8, &[u8], &[u8]), FormatError> {
    let (&tag, mut rest) = data.split_first().ok_or(FormatError::Truncated)?;
    if tag == V2_EOS {
        return Ok((V2_EOS, &[], rest));
    }
    let mut len = 0usize;
    let mut shift = 0;
    loop {
        let (&b, after) = rest.split_first().ok_or(FormatError::Truncated)?;
        rest = after;
        len |= usize::from(b & 0x7f) << shift;
        if len > V2_MAX_FIELD {
            return Err(FormatError::BadPacket);
        }
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            return Err(FormatError::BadPacket);
        }
    }
    if rest.len() < len {
        return Err(FormatError::Truncated);
    }
    Ok((tag, &rest[..len], &rest[len..]))
}

/// The next caveat of a V2 caveat section, `None` at the section's end marker.
fn v2_caveat(data: &[u8]) -> CaveatStep<'_> {
    let (mut tag, mut value, mut rest) = v2_field(data)?;
    if tag == V2_EOS {
        return Ok(None);
    }
    let mut has_location = false;
    if tag == V2_LOCATION {
        has_location = true;
        utf8(value)?;
        (tag, value, rest) = v2_field(rest)?;
    }
    if tag != V2_IDENTIFIER {
        return Err(FormatError::UnexpectedField);
    }
    let id = value;
    let (mut tag, _, mut after) = v2_field(rest)?;
    let has_vid = tag == V2_VID;
    if has_vid {
        (tag, _, after) = v2_field(after)?;
    }
    if tag != V2_EOS || has_vid != has_location {
        return Err(FormatError::UnexpectedField);
    }
    Ok(Some((
        RawCaveat {
            id,
            third_party: has_vid,
        },
        after,
    )))
}

fn parse_v2(data: &[u8], max_caveats: usize, format: Format) -> Result<Macaroon<'_>, FormatError> {
    let rest = &data[1..];
    let (mut tag, mut value, mut rest) = v2_field(rest)?;
    let mut location = None;
    if tag == V2_LOCATION {
        location = Some(utf8(value)?);
        (tag, value, rest) = v2_field(rest)?;
    }
    if tag != V2_IDENTIFIER || value.is_empty() {
        return Err(FormatError::MissingIdentifier);
    }
    let identifier = value;
    let (tag, _, mut rest) = v2_field(rest)?;
    if tag != V2_EOS {
        return Err(FormatError::UnexpectedField);
    }
    let caveat_section = rest;
    let mut caveat_count = 0;
    while let Some((_, after)) = v2_caveat(rest)? {
        caveat_count += 1;
        if caveat_count > max_caveats {
            return Err(FormatError::TooManyCaveats);
        }
        rest = after;
    }
    // `rest` now starts at the section's end marker, which the walk consumed inside v2_caveat.
    let section_len = caveat_section.len() - rest.len() + 1;
    let (tag, value, after) = v2_field(&rest[1..])?;
    if tag != V2_SIGNATURE {
        return Err(FormatError::BadSignature);
    }
    if !after.is_empty() {
        return Err(FormatError::TrailingBytes);
    }
    let signature = value.try_into().map_err(|_| FormatError::BadSignature)?;
    Ok(Macaroon {
        format,
        location,
        identifier,
        signature,
        caveat_section: &caveat_section[..section_len],
    })
}

// ---- V2JSON ---------------------------------------------------------------------------------

/// Decodes base64 in either alphabet, padded or not.
fn decode_flexible(text: &str) -> Result<Vec<u8>, FormatError> {
    let engine = if text.contains(['-', '_']) {
        &URL_SAFE
    } else {
        &STANDARD
    };
    engine.decode(text).map_err(|_| FormatError::Json)
}

/// Reads a field given either as text (`name`) or as base64 (`name64`), not both.
fn json_field(
    object: &serde_json::Map<String, serde_json::Value>,
    name: &str,
) -> Result<Option<Vec<u8>>, FormatError> {
    // The `macaroon` crate writes absent fields as `null`.
    let present = |key: &str| object.get(key).filter(|v| !v.is_null());
    let plain = present(name);
    let encoded = present(&format!("{name}64"));
    match (plain, encoded) {
        (Some(_), Some(_)) => Err(FormatError::Json),
        (Some(v), None) => Ok(Some(
            v.as_str().ok_or(FormatError::Json)?.as_bytes().to_vec(),
        )),
        (None, Some(v)) => Ok(Some(decode_flexible(v.as_str().ok_or(FormatError::Json)?)?)),
        (None, None) => Ok(None),
    }
}

/// Rewrites a V2JSON token as V2 binary so one parser serves both.
fn v2json_to_binary(token: &[u8]) -> Result<Vec<u8>, FormatError> {
    let value: serde_json::Value = serde_json::from_slice(token).map_err(|_| FormatError::Json)?;
    let object = value.as_object().ok_or(FormatError::Json)?;
    // pymacaroons leaves the version out; libmacaroons and the `macaroon` crate write `"v": 2`.
    if let Some(version) = object.get("v") {
        if version.as_u64() != Some(2) {
            return Err(FormatError::UnknownVersion);
        }
    }
    let identifier = json_field(object, "i")?.ok_or(FormatError::MissingIdentifier)?;
    let signature = json_field(object, "s")?.ok_or(FormatError::BadSignature)?;
    let mut fields = MacaroonFields {
        location: json_field(object, "l")?,
        identifier,
        caveats: Vec::new(),
        signature: signature
            .try_into()
            .map_err(|_| FormatError::BadSignature)?,
    };
    if let Some(caveats) = object.get("c") {
        for caveat in caveats.as_array().ok_or(FormatError::Json)? {
            let caveat = caveat.as_object().ok_or(FormatError::Json)?;
            let id = json_field(caveat, "i")?.ok_or(FormatError::UnexpectedField)?;
            let location = json_field(caveat, "l")?;
            let vid = json_field(caveat, "v")?;
            if location.is_some() != vid.is_some() {
                return Err(FormatError::UnexpectedField);
            }
            fields.caveats.push(OwnedCaveat { id, location, vid });
        }
    }
    Ok(fields.to_v2())
}

// ---- Serialization --------------------------------------------------------------------------

/// A caveat to serialize.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OwnedCaveat {
    pub(crate) id: Vec<u8>,
    pub(crate) location: Option<Vec<u8>>,
    pub(crate) vid: Option<Vec<u8>>,
}

/// Everything a serialized macaroon holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MacaroonFields {
    pub(crate) location: Option<Vec<u8>>,
    pub(crate) identifier: Vec<u8>,
    pub(crate) caveats: Vec<OwnedCaveat>,
    pub(crate) signature: [u8; SIGNATURE_LEN],
}

fn push_v1_packet(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    let size = 4 + key.len() + 1 + value.len() + 1;
    debug_assert!(size <= 0xffff, "V1 packets hold at most 65535 bytes");
    out.extend_from_slice(format!("{size:04x}").as_bytes());
    out.extend_from_slice(key.as_bytes());
    out.push(b' ');
    out.extend_from_slice(value);
    out.push(b'\n');
}

fn push_v2_field(out: &mut Vec<u8>, tag: u8, value: &[u8]) {
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
    pub(crate) fn serialize(&self, format: Format) -> String {
        match format {
            Format::V1 => URL_SAFE.encode(self.to_v1()),
            Format::V2 => URL_SAFE.encode(self.to_v2()),
            Format::V2Json => self.to_v2json(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> MacaroonFields {
        MacaroonFields {
            location: Some(b"test.example".to_vec()),
            identifier: b"key".to_vec(),
            caveats: vec![
                OwnedCaveat {
                    id: b"gen = 1".to_vec(),
                    location: None,
                    vid: None,
                },
                OwnedCaveat {
                    id: b"user_id = @alice:test.example".to_vec(),
                    location: None,
                    vid: None,
                },
            ],
            signature: [7; 32],
        }
    }

    #[test]
    fn every_format_round_trips() {
        for format in [Format::V1, Format::V2, Format::V2Json] {
            let token = sample().serialize(format);
            let decoded = decode_token(token.as_bytes()).unwrap();
            let parsed = parse_binary(decoded.bytes(), 64).unwrap();
            let expect = if format == Format::V1 {
                Format::V1
            } else {
                Format::V2
            };
            assert_eq!(parsed.format, expect);
            assert_eq!(parsed.to_fields(), sample(), "{format:?}");
            assert_eq!(parsed.caveats().count(), 2);
        }
    }

    #[test]
    fn standard_alphabet_and_padding_are_accepted() {
        let binary = sample().to_v1();
        for engine in [
            base64::engine::general_purpose::STANDARD,
            base64::engine::general_purpose::URL_SAFE,
        ] {
            let token = engine.encode(&binary);
            let decoded = decode_token(token.as_bytes()).unwrap();
            assert_eq!(decoded.bytes(), &binary[..]);
        }
    }

    #[test]
    fn caveat_limit_is_enforced_while_parsing() {
        let binary = sample().to_v1();
        assert_eq!(
            parse_binary(&binary, 1).unwrap_err(),
            FormatError::TooManyCaveats
        );
        let binary = sample().to_v2();
        assert_eq!(
            parse_binary(&binary, 1).unwrap_err(),
            FormatError::TooManyCaveats
        );
    }

    #[test]
    fn structural_errors_are_rejected() {
        let v1 = sample().to_v1();
        // Cut anywhere: never accepted, never a panic.
        for cut in 0..v1.len() {
            assert!(parse_binary(&v1[..cut], 64).is_err(), "V1 cut at {cut}");
        }
        let v2 = sample().to_v2();
        for cut in 0..v2.len() {
            assert!(parse_binary(&v2[..cut], 64).is_err(), "V2 cut at {cut}");
        }
        let mut trailing = v1.clone();
        trailing.extend_from_slice(b"0008cid\n");
        assert_eq!(
            parse_binary(&trailing, 64).unwrap_err(),
            FormatError::TrailingBytes
        );
        let mut trailing = v2.clone();
        trailing.push(0);
        assert_eq!(
            parse_binary(&trailing, 64).unwrap_err(),
            FormatError::TrailingBytes
        );
        assert_eq!(decode_token(b"").err(), Some(FormatError::Empty));
        assert_eq!(
            decode_token(b"not base64!").err(),
            Some(FormatError::Base64)
        );
    }

    #[test]
    fn third_party_caveats_are_marked() {
        let mut fields = sample();
        fields.caveats.push(OwnedCaveat {
            id: b"third".to_vec(),
            location: Some(b"https://elsewhere".to_vec()),
            vid: Some(vec![1, 2, 3]),
        });
        for binary in [fields.to_v1(), fields.to_v2()] {
            let parsed = parse_binary(&binary, 64).unwrap();
            let caveats: Vec<_> = parsed.caveats().collect();
            assert_eq!(caveats.len(), 3);
            assert!(caveats[2].third_party && !caveats[0].third_party);
        }
    }
}
