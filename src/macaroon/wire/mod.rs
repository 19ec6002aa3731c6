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

mod json;
mod serialize;
#[cfg(test)]
mod tests;
mod v1;
mod v2;

use json::v2json_to_binary;
pub(crate) use serialize::{MacaroonFields, OwnedCaveat};
use v1::{parse_v1, v1_caveat};
use v2::{parse_v2, v2_caveat};

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

#[doc = include_str!("../../../docs/formats.md")]
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

/// Whether `token` may be a macaroon in some supported format, judged by its first byte alone:
/// `{` (V2JSON), or the base64 of a binary macaroon's first byte, which is `0x02` (V2) or a hex
/// digit (a V1 packet's length). Those bytes' top six bits pick the first base64 character:
/// `A` (0x02), `M` `N` `O` (`0`-`9`), `Q` `R` (`A`-`F`), `Y` `Z` (`a`-`f`), the same in the
/// standard and the URL-safe alphabet. Any other token fails decoding or parsing anyway; this
/// says so without decoding, so that an opaque token (MAS's `mat_…`, Synapse's `syt_…`) goes to
/// the resolver at once.
pub(crate) fn may_be_macaroon(token: &[u8]) -> bool {
    matches!(
        token.first(),
        Some(b'{' | b'A' | b'M' | b'N' | b'O' | b'Q' | b'R' | b'Y' | b'Z')
    )
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

type CaveatStep<'a> = Result<Option<(RawCaveat<'a>, &'a [u8])>, FormatError>;

/// Locations must be text, as the `macaroon` crate and pymacaroons read them.
fn utf8(value: &[u8]) -> Result<&[u8], FormatError> {
    std::str::from_utf8(value)
        .map(str::as_bytes)
        .map_err(|_| FormatError::BadPacket)
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
