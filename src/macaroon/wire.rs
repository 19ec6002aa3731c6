//! The macaroon wire formats: V1 and V2 binary (inside base64, either alphabet, padded or not) and
//! V2JSON, as libmacaroons, pymacaroons and the `macaroon` crate write them.
//!
//! Parsing is zero-copy: [`parse_binary`] borrows every field from the decoded bytes, and
//! [`Macaroon::caveats`] walks the caveat section again instead of collecting it, so the hot path
//! allocates nothing. The parser is deliberately stricter than the `macaroon` crate (it rejects a
//! missing or misplaced signature, duplicate fields and trailing bytes, which that crate lets
//! through); `src/macaroon/differential_tests.rs` checks that whatever this module accepts, the crate
//! accepts with the same identifier, caveats and signature. The exceptions are V2JSON spellings
//! that pymacaroons and libmacaroons write and the crate cannot read (no `"v"`, no `"c"`, either
//! base64 alphabet in any field); the test rewrites those for the crate and compares again.

use std::borrow::Cow;
use std::fmt;

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

#[doc = include_str!("../../docs/formats.md")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MacaroonFormat {
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

/// A parsed macaroon that borrows from the decoded token. `Debug` leaves the signature out: it
/// is the token's credential.
#[derive(Clone, Copy)]
pub(crate) struct Macaroon<'a> {
    pub(crate) format: MacaroonFormat,
    pub(crate) location: Option<&'a [u8]>,
    pub(crate) identifier: &'a [u8],
    pub(crate) signature: &'a [u8; SIGNATURE_LEN],
    /// The bytes holding the caveats, re-walked by [`Macaroon::caveats`].
    caveat_section: &'a [u8],
}

impl fmt::Debug for Macaroon<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Macaroon")
            .field("format", &self.format)
            .field("location", &self.location.map(String::from_utf8_lossy))
            .field("identifier", &String::from_utf8_lossy(self.identifier))
            .field("signature", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl<'a> Macaroon<'a> {
    /// The caveat section as text, if it is UTF-8 as a whole: one check for every caveat.
    pub(crate) fn caveat_text(&self) -> Option<&'a str> {
        std::str::from_utf8(self.caveat_section).ok()
    }

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
    format: MacaroonFormat,
    rest: &'a [u8],
}

impl<'a> Iterator for Caveats<'a> {
    type Item = RawCaveat<'a>;

    fn next(&mut self) -> Option<RawCaveat<'a>> {
        let step = match self.format {
            MacaroonFormat::V1 => v1_caveat(self.rest),
            MacaroonFormat::V2 | MacaroonFormat::V2Json => v2_caveat(self.rest),
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

/// Tokens whose binary form fits in this many bytes are decoded on the verifier's stack (a
/// Synapse token is about 230 bytes); longer ones go to the heap.
pub(crate) const DECODE_BUF: usize = 1024;

/// Like [`decode_token`], but into the caller's `buf` when the binary fits: the verifier's hot
/// path then neither allocates nor zeroes and moves [`Decoded`]'s 3 KiB.
pub(crate) fn decode_token_into<'b>(
    token: &[u8],
    buf: &'b mut [u8],
) -> Result<Cow<'b, [u8]>, FormatError> {
    match token.first() {
        None => Err(FormatError::Empty),
        Some(b'{') => v2json_to_binary(token).map(Cow::Owned),
        Some(_) if base64::decoded_len_estimate(token.len()) > buf.len() => {
            decode_token(token).map(|decoded| Cow::Owned(decoded.bytes().to_vec()))
        }
        Some(_) => {
            // Same result as `decode_token`'s rule (a `-` or `_` means URL-safe) without a scan
            // first: text in the alphabets' common subset decodes the same in both, and text
            // with `+` or `/` fails URL-safe decoding and gets the standard alphabet. (A
            // hand-written base64url decoder saved 1.8% of a verification: not enough to keep.)
            let len = match URL_SAFE.decode_slice(token, &mut *buf) {
                Ok(len) => len,
                Err(_) if !token.iter().any(|&b| b == b'-' || b == b'_') => STANDARD
                    .decode_slice(token, buf)
                    .map_err(|_| FormatError::Base64)?,
                Err(_) => return Err(FormatError::Base64),
            };
            let buf: &'b [u8] = buf;
            Ok(Cow::Borrowed(&buf[..len]))
        }
    }
}

