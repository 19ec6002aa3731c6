//! Target 4: our wire parser against the `macaroon` crate, as `src/macaroon/differential_tests.rs`
//! states the relation: whatever we accept (as a token, or as V1/V2 binary), the crate accepts
//! with the same location, identifier, caveats (id, third-party flag) and signature. The only
//! exceptions are the documented V2JSON spellings the crate cannot read (no `"v"`, no `"c"`,
//! a base64 alphabet it refuses in a field, a key given twice): rewritten into the crate's
//! dialect, the token must then read the same. And whatever we accept, we write again in every
//! format so that both we and the crate read it back the same.
#![no_main]

use std::panic::{catch_unwind, AssertUnwindSafe};

use libfuzzer_sys::fuzz_target;
use macaroon::{Caveat as CrateCaveat, Macaroon as CrateMacaroon};
use tower_matrix_auth::fuzzing::{crate_dialect, parse_binary, parse_token, ParsedView};
use tower_matrix_auth::macaroon::MacaroonFormat;

#[derive(Debug, PartialEq, Eq)]
struct View {
    location: Option<Vec<u8>>,
    identifier: Vec<u8>,
    caveats: Vec<(Vec<u8>, bool)>,
    signature: [u8; 32],
}

fn ours(view: &ParsedView) -> View {
    View {
        location: view.location.clone(),
        identifier: view.identifier.clone(),
        caveats: view.caveats.clone(),
        signature: view.signature,
    }
}

/// The crate's reading, or its error; a panic counts as a refusal (quietly: libfuzzer-sys's
/// panic hook would abort the process).
fn crate_reads(parse: impl FnOnce() -> macaroon::Result<CrateMacaroon>) -> Result<View, String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = catch_unwind(AssertUnwindSafe(parse));
    std::panic::set_hook(hook);
    let m = match result {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => return Err(format!("{e:?}")),
        Err(_) => return Err("panicked".into()),
    };
    let signature = m.signature();
    Ok(View {
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
    })
}

/// Whether any JSON object in `input` gives a key twice (`serde_json::Value` keeps the last).
fn has_duplicate_keys(input: &[u8]) -> bool {
    use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
    struct Dup(bool);
    impl<'de> Deserialize<'de> for Dup {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Dup;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("JSON")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Dup, A::Error> {
                    let (mut keys, mut dup) = (std::collections::HashSet::new(), false);
                    while let Some(key) = map.next_key::<String>()? {
                        dup |= !keys.insert(key);
                        dup |= map.next_value::<Dup>()?.0;
                    }
                    Ok(Dup(dup))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Dup, A::Error> {
                    let mut dup = false;
                    while let Some(element) = seq.next_element::<Dup>()? {
                        dup |= element.0;
                    }
                    Ok(Dup(dup))
                }
                fn visit_bool<E>(self, _: bool) -> Result<Dup, E> {
                    Ok(Dup(false))
                }
                fn visit_i64<E>(self, _: i64) -> Result<Dup, E> {
                    Ok(Dup(false))
                }
                fn visit_u64<E>(self, _: u64) -> Result<Dup, E> {
                    Ok(Dup(false))
                }
                fn visit_f64<E>(self, _: f64) -> Result<Dup, E> {
                    Ok(Dup(false))
                }
                fn visit_str<E>(self, _: &str) -> Result<Dup, E> {
                    Ok(Dup(false))
                }
                fn visit_unit<E>(self) -> Result<Dup, E> {
                    Ok(Dup(false))
                }
            }
            d.deserialize_any(V)
        }
    }
    serde_json::from_slice::<Dup>(input).is_ok_and(|d| d.0)
}

fn compare(input: &[u8], ours: &View, token: bool) {
    let theirs = if token {
        crate_reads(|| CrateMacaroon::deserialize(input))
    } else {
        crate_reads(|| CrateMacaroon::deserialize_binary(input))
    };
    let error = match &theirs {
        Ok(view) if view == ours => return,
        Ok(_) => String::new(),
        Err(error) => error.clone(),
    };
    if token && input.first() == Some(&b'{') && !error.is_empty() {
        let key_given_twice = error.contains("duplicate field") || has_duplicate_keys(input);
        let (rewritten, reasons) = crate_dialect(input, key_given_twice);
        if !reasons.is_empty() {
            let again = crate_reads(|| CrateMacaroon::deserialize(rewritten.as_bytes()));
            assert_eq!(
                again.as_ref(),
                Ok(ours),
                "input {}\nrewritten {rewritten} ({reasons:?})",
                input.escape_ascii()
            );
            return;
        }
    }
    panic!(
        "we accept what the crate refuses or reads differently: {}\n ours:  {ours:?}\n crate: {theirs:?}",
        input.escape_ascii()
    );
}

/// Whatever we read, we write again in every format; we and the crate read it back the same.
fn round_trip(view: &ParsedView) {
    let expected = ours(view);
    let longest = view
        .caveats
        .iter()
        .map(|(id, _)| id.len())
        .chain([
            view.identifier.len(),
            view.location.as_ref().map_or(0, Vec::len),
        ])
        .max()
        .unwrap_or(0);
    for format in [
        MacaroonFormat::V1,
        MacaroonFormat::V2,
        MacaroonFormat::V2Json,
    ] {
        if format == MacaroonFormat::V1 && longest > 60_000 {
            continue; // a V1 packet holds at most 64 KiB
        }
        let token = view.serialize(format);
        let back = parse_token(token.as_bytes()).expect("we read what we write");
        assert_eq!(ours(&back), expected, "{format:?} {token}");
        let theirs = crate_reads(|| CrateMacaroon::deserialize(token.as_bytes()));
        assert_eq!(theirs.as_ref(), Ok(&expected), "{format:?} {token}");
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some(view) = parse_token(data) {
        compare(data, &ours(&view), true);
        round_trip(&view);
    }
    if let Some(view) = parse_binary(data) {
        compare(data, &ours(&view), false);
        round_trip(&view);
    }
});
