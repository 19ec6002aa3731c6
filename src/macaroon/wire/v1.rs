//! V1 binary: a line-based packet format, `XXXX key value\n` with `XXXX` the length in hex.

use super::*;
/// A V1 packet's key, its value, and the bytes after it.
pub(super) type V1Packet<'a> = (&'a [u8], &'a [u8], &'a [u8]);

/// One V1 packet: `XXXX key value\n`, `XXXX` the packet's whole length in hex.
pub(super) fn v1_packet(data: &[u8]) -> Result<V1Packet<'_>, FormatError> {
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

/// The next caveat of a V1 caveat section: `cid`, then `vid` and `cl` together for a third party.
pub(super) fn v1_caveat(data: &[u8]) -> CaveatStep<'_> {
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

pub(super) fn parse_v1<'a>(
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