/// Parses V1 or V2 binary, telling them apart by the first byte as libmacaroons does.
pub(crate) fn parse_binary(data: &[u8], max_caveats: usize) -> Result<Macaroon<'_>, FormatError> {
    parse_binary_with(data, max_caveats, |_| {})
}

/// Like [`parse_binary`], also noting the caveats in `list` during the one validating walk, so
/// the chain and the caveat rules need not walk the token again.
pub(crate) fn parse_binary_listing<'a>(
    data: &'a [u8],
    max_caveats: usize,
    list: &mut CaveatList<'a>,
) -> Result<Macaroon<'a>, FormatError> {
    parse_binary_with(data, max_caveats, |caveat| list.push(caveat))
}

fn parse_binary_with<'a>(
    data: &'a [u8],
    max_caveats: usize,
    sink: impl FnMut(RawCaveat<'a>),
) -> Result<Macaroon<'a>, FormatError> {
    match data.first() {
        None => Err(FormatError::Empty),
        Some(2) => parse_v2(data, max_caveats, MacaroonFormat::V2, sink),
        Some(b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F') => parse_v1(data, max_caveats, sink),
        Some(_) => Err(FormatError::UnknownVersion),
    }
}

/// How many caveats [`CaveatList`] holds; a token with more is walked again instead.
const LISTED_CAVEATS: usize = 16;

/// The caveats of a token as [`parse_binary_listing`] found them, on the stack.
pub(crate) struct CaveatList<'a> {
    items: [RawCaveat<'a>; LISTED_CAVEATS],
    /// How many caveats the token has; more than `LISTED_CAVEATS` means only some are listed.
    len: usize,
}

impl<'a> CaveatList<'a> {
    pub(crate) fn new() -> Self {
        Self {
            items: [RawCaveat {
                id: &[],
                third_party: false,
            }; LISTED_CAVEATS],
            len: 0,
        }
    }

    fn push(&mut self, caveat: RawCaveat<'a>) {
        if let Some(slot) = self.items.get_mut(self.len) {
            *slot = caveat;
        }
        self.len += 1;
    }

    /// The caveats of `macaroon`, the one this list was filled from.
    pub(crate) fn iter<'l>(&'l self, macaroon: &Macaroon<'a>) -> CaveatIter<'l, 'a> {
        match self.items.get(..self.len) {
            Some(listed) => CaveatIter::Listed(listed.iter()),
            None => CaveatIter::Walk(macaroon.caveats()),
        }
    }
}

/// Iterator over a [`CaveatList`].
#[derive(Clone)]
pub(crate) enum CaveatIter<'l, 'a> {
    Listed(std::slice::Iter<'l, RawCaveat<'a>>),
    Walk(Caveats<'a>),
}

impl<'a> Iterator for CaveatIter<'_, 'a> {
    type Item = RawCaveat<'a>;

