//! Writes the committed seed corpus `fuzz/seeds/<target>/`: valid tokens of every format and
//! encoding (V1 and V2 in base64url and standard base64, padded or not; V2JSON with and without
//! `"v"`), the pymacaroons vectors (Synapse-style tokens), their binary forms, caveat lists and
//! request texts. Rerun it after changing the formats, and commit the result (everything is
//! deterministic but the third-party seeds, whose verifier id the `macaroon` crate encrypts with a
//! random nonce).
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --example seeds
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use tower_matrix_auth::fuzzing::parse_token;
use tower_matrix_auth::{attenuate, Format, KeyRing, MacaroonSecret, TokenType};
use tower_matrix_auth_fuzz::{keys, FORGER, NOW_MS};

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut seeds: BTreeMap<&str, Vec<(String, Vec<u8>)>> = BTreeMap::new();
    let mut add = |target: &'static str, name: String, bytes: Vec<u8>| {
        seeds.entry(target).or_default().push((name, bytes));
    };

    // ---- Tokens ---------------------------------------------------------------------------
    let keys = keys();
    let forger = KeyRing::new().with_key("key", MacaroonSecret::from_passphrase(FORGER));
    let alice = || {
        keys.mint("@alice:example.org", TokenType::Access)
            .unwrap()
            .nonce("q0mP8wYb5J2sRxL1")
    };
    let mut tokens: Vec<(String, String)> = vec![
        ("alice".into(), alice().to_token()),
        (
            "alice_location".into(),
            alice().location("example.org").to_token(),
        ),
        ("alice_device".into(), alice().device_id("PHONE").to_token()),
        (
            "alice_expiring".into(),
            alice().expires_at_ms(NOW_MS + 60_000).to_token(),
        ),
        (
            "alice_expired".into(),
            alice().expires_at_ms(NOW_MS - 1).to_token(),
        ),
        (
            "guest".into(),
            keys.mint("@guest1:example.org", TokenType::Access)
                .unwrap()
                .guest()
                .to_token(),
        ),
        (
            "refresh".into(),
            keys.mint("@alice:example.org", TokenType::Refresh)
                .unwrap()
                .to_token(),
        ),
        (
            "login".into(),
            keys.mint("@alice:example.org", TokenType::Login)
                .unwrap()
                .to_token(),
        ),
        (
            "forged".into(),
            forger
                .mint("@mallory:example.org", TokenType::Access)
                .unwrap()
                .to_token(),
        ),
        (
            "key2".into(),
            KeyRing::new()
                .with_key(
                    "key2",
                    MacaroonSecret::from_passphrase(tower_matrix_auth_fuzz::KEYS[1].1),
                )
                .mint("@bob:example.org", TokenType::Access)
                .unwrap()
                .to_token(),
        ),
    ];
    let v1 = alice().to_token();
    tokens.push((
        "attenuated_time".into(),
        attenuate(&v1, &format!("time < {}", NOW_MS + 1)).unwrap(),
    ));
    tokens.push((
        "attenuated_2016".into(),
        attenuate(&v1, "user_id = @mallory:example.org").unwrap(),
    ));
    tokens.push((
        "attenuated_unknown".into(),
        attenuate(&v1, "method = GET").unwrap(),
    ));
    // Third-party caveat, written by the reference crate.
    {
        let key = macaroon::MacaroonKey::generate(tower_matrix_auth_fuzz::KEYS[0].1.as_bytes());
        let mut m =
            macaroon::Macaroon::create(Some("example.org".into()), &key, "key".into()).unwrap();
        for c in ["gen = 1", "user_id = @alice:example.org", "type = access"] {
            m.add_first_party_caveat(c.into());
        }
        let third = macaroon::MacaroonKey::generate(b"third party key");
        m.add_third_party_caveat("https://auth.example.org", &third, "user is alice".into());
        for (name, format) in [
            ("v1", macaroon::Format::V1),
            ("v2", macaroon::Format::V2),
            ("v2json", macaroon::Format::V2JSON),
        ] {
            tokens.push((format!("third_party_{name}"), m.serialize(format).unwrap()));
        }
    }
    // Every format and encoding of the plain access token.
    for (format, name) in [(Format::V1, "v1"), (Format::V2, "v2")] {
        let token = alice().location("example.org").serialize(format);
        let binary = URL_SAFE_NO_PAD.decode(&token).unwrap();
        for (encoding, engine) in [
            ("urlsafe", URL_SAFE_NO_PAD),
            ("urlsafe_padded", URL_SAFE),
            ("standard", STANDARD_NO_PAD),
            ("standard_padded", STANDARD),
        ] {
            tokens.push((format!("alice_{name}_{encoding}"), engine.encode(&binary)));
        }
    }
    let json = alice()
        .location("example.org")
        .device_id("PHONE")
        .serialize(Format::V2Json);
    let mut without_v: serde_json::Value = serde_json::from_str(&json).unwrap();
    without_v.as_object_mut().unwrap().remove("v");
    tokens.push(("alice_v2json".into(), json));
    tokens.push(("alice_v2json_no_v".into(), without_v.to_string()));
    tokens.push((
        "alice_v2_device".into(),
        alice().device_id("PHONE").serialize(Format::V2),
    ));

    // pymacaroons, as Synapse minted.
    let vectors: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        root.join("../tests/vectors/pymacaroons.json"),
    )?)
    .unwrap();
    let mut vector_caveats = Vec::new();
    for vector in vectors["vectors"].as_array().unwrap() {
        let name = vector["name"].as_str().unwrap();
        tokens.push((
            format!("pymacaroons_{name}"),
            vector["token"].as_str().unwrap().into(),
        ));
        let caveats: Vec<&str> = vector["caveats"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        vector_caveats.push((name.to_owned(), caveats.join("\n")));
    }

    for (name, token) in &tokens {
        add("verify", name.clone(), token.clone().into_bytes());
        add("differential", name.clone(), token.clone().into_bytes());
        if let Some(view) = parse_token(token.as_bytes()) {
            let format = if token.starts_with('{') {
                Format::V2
            } else {
                view.format
            };
            add(
                "differential",
                format!("{name}.bin"),
                view.to_binary(format),
            );
        }
    }

    // ---- Caveat lists: control byte (format, token type, key), then lines -------------------
    let caveat_lists: Vec<(&str, String)> = vec![
        ("synapse", "gen = 1\nuser_id = @alice:example.org\ntype = access\nnonce = abc".into()),
        ("full", format!("gen = 1\nuser_id = @alice:example.org:8448\ntype = access\nnonce = n1\nguest = true\ndevice_id = PHONE\ntime < {}\ntime > {}\ntime == {NOW_MS}", NOW_MS + 5, NOW_MS - 5)),
        ("expired", format!("user_id = @a:b\ntype = access\ntime < {NOW_MS}")),
        ("ipv6", "user_id = @x:[::1]:8448\ntype = access".into()),
        ("conflicts", "user_id = @a:b\nuser_id = @c:d\ntype = access\ntype = refresh\ndevice_id = A\ndevice_id = B".into()),
        ("odd", "user_id  = @a:b\ntype = access\nweird-key = 1\ntime < 1e3\nguest = false\ngen == 1".into()),
        ("custom", "user_id = @a:b\ntype = access\nmethod = GET".into()),
    ];
    for (control, format) in [(0u8, "v1"), (1, "v2"), (2, "v2json")] {
        for (name, list) in &caveat_lists {
            let mut bytes = vec![control];
            bytes.extend_from_slice(list.as_bytes());
            add("caveat", format!("{name}_{format}"), bytes);
        }
    }
    for (name, list) in &vector_caveats {
        let mut bytes = vec![0u8];
        bytes.extend_from_slice(list.as_bytes());
        add("caveat", format!("pymacaroons_{name}"), bytes);
    }
    // Refresh and login types, and the second key.
    add(
        "caveat",
        "refresh".into(),
        [&[3u8][..], b"user_id = @a:b\ntype = refresh"].concat(),
    );
    add(
        "caveat",
        "login_key2".into(),
        [&[15u8][..], b"user_id = @a:b\ntype = login"].concat(),
    );

    // ---- Requests: config byte, target line, header lines ----------------------------------
    let whoami = "/_matrix/client/v3/account/whoami";
    let requests: Vec<(&str, u8, String)> = vec![
        (
            "bearer_v1",
            0,
            format!("{whoami}\nAuthorization: Bearer $A1"),
        ),
        (
            "bearer_v2",
            0,
            format!("{whoami}\nAuthorization: bearer $A2"),
        ),
        (
            "bearer_json",
            0,
            format!("{whoami}\nauthorization: Bearer $AJ"),
        ),
        ("query_v1", 0, format!("{whoami}?access_token=$A1")),
        (
            "query_std",
            0,
            format!("{whoami}?a=1&access_token=$ASQ&b=2"),
        ),
        ("query_json", 0, format!("{whoami}?access_token=$AJQ")),
        (
            "query_encoded_key",
            0,
            format!("{whoami}?access%5Ftoken=$A1"),
        ),
        ("query_empty", 2, format!("{whoami}?access_token=")),
        (
            "query_twice",
            0,
            format!("{whoami}?access_token=$A1&access_token="),
        ),
        (
            "mixed",
            0,
            format!("{whoami}?access_token=$A1\nAuthorization: Bearer $A2"),
        ),
        (
            "two_headers",
            0,
            format!("{whoami}\nAuthorization: Bearer $A1\nAuthorization: Bearer $A1"),
        ),
        (
            "basic",
            0,
            format!("{whoami}\nAuthorization: Basic dXNlcjpwYXNz"),
        ),
        (
            "bearer_alone",
            2,
            format!("{whoami}\nAuthorization: Bearer"),
        ),
        (
            "non_utf8",
            0,
            format!("{whoami}\nAuthorization: Bearer \u{e9}t\u{e9}"),
        ),
        ("guest", 0, format!("{whoami}\nAuthorization: Bearer $G")),
        (
            "guest_allowed",
            4,
            format!("{whoami}\nAuthorization: Bearer $G"),
        ),
        ("expired", 0, format!("{whoami}\nAuthorization: Bearer $E")),
        (
            "attenuated",
            0,
            format!("{whoami}\nAuthorization: Bearer $T"),
        ),
        (
            "attack_2016",
            0,
            format!("{whoami}\nAuthorization: Bearer $X"),
        ),
        ("refresh", 0, format!("{whoami}\nAuthorization: Bearer $R")),
        ("forged", 0, format!("{whoami}\nAuthorization: Bearer $F")),
        ("long", 0, format!("{whoami}\nAuthorization: Bearer $L")),
        ("query_ignored", 1, format!("{whoami}?access_token=$A1")),
        ("query_kept", 8, format!("{whoami}?access_token=$A1&x=1")),
        ("missing", 0, whoami.into()),
        ("optional_missing", 2, format!("{whoami}?x=1\nX-Other: 1")),
    ];
    for (name, config, text) in &requests {
        let mut bytes = vec![*config];
        bytes.extend_from_slice(text.as_bytes());
        add("layer", (*name).into(), bytes);
    }
    // A raw non-UTF-8 header value.
    add(
        "layer",
        "latin1".into(),
        [
            &[0u8][..],
            whoami.as_bytes(),
            b"\nAuthorization: Bearer \xe9\xff",
        ]
        .concat(),
    );

    for (target, files) in &seeds {
        let dir = root.join("seeds").join(target);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        for (name, bytes) in files {
            std::fs::write(dir.join(name), bytes)?;
        }
        println!("{target}: {} seeds", files.len());
    }
    Ok(())
}
