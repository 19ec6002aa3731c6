//! Tests of the wire formats: round trips, every malformation, the reference vectors.

use super::v1::v1_packet;
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

/// The first-byte sniff never calls a macaroon something else: every first byte a binary
/// macaroon can start with (0x02, or a V1 length's hex digit), followed by anything, encodes
/// to a first character the sniff accepts, in both alphabets; and every token the sniff
/// refuses fails decoding or parsing anyway.
#[test]
fn the_first_byte_sniff_is_exact_enough() {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    let starts = std::iter::once(2u8).chain((b'0'..=b'9').chain(b'a'..=b'f').chain(b'A'..=b'F'));
    for first in starts {
        for second in [0u8, 0x7f, 0xff] {
            for engine in [&STANDARD, &URL_SAFE_NO_PAD] {
                let token = engine.encode([first, second, b'x']);
                assert!(may_be_macaroon(token.as_bytes()), "{first:#x}: {token}");
            }
        }
    }
    assert!(may_be_macaroon(b"{\"v\":2}"));
    // A Synapse-shaped V1 token and the opaque formats.
    assert!(may_be_macaroon(b"MDAxY2xvY2F0aW9uIGV4YW1wbGUub3JnCg"));
    for opaque in [
        "mat_abc",
        "syt_YWxpY2U_abc_123",
        "mct_x",
        "opaque-token",
        "",
        "Bearer",
    ] {
        assert!(!may_be_macaroon(opaque.as_bytes()), "{opaque}");
    }
    // Whatever follows a refused first character, the token does not parse.
    let tail = "DAxY2xvY2F0aW9uIGV4YW1wbGUub3JnCjAwMTVpZGVudGlmaWVyIGtleQo";
    for first in 0x21u8..0x7f {
        let token = format!("{}{tail}", first as char);
        if may_be_macaroon(token.as_bytes()) {
            continue;
        }
        let mut buf = [0; DECODE_BUF];
        let parsed = decode_token_into(token.as_bytes(), &mut buf)
            .ok()
            .map(|decoded| parse_binary(&decoded, 64).is_ok());
        assert_ne!(parsed, Some(true), "{token}");
    }
}
