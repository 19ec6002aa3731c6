//! Differential tests of `wire` (and the chain in `verify`) against the `macaroon` crate, an
//! independent implementation of the same formats.
//!
//! 1. Whatever the crate writes (V1, V2, V2JSON; either base64 alphabet, padded or not), `wire`
//!    reads with the same fields.
//! 2. Whatever `wire` writes, the crate reads with the same fields.
//! 3. On arbitrary and mutated input, whatever `wire` accepts the crate accepts too, with the same
//!    fields. `wire` is deliberately stricter, so the converse does not hold; those cases are
//!    counted and printed. The V2JSON that `wire` reads on purpose and the crate does not
//!    (pymacaroons' without `"v"` or `"c"`, URL-safe `i64`/`v64`, repeated keys) is checked
//!    explicitly: rewritten into the crate's dialect, it must read the same (see
//!    `crate_dialect`).
//! 4. Tokens the crate mints with a passphrase-derived key verify with a [`KeyRing`] holding the
//!    same passphrase, and stop verifying when any byte of the signature changes.
//!
//! Everything is seeded, so a failure reproduces. The crate's own third-party caveats carry a
//! verifier id encrypted with a random nonce, which is why the mutation corpus of test 3 builds
//! its third-party caveats with [`MacaroonFields`] instead.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::engine::GeneralPurpose;
use base64::Engine as _;
use macaroon::{
    Caveat as CrateCaveat, Format as CrateFormat, Macaroon as CrateMacaroon, MacaroonKey,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::macaroon::v2json_dialect::crate_dialect;
use crate::macaroon::wire::{
    decode_token, parse_binary, MacaroonFields, MacaroonFormat, OwnedCaveat,
};
use crate::{hooks::ManualClock, KeyRing, MacaroonSecret, TokenType, Verifier};

/// No caveat limit in the comparisons: the crate has none.
const NO_LIMIT: usize = usize::MAX;

/// The four base64 flavours a binary token may arrive in.
const ENGINES: [(&str, GeneralPurpose); 4] = [
    ("standard", STANDARD),
    ("standard, unpadded", STANDARD_NO_PAD),
    ("url-safe", URL_SAFE),
    ("url-safe, unpadded", URL_SAFE_NO_PAD),
];

/// What both parsers agree a macaroon is: caveats as `(id, third_party)`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct View {
    location: Option<Vec<u8>>,
    identifier: Vec<u8>,
    caveats: Vec<(Vec<u8>, bool)>,
    signature: [u8; 32],
}

fn our_binary_view(binary: &[u8]) -> Option<View> {
    let m = parse_binary(binary, NO_LIMIT).ok()?;
    Some(View {
        location: m.location.map(<[u8]>::to_vec),
        identifier: m.identifier.to_vec(),
        caveats: m
            .caveats()
            .map(|c| (c.id.to_vec(), c.third_party))
            .collect(),
        signature: *m.signature,
    })
}

/// Our reading of a token as sent. Never wrapped in `catch_unwind`: our code must not panic.
fn our_view(token: &[u8]) -> Option<View> {
    let decoded = decode_token(token).ok()?;
    our_binary_view(decoded.bytes())
}

fn crate_view(m: &CrateMacaroon) -> View {
    let signature = m.signature();
    View {
        location: m.location().map(String::into_bytes),
        identifier: m.identifier().0,
        caveats: m
            .caveats()
            .into_iter()
            .map(|c| match c {
                CrateCaveat::FirstParty(fp) => (fp.predicate().0, false),
                CrateCaveat::ThirdParty(tp) => (tp.id().0, true),
            })
            .collect(),
        signature: *AsRef::<[u8; 32]>::as_ref(&signature),
    }
}

/// The crate's reading, or its error. A panic on garbage counts as a rejection.
fn crate_result(parse: impl FnOnce() -> macaroon::Result<CrateMacaroon>) -> Result<View, String> {
    match catch_unwind(AssertUnwindSafe(parse)) {
        Ok(Ok(m)) => Ok(crate_view(&m)),
        Ok(Err(e)) => Err(format!("{e:?}")),
        Err(_) => Err("panicked".into()),
    }
}

fn crate_token(token: &[u8]) -> Result<View, String> {
    crate_result(|| CrateMacaroon::deserialize(token))
}