    fn next(&mut self) -> Option<RawCaveat<'a>> {
        match self {
            CaveatIter::Listed(listed) => listed.next().copied(),
            CaveatIter::Walk(walk) => walk.next(),
        }
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

fn parse_v1<'a>(
    data: &'a [u8],
    max_caveats: usize,
    mut sink: impl FnMut(RawCaveat<'a>),
) -> Result<Macaroon<'a>, FormatError> {
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
    // One pass, each packet read once: the grammar `v1_caveat` walks (`cid`, then for a third
    // party `vid` and `cl` once each, in either order), up to the signature.
    let mut open: Option<(&'a [u8], bool, bool)> = None;
    loop {
        if rest.is_empty() {
            return Err(match open {
                Some((_, vid, cl)) if vid != cl => FormatError::UnexpectedField,
                _ => FormatError::BadSignature,
            });
        }
        let (key, value, after) = v1_packet(rest)?;
        match key {
            b"cid" | b"signature" => {
                if let Some((id, vid, cl)) = open.take() {
                    if vid != cl {
                        return Err(FormatError::UnexpectedField);
                    }
                    sink(RawCaveat {
                        id,
                        third_party: vid,
                    });
                }
                if key == b"signature" {
                    if !after.is_empty() {
                        return Err(FormatError::TrailingBytes);
                    }
                    let signature = value.try_into().map_err(|_| FormatError::BadSignature)?;
                    let section_len = caveat_section.len() - rest.len();
                    return Ok(Macaroon {
                        format: MacaroonFormat::V1,
                        location,
                        identifier,
                        signature,
                        caveat_section: &caveat_section[..section_len],
                    });
                }
                caveat_count += 1;
                if caveat_count > max_caveats {
                    return Err(FormatError::TooManyCaveats);
                }
                open = Some((value, false, false));
            }
            b"vid" => match &mut open {
                Some((_, vid @ false, _)) => *vid = true,
                _ => return Err(FormatError::UnexpectedField),
            },
            b"cl" => match &mut open {
                Some((_, _, cl @ false)) => {
                    utf8(value)?;
                    *cl = true;
                }
                _ => return Err(FormatError::UnexpectedField),
            },
            _ => return Err(FormatError::UnexpectedField),
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

fn parse_v2<'a>(
    data: &'a [u8],
    max_caveats: usize,
    format: MacaroonFormat,
    mut sink: impl FnMut(RawCaveat<'a>),
) -> Result<Macaroon<'a>, FormatError> {
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
    while let Some((caveat, after)) = v2_caveat(rest)? {
        caveat_count += 1;
        if caveat_count > max_caveats {
            return Err(FormatError::TooManyCaveats);
        }
        sink(caveat);
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
        for format in [
            MacaroonFormat::V1,
            MacaroonFormat::V2,
            MacaroonFormat::V2Json,
        ] {
            let token = sample().serialize(format);
            let decoded = decode_token(token.as_bytes()).unwrap();
            let parsed = parse_binary(decoded.bytes(), 64).unwrap();
            let expect = if format == MacaroonFormat::V1 {
                MacaroonFormat::V1
            } else {
                MacaroonFormat::V2
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

    /// The V1 parser before it read each packet once: it walked every caveat with `v1_caveat`.
    fn parse_v1_reference<'a>(
        data: &'a [u8],
        max_caveats: usize,
        mut sink: impl FnMut(RawCaveat<'a>),
    ) -> Result<Macaroon<'a>, FormatError> {
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
                    format: MacaroonFormat::V1,
                    location,
                    identifier,
                    signature,
                    caveat_section: &caveat_section[..section_len],
                });
            }
            let (caveat, after) = v1_caveat(rest)?.ok_or(FormatError::Truncated)?;
            caveat_count += 1;
            if caveat_count > max_caveats {
                return Err(FormatError::TooManyCaveats);
            }
            sink(caveat);
            rest = after;
        }
    }

    /// Variations of a V1 token: truncated, bytes changed, packets dropped, repeated, swapped.
    fn v1_variants() -> Vec<Vec<u8>> {
        let mut third = sample();
        third.caveats.insert(
            1,
            OwnedCaveat {
                id: b"third".to_vec(),
                location: Some(b"https://elsewhere".to_vec()),
                vid: Some(vec![1, 2, 3]),
            },
        );
        third.location = None;
        let mut bases = vec![sample().to_v1(), third.to_v1()];
        let mut packets = Vec::new();
        for base in &bases {
            let mut rest = &base[..];
            let mut list = Vec::new();
            while let Ok((_, _, after)) = v1_packet(rest) {
                list.push(rest[..rest.len() - after.len()].to_vec());
                rest = after;
            }
            packets.push(list);
        }
        for list in &packets {
            for i in 0..list.len() {
                for j in 0..list.len() {
                    let mut dropped = list.clone();
                    dropped.remove(i);
                    bases.push(dropped.concat());
                    let mut repeated = list.clone();
                    repeated.insert(j, list[i].clone());
                    bases.push(repeated.concat());
                    let mut swapped = list.clone();
                    swapped.swap(i, j);
                    bases.push(swapped.concat());
                }
            }
        }
        let mut variants = bases.clone();
        for base in &bases[..2] {
            for at in 0..base.len() {
                variants.push(base[..at].to_vec());
                for byte in [b'0', b'f', b' ', b'\n', b'c', b'v', b'i', b'l', 0xff] {
                    let mut changed = base.clone();
                    changed[at] = byte;
                    variants.push(changed);
                }
            }
        }
        variants
    }

    #[test]
    fn the_one_pass_v1_parser_agrees_with_the_caveat_walk() {
        for variant in v1_variants() {
            for max in [usize::MAX, 1] {
                let mut listed = Vec::new();
                let ours = parse_v1(&variant, max, |c| listed.push(c));
                let reference = parse_v1_reference(&variant, max, |_| {});
                match (&ours, &reference) {
                    (Ok(ours), Ok(reference)) => {
                        assert_eq!(ours.to_fields(), reference.to_fields());
                        assert_eq!(listed, reference.caveats().collect::<Vec<_>>());
                    }
                    (Err(ours), Err(reference)) if max == usize::MAX => {
                        assert_eq!(ours, reference, "{variant:?}")
                    }
                    (Err(_), Err(_)) => {}
                    _ => panic!("{variant:?}: {ours:?} but {reference:?}"),
                }
            }
        }
    }

    #[test]
    fn listing_matches_the_walk_and_overflows_to_it() {
        let mut fields = sample();
        for n in 0..LISTED_CAVEATS + 3 {
            for binary in [fields.to_v1(), fields.to_v2()] {
                let mut list = CaveatList::new();
                let parsed = parse_binary_listing(&binary, 64, &mut list).unwrap();
                let listed: Vec<_> = list.iter(&parsed).collect();
                assert_eq!(listed, parsed.caveats().collect::<Vec<_>>());
                assert_eq!(listed.len(), n + 2);
            }
            fields.caveats.push(OwnedCaveat {
                id: format!("nonce = {n}").into_bytes(),
                location: None,
                vid: None,
            });
        }
    }

    #[test]
    fn decoding_into_a_buffer_matches_decode_token() {
        let binary = sample().to_v1();
        let mut long = sample();
        long.caveats[0].id = vec![b'x'; 2000];
        let long = long.to_v1();
        let mut tokens: Vec<Vec<u8>> = Vec::new();
        for bytes in [&binary, &long, &vec![0xfb; 30], &vec![0xff; 31]] {
            for engine in [
                base64::engine::general_purpose::STANDARD,
                base64::engine::general_purpose::STANDARD_NO_PAD,
                base64::engine::general_purpose::URL_SAFE,
                base64::engine::general_purpose::URL_SAFE_NO_PAD,
            ] {
                let text = engine.encode(bytes).into_bytes();
                let mut mixed = text.clone();
                if let Some(at) = mixed.iter().position(|&b| b == b'+' || b == b'-') {
                    mixed[at] = if mixed[at] == b'+' { b'-' } else { b'+' };
                }
                tokens.extend([text, mixed]);
            }
        }
        tokens.push(sample().to_v2json().into_bytes());
        tokens.extend([
            b"".to_vec(),
            b"!".to_vec(),
            b"abc".to_vec(),
            b"a-b+".to_vec(),
        ]);
        for token in tokens {
            let mut buf = [0; DECODE_BUF];
            let into = decode_token_into(&token, &mut buf);
            let plain = decode_token(&token);
            match (into, plain) {
                (Ok(into), Ok(plain)) => assert_eq!(&*into, plain.bytes()),
                (Err(into), Err(plain)) => assert_eq!(into, plain),
                _ => panic!("{token:?}"),
            }
        }
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

#[cfg(test)]
mod debug_tests {
    use super::*;

    /// The signature is the token's credential: no `Debug` output carries it.
    #[test]
    fn debug_output_leaves_the_signature_out() {
        let signature = [0xab; SIGNATURE_LEN];
        let fields = MacaroonFields {
            location: Some(b"example.org".to_vec()),
            identifier: b"key".to_vec(),
            caveats: vec![OwnedCaveat {
                id: b"user_id = @a:b".to_vec(),
                location: None,
                vid: None,
            }],
            signature,
        };
        let hex: String = signature.iter().map(|b| format!("{b:02x}")).collect();
        let token = fields.serialize(MacaroonFormat::V1);
        let decoded = decode_token(token.as_bytes()).unwrap();
        let parsed = parse_binary(decoded.bytes(), 8).unwrap();
        for debug in [format!("{fields:?}"), format!("{parsed:?}")] {
            assert!(debug.contains("<redacted>"), "{debug}");
            assert!(
                !debug.contains("171, 171") && !debug.contains(&hex),
                "{debug}"
            );
        }
    }
}
