//! V2 binary: `tag varint-length bytes` fields in sections ended by a zero byte.

use super::*;
pub(super) const V2_EOS: u8 = 0;
pub(super) const V2_LOCATION: u8 = 1;
pub(super) const V2_IDENTIFIER: u8 = 2;
pub(super) const V2_VID: u8 = 4;
pub(super) const V2_SIGNATURE: u8 = 6;

/// Reads one `tag varint-length bytes` field; `None` at an end-of-section byte.
pub(super) fn v2_field(data: &[u8]) -> Result<(u8, &[u8], &[u8]), FormatError> {
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
pub(super) fn v2_caveat(data: &[u8]) -> CaveatStep<'_> {
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

pub(super) fn parse_v2<'a>(
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