fn crate_binary(binary: &[u8]) -> Result<View, String> {
    crate_result(|| CrateMacaroon::deserialize_binary(binary))
}

fn show(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

// ---- Random data ----------------------------------------------------------------------------

fn printable(rng: &mut StdRng, len: usize) -> Vec<u8> {
    (0..len).map(|_| rng.gen_range(0x20u8..0x7f)).collect()
}

fn unicode(rng: &mut StdRng, len: usize) -> String {
    (0..len)
        .map(|_| match rng.gen_range(0..4) {
            0 => rng.gen::<char>(),
            1 => *['é', 'ß', '€', '😀', '\u{0}', '\n', '"', '\\', ' ']
                .choose(rng)
                .unwrap(),
            _ => rng.gen_range(0x20u8..0x7f) as char,
        })
        .collect()
}

/// Field contents with the edge cases weighted up: empty, one byte, separators the formats use,
/// arbitrary bytes, and lengths that need a two-byte V2 varint.
fn field_bytes(rng: &mut StdRng) -> Vec<u8> {
    match rng.gen_range(0..10) {
        0 => Vec::new(),
        1 => vec![rng.gen()],
        2 => {
            let specials = [
                &b" "[..],
                b"\n",
                b"\0",
                b"\x02",
                b"=",
                b"{",
                b"\"",
                b"\\",
                b"0004",
                b"cid ",
                b"signature ",
            ];
            (0..rng.gen_range(1..4))
                .flat_map(|_| specials.choose(rng).unwrap().to_vec())
                .collect()
        }
        3 => {
            let len = rng.gen_range(0..40);
            (0..len).map(|_| rng.gen()).collect()
        }
        4 => {
            let len = rng.gen_range(120..300);
            printable(rng, len)
        }
        5 => {
            let len = rng.gen_range(1..20);
            unicode(rng, len).into_bytes()
        }
        _ => {
            let len = rng.gen_range(1..40);
            printable(rng, len)
        }
    }
}

fn non_empty_bytes(rng: &mut StdRng) -> Vec<u8> {
    loop {
        let bytes = field_bytes(rng);
        if !bytes.is_empty() {
            return bytes;
        }
    }
}

/// A location: the crate keeps locations as `String`, so they are always UTF-8.
fn location(rng: &mut StdRng) -> String {
    match rng.gen_range(0..4) {
        0 => String::new(),
        1 => {
            let len = rng.gen_range(1..20);
            unicode(rng, len)
        }
        _ => format!("https://{}.example.org/", rng.gen_range(0..1000)),
    }
}

fn signature(rng: &mut StdRng) -> [u8; 32] {
    rng.gen()
}

fn random_fields(rng: &mut StdRng, max_caveats: usize) -> MacaroonFields {
    let caveats = (0..rng.gen_range(0..=max_caveats))
        .map(|_| {
            let third_party = rng.gen_bool(0.15);
            OwnedCaveat {
                id: field_bytes(rng),
                location: third_party.then(|| location(rng).into_bytes()),
                vid: third_party.then(|| field_bytes(rng)),
            }
        })
        .collect();
    MacaroonFields {
        location: rng.gen_bool(0.6).then(|| location(rng).into_bytes()),
        identifier: non_empty_bytes(rng),
        caveats,
        signature: signature(rng),
    }
}

fn fields_view(fields: &MacaroonFields) -> View {
    View {
        location: fields.location.clone(),
        identifier: fields.identifier.clone(),
        caveats: fields
            .caveats
            .iter()
            .map(|c| (c.id.clone(), c.vid.is_some()))
            .collect(),
        signature: fields.signature,
    }
}

fn crate_format(format: MacaroonFormat) -> CrateFormat {
    match format {
        MacaroonFormat::V1 => CrateFormat::V1,
        MacaroonFormat::V2 => CrateFormat::V2,
        MacaroonFormat::V2Json => CrateFormat::V2JSON,
    }
}

const FORMATS: [MacaroonFormat; 3] = [
    MacaroonFormat::V1,
    MacaroonFormat::V2,
    MacaroonFormat::V2Json,
];

// ---- 1. The crate writes, we read -----------------------------------------------------------

#[test]
fn differential_crate_tokens_parse_identically() {
    let mut rng = StdRng::seed_from_u64(0x5eed_0001);
    let mut cases = 0;
    for n in 0..400 {
        let identifier = non_empty_bytes(&mut rng);
        let key = MacaroonKey::generate(&signature(&mut rng));
        let place = rng.gen_bool(0.6).then(|| location(&mut rng));
        let mut m = CrateMacaroon::create(place, &key, identifier.into()).unwrap();
        for _ in 0..rng.gen_range(0..=10) {
            if rng.gen_bool(0.15) {
                let third_key = MacaroonKey::generate(&signature(&mut rng));
                let third_location = location(&mut rng);
                m.add_third_party_caveat(&third_location, &third_key, field_bytes(&mut rng).into());
            } else {
                m.add_first_party_caveat(field_bytes(&mut rng).into());
            }
        }
        let expected = crate_view(&m);

        for format in FORMATS {
            let token = m.serialize(crate_format(format)).unwrap();
            let mut texts = vec![("as the crate wrote it", token.clone())];
            match format {
                MacaroonFormat::V2Json => {
                    // pymacaroons leaves out "v": we read it the same (the crate does not).
                    let mut json: serde_json::Value = serde_json::from_str(&token).unwrap();
                    json.as_object_mut().unwrap().remove("v").unwrap();
                    texts.push(("without \"v\"", json.to_string()));
                }
                MacaroonFormat::V1 | MacaroonFormat::V2 => {
                    let binary = URL_SAFE.decode(&token).unwrap();
                    let want = if format == MacaroonFormat::V1 {
                        MacaroonFormat::V1
                    } else {
                        MacaroonFormat::V2
                    };
                    assert_eq!(parse_binary(&binary, NO_LIMIT).unwrap().format, want);
                    assert_eq!(
                        our_binary_view(&binary).as_ref(),
                        Some(&expected),
                        "macaroon {n}, {format:?} binary {}",
                        show(&binary)
                    );
                    cases += 1;
                    for (name, engine) in &ENGINES {
                        texts.push((name, engine.encode(&binary)));
                    }
                }
            }
            for (how, text) in texts {
                assert_eq!(
                    our_view(text.as_bytes()).as_ref(),
                    Some(&expected),
                    "macaroon {n}, {format:?} {how}: {text}"
                );
                if how != "without \"v\"" {
                    assert_eq!(crate_token(text.as_bytes()).as_ref(), Ok(&expected));
                }
                cases += 1;
            }
        }
    }
    eprintln!("differential 1: {cases} crate-written tokens read identically");
}

// ---- 2. We write, the crate reads -----------------------------------------------------------

#[test]
fn differential_our_tokens_parse_identically_in_the_crate() {
    let mut rng = StdRng::seed_from_u64(0x5eed_0002);
    let mut cases = 0;
    for n in 0..600 {
        let fields = random_fields(&mut rng, 10);
        let expected = fields_view(&fields);
        for format in FORMATS {
            let token = fields.serialize(format);
            let theirs = catch_unwind(|| CrateMacaroon::deserialize(&token))
                .unwrap_or_else(|_| panic!("the crate panicked on our {format:?} token {token}"))
                .unwrap_or_else(|e| {
                    panic!("the crate refused our {format:?} token {token}: {e:?}\n{fields:?}")
                });
            assert_eq!(
                crate_view(&theirs),
                expected,
                "macaroon {n}, {format:?}: {token}"
            );
            // Third-party details survive too, not just the flag.
            let mut third = fields.caveats.iter().filter(|c| c.vid.is_some());
            for caveat in theirs.caveats() {
                if let CrateCaveat::ThirdParty(tp) = caveat {
                    let ours = third.next().unwrap();
                    assert_eq!(Some(&tp.verifier_id().0), ours.vid.as_ref(), "{token}");
                    assert_eq!(Some(tp.location().into_bytes()), ours.location, "{token}");
                }
            }
            assert_eq!(
                our_view(token.as_bytes()),
                Some(expected.clone()),
                "{token}"
            );
            cases += 1;
        }
    }
    eprintln!("differential 2: {cases} tokens we wrote read identically by the crate");
}

// ---- 3. Whatever we accept, the crate accepts -----------------------------------------------

#[derive(Default)]
struct Tally {
    /// Per category: inputs tried, accepted by us, accepted by the crate but not by us.
    counts: BTreeMap<&'static str, [usize; 3]>,
    /// How often each documented V2JSON exception was needed for the crate to agree.
    exceptions: BTreeMap<&'static str, usize>,
    disagreements: Vec<String>,
}

impl Tally {
    /// Compares the two readings of one input. `token` says whether `input` is a token as sent
    /// (`decode_token`, `Macaroon::deserialize`) or already binary (`parse_binary`,
    /// `Macaroon::deserialize_binary`).
    fn check(&mut self, category: &'static str, input: &[u8], token: bool) {
        let ours = if token {
            our_view(input)
        } else {
            our_binary_view(input)
        };
        let theirs = if token {
            crate_token(input)
        } else {
            crate_binary(input)
        };
        let counts = self.counts.entry(category).or_default();
        counts[0] += 1;
        let Some(ours) = ours else {
            if theirs.is_ok() {
                counts[2] += 1;
            }
            return;
        };
        counts[1] += 1;
        let error = match &theirs {
            Ok(view) if *view == ours => return,
            Ok(_) => String::new(),
            Err(error) => error.clone(),
        };
        // The deliberate exceptions: the crate must read the token, rewritten into its dialect,
        // exactly as we read the original.
        if token && input.first() == Some(&b'{') && !error.is_empty() {
            let (rewritten, reasons) = crate_dialect(input, error.contains("duplicate field"));
            if !reasons.is_empty() {
                let again = crate_token(rewritten.as_bytes());
                if again.as_ref() == Ok(&ours) {
                    for reason in reasons {
                        *self.exceptions.entry(reason).or_default() += 1;
                    }
                    return;
                }
                self.disagreements.push(format!(
                    "[{category}] input {}\n    ours:  {ours:?}\n    crate: {theirs:?}\n    \
                     crate on {rewritten} ({reasons:?}): {again:?}",
                    show(input)
                ));
                return;
            }
        }
        self.disagreements.push(format!(
            "[{category}] input {}\n    ours:  {ours:?}\n    crate: {theirs:?}",
            show(input)
        ));
    }
}

const B64_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_=";
const JSON_CHARS: &[u8] = b"{}[]:,\"\\ 0123456789vilcs64-_+/=aA";
const BINARY_BYTES: &[u8] = &[
    0, 1, 2, 3, 4, 5, 6, 7, 0x1f, 0x20, 0x21, 0x7f, 0x80, 0x81, 0xff, b'\n', b' ', b'0', b'9',
    b'a', b'f', b'g', b'A', b'F', b'G', b'+',
];

/// One random edit: replace, flip a bit, insert, delete or truncate.
fn mutate(rng: &mut StdRng, input: &[u8], alphabet: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    let byte = |rng: &mut StdRng| {
        if rng.gen_bool(0.5) {
            *alphabet.choose(rng).unwrap()
        } else {
            rng.gen()
        }
    };
    let at = rng.gen_range(0..=out.len());
    match rng.gen_range(0..5) {
        0 if at < out.len() => out[at] = byte(rng),
        1 if at < out.len() => out[at] ^= 1 << rng.gen_range(0..8),
        2 => out.insert(at, byte(rng)),
        3 if at < out.len() => {
            out.remove(at);
        }
        _ => out.truncate(at),
    }
    out
}

/// Valid tokens to mutate: first-party macaroons the crate mints, and macaroons with third-party
/// caveats we build, in every format.
fn seed_tokens(rng: &mut StdRng) -> Vec<(MacaroonFormat, String)> {
    let mut seeds = Vec::new();
    for _ in 0..30 {
        let key = MacaroonKey::generate(&signature(rng));
        let place = rng.gen_bool(0.5).then(|| location(rng));
        let mut m = CrateMacaroon::create(place, &key, non_empty_bytes(rng).into()).unwrap();
        for _ in 0..rng.gen_range(0..=4) {
            let len = rng.gen_range(0..24);
            let caveat = if rng.gen_bool(0.8) {
                printable(rng, len)
            } else {
                field_bytes(rng)
            };
            m.add_first_party_caveat(caveat.into());
        }
        for format in FORMATS {
            seeds.push((format, m.serialize(crate_format(format)).unwrap()));
        }
    }
    for _ in 0..30 {
        let mut fields = random_fields(rng, 4);
        for caveat in &mut fields.caveats {
            if caveat.vid.is_none() && rng.gen_bool(0.8) {
                let len = rng.gen_range(0..24);
                caveat.id = printable(rng, len);
            }
        }
        for format in FORMATS {
            seeds.push((format, fields.serialize(format)));
        }
    }
    seeds
}

#[test]
fn differential_whatever_we_accept_the_crate_accepts() {
    let mut rng = StdRng::seed_from_u64(0x5eed_0003);
    let mut tally = Tally::default();

    // (a) Random bytes, as a token and as binary.
    for _ in 0..3000 {
        let len = rng.gen_range(0..120);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        tally.check("a: random bytes as token", &bytes, true);
        if let Some(first) = bytes.first_mut() {
            *first = *[2, b'0', b'{'].choose(&mut rng).unwrap();
        }
        tally.check("a: random bytes as token", &bytes, true);
        tally.check("a: random bytes as binary", &bytes, false);
    }

    // (b) Random base64: random bytes in every flavour, and random strings of base64 characters.
    for _ in 0..3000 {
        let len = rng.gen_range(0..120);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        if let Some(first) = bytes.first_mut() {
            *first = *[2, b'0', rng.gen()].choose(&mut rng).unwrap();
        }
        let (_, engine) = ENGINES.choose(&mut rng).unwrap();
        tally.check("b: random base64", engine.encode(&bytes).as_bytes(), true);
        let text: Vec<u8> = (0..len)
            .map(|_| *B64_CHARS.choose(&mut rng).unwrap())
            .collect();
        tally.check("b: random base64", &text, true);
    }

    // (c) Valid tokens, mutated: as text, and as binary (checked as binary and re-encoded).
    let seeds = seed_tokens(&mut rng);
    for (format, token) in &seeds {
        tally.check("c: unmutated", token.as_bytes(), true);
        let (text_category, binary_category) = match format {
            MacaroonFormat::V1 => ("c: V1 text mutation", Some("c: V1 binary mutation")),
            MacaroonFormat::V2 => ("c: V2 text mutation", Some("c: V2 binary mutation")),
            MacaroonFormat::V2Json => ("c: V2JSON text mutation", None),
        };
        let alphabet = if *format == MacaroonFormat::V2Json {
            JSON_CHARS
        } else {
            B64_CHARS
        };
        for _ in 0..200 {
            let mut text = mutate(&mut rng, token.as_bytes(), alphabet);
            if rng.gen_bool(0.2) {
                text = mutate(&mut rng, &text, alphabet);
            }
            tally.check(text_category, &text, true);
        }
        let Some(binary_category) = binary_category else {
            continue;
        };
        let binary = decode_token(token.as_bytes()).unwrap().bytes().to_vec();
        for _ in 0..200 {
            let mut mutated = mutate(&mut rng, &binary, BINARY_BYTES);
            if rng.gen_bool(0.2) {
                mutated = mutate(&mut rng, &mutated, BINARY_BYTES);
            }
            tally.check(binary_category, &mutated, false);
            let (_, engine) = ENGINES.choose(&mut rng).unwrap();
            tally.check(binary_category, engine.encode(&mutated).as_bytes(), true);
        }
    }

    let mut total = 0;
    eprintln!("differential 3: per category: inputs, accepted by us, accepted only by the crate");
    for (category, [inputs, ours, crate_only]) in &tally.counts {
        eprintln!("    {category:<28} {inputs:>6} {ours:>6} {crate_only:>6}");
        total += inputs;
    }
    eprintln!("    {total} inputs; V2JSON compared after rewriting into the crate's dialect:");
    for (reason, count) in &tally.exceptions {
        eprintln!("    {count:>6} {reason}");
    }
    assert!(
        tally.disagreements.is_empty(),
        "{} inputs we accept that the crate refuses or reads differently; first ones:\n{}",
        tally.disagreements.len(),
        tally.disagreements[..tally.disagreements.len().min(15)].join("\n")
    );
}

// ---- 4. The HMAC chain ----------------------------------------------------------------------

const NOW_MS: u64 = 1_700_000_000_000;

fn flip_signature_byte(format: MacaroonFormat, token: &str, at: usize, mask: u8) -> String {
    match format {
        MacaroonFormat::V2Json => {
            let mut json: serde_json::Value = serde_json::from_str(token).unwrap();
            let s64 = json["s64"].as_str().unwrap();
            let mut signature = URL_SAFE.decode(s64).unwrap();
            signature[at] ^= mask;
            json["s64"] = URL_SAFE.encode(signature).into();
            json.to_string()
        }
        MacaroonFormat::V1 | MacaroonFormat::V2 => {
            let mut binary = URL_SAFE.decode(token).unwrap();
            // V1 ends `signature <32 bytes>\n`; V2 ends with the 32 bytes.
            let end = binary.len() - usize::from(format == MacaroonFormat::V1);
            binary[end - 32 + at] ^= mask;
            URL_SAFE.encode(binary)
        }
    }
}

#[test]
fn differential_chain_matches_the_crate() {
    let mut rng = StdRng::seed_from_u64(0x5eed_0004);
    let parts = http::Request::new(()).into_parts().0;
    let (mut tokens, mut forged) = (0, 0);
    for n in 0..150 {
        let secret = non_empty_bytes(&mut rng);
        let identifier = non_empty_bytes(&mut rng);
        let key = MacaroonKey::generate(&secret);
        let place = rng.gen_bool(0.5).then(|| location(&mut rng));
        let mut m = CrateMacaroon::create(place, &key, identifier.clone().into()).unwrap();

        let user = format!("@u{}:example.org", rng.gen::<u32>());
        let nonce_len = rng.gen_range(1..24);
        let nonce = String::from_utf8(printable(&mut rng, nonce_len)).unwrap();
        let mut caveats = vec![
            "gen = 1".to_owned(),
            format!("user_id = {user}"),
            "type = access".to_owned(),
            format!("nonce = {}", nonce.trim_start()),
        ];
        if caveats[3] == "nonce = " {
            caveats[3].push('x');
        }
        if rng.gen_bool(0.3) {
            caveats.push(format!(
                "time < {}",
                NOW_MS + rng.gen_range(1..1_000_000_000)
            ));
        }
        if rng.gen_bool(0.3) {
            caveats.push(format!("device_id = D{}", rng.gen::<u16>()));
        }
        if rng.gen_bool(0.2) {
            caveats.push(format!("user_id = {user}"));
        }
        caveats.shuffle(&mut rng);
        for caveat in &caveats {
            m.add_first_party_caveat(caveat.as_str().into());
        }

        // The crate's own verifier agrees the chain holds.
        let mut theirs = macaroon::Verifier::default();
        theirs.satisfy_general(|_| true);
        theirs.verify(&m, &key, Vec::new()).unwrap();

        let mut ring = KeyRing::new();
        if rng.gen_bool(0.5) {
            ring = ring.with_key("another key", MacaroonSecret::from_passphrase("other"));
        }
        let ring = ring.with_key(&identifier, MacaroonSecret::from_passphrase(&secret));
        let verifier = Verifier::new(ring).clock(ManualClock::new(NOW_MS));
        let wrong = Verifier::new(
            KeyRing::new().with_key(&identifier, MacaroonSecret::from_passphrase(b"not it")),
        )
        .clock(ManualClock::new(NOW_MS));

        let format = *FORMATS.choose(&mut rng).unwrap();
        let token = m.serialize(crate_format(format)).unwrap();
        let verified = verifier
            .verify(token.as_bytes(), TokenType::Access, &parts)
            .unwrap_or_else(|e| panic!("token {n} ({format:?}) {caveats:?} refused: {e:?}"));
        assert_eq!(verified.user_id(), user);
        let refused = wrong
            .verify(token.as_bytes(), TokenType::Access, &parts)
            .unwrap_err();
        assert!(refused.is_unknown_token(), "{refused:?}");
        tokens += 1;

        for at in 0..32 {
            let mask = rng.gen_range(1..=255);
            let bad = flip_signature_byte(format, &token, at, mask);
            assert!(
                our_view(bad.as_bytes()).is_some(),
                "still a macaroon: {bad}"
            );
            let refused = verifier
                .verify(bad.as_bytes(), TokenType::Access, &parts)
                .expect_err("a changed signature must not verify");
            assert!(refused.is_unknown_token(), "{refused:?}");
            forged += 1;
        }
    }
    eprintln!(
        "differential 4: {tokens} crate-minted tokens verified, {forged} altered signatures refused"
    );
}
