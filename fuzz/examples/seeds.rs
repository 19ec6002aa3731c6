//! Writes the committed seed corpus `fuzz/seeds/<target>/`: valid tokens of every format and
//! encoding (V1 and V2 in base64url and standard base64, padded or not; V2JSON with and without
//! `"v"`), the pymacaroons vectors (Synapse-style tokens), their binary forms, caveat lists and
//! request texts. Rerun it after changing the formats, and commit the result (everything is
//! deterministic but the third-party seeds, whose verifier id the `macaroon` crate encrypts with a
//! random nonce).
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --example seeds              # every target
//! cargo run --manifest-path fuzz/Cargo.toml --example seeds -- lifecycle # only these
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use tower_matrix_auth::fuzzing::{parse_token, sign};
use tower_matrix_auth::{
    macaroon::{attenuate, MacaroonFormat},
    KeyRing, MacaroonSecret, TokenType,
};
use tower_matrix_auth_fuzz::{keys, FORGER, KEYS, NOW_MS};

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
    for (format, name) in [(MacaroonFormat::V1, "v1"), (MacaroonFormat::V2, "v2")] {
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
        .serialize(MacaroonFormat::V2Json);
    let mut without_v: serde_json::Value = serde_json::from_str(&json).unwrap();
    without_v.as_object_mut().unwrap().remove("v");
    tokens.push(("alice_v2json".into(), json));
    tokens.push(("alice_v2json_no_v".into(), without_v.to_string()));
    tokens.push((
        "alice_v2_device".into(),
        alice().device_id("PHONE").serialize(MacaroonFormat::V2),
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
                MacaroonFormat::V2
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
    // The composed layer (bit 6: application services and a resolver; bit 7: a devices hook).
    let composed: Vec<(&str, u8, String)> = vec![
        ("as_sender", 0x40, format!("{whoami}\nAuthorization: Bearer $IRC")),
        ("as_query", 0x40, format!("{whoami}?access_token=$SLK")),
        ("as_user", 0x40, format!("{whoami}?user_id=@irc_alice:example.org\nAuthorization: Bearer $IRC")),
        ("as_user_encoded", 0x40, format!("{whoami}?user%5Fid=%40irc_bob%3Aexample.org&access_token=$IRC")),
        ("as_user_outside", 0x40, format!("{whoami}?user_id=@alice:example.org\nAuthorization: Bearer $IRC")),
        ("as_user_exclusive_elsewhere", 0x40, format!("{whoami}?user_id=@irc_alice:example.org\nAuthorization: Bearer $SLK")),
        ("as_user_shared", 0x40, format!("{whoami}?user_id=@bridged_carol:example.org\nAuthorization: Bearer $SLK")),
        ("as_user_twice", 0x40, format!("{whoami}?user_id=@irc_a:example.org&user_id=@irc_b:example.org\nAuthorization: Bearer $IRC")),
        ("as_user_empty", 0x40, format!("{whoami}?user_id=\nAuthorization: Bearer $IRC")),
        ("as_device", 0xc0, format!("{whoami}?user_id=@irc_alice:example.org&device_id=PHONE\nAuthorization: Bearer $IRC")),
        ("as_device_sender", 0xc0, format!("{whoami}?device_id=ASDEV\nAuthorization: Bearer $IRC")),
        ("as_device_unknown", 0xc0, format!("{whoami}?device_id=NOPE\nAuthorization: Bearer $IRC")),
        ("as_device_no_hook", 0x40, format!("{whoami}?device_id=ASDEV\nAuthorization: Bearer $IRC")),
        ("as_device_twice", 0xc0, format!("{whoami}?device_id=ASDEV&device_id=ASDEV\nAuthorization: Bearer $IRC")),
        ("as_ignored_query", 0x41, format!("{whoami}?access_token=$IRC")),
        ("as_mixed", 0x40, format!("{whoami}?access_token=$IRC\nAuthorization: Bearer $SLK")),
        ("opaque", 0x40, format!("{whoami}\nAuthorization: Bearer $OA")),
        ("opaque_query", 0x40, format!("{whoami}?access_token=$OA")),
        ("opaque_guest", 0x40, format!("{whoami}\nAuthorization: Bearer $OG")),
        ("opaque_guest_allowed", 0x44, format!("{whoami}\nAuthorization: Bearer $OG")),
        ("opaque_expired", 0x40, format!("{whoami}\nAuthorization: Bearer $OE")),
        ("opaque_expiring", 0x40, format!("{whoami}\nAuthorization: Bearer $OL")),
        ("opaque_bad_user", 0x40, format!("{whoami}\nAuthorization: Bearer $OX")),
        ("opaque_down", 0x40, format!("{whoami}\nAuthorization: Bearer $OD")),
        ("opaque_unknown", 0x40, format!("{whoami}\nAuthorization: Bearer $OU")),
        ("opaque_long", 0x40, format!("{whoami}\nAuthorization: Bearer $L")),
        ("opaque_non_utf8", 0x40, format!("{whoami}?access_token=%FF%FE")),
        ("composed_macaroon", 0x40, format!("{whoami}\nAuthorization: Bearer $A1")),
        ("composed_forged", 0x40, format!("{whoami}\nAuthorization: Bearer $F")),
    ];
    for (name, config, text) in &composed {
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

    // ---- Lifecycle scripts: config byte, then one operation per line -----------------------
    // Tokens minted elsewhere under the same keys.
    let foreign = |nonce: &str| {
        keys.mint("@alice:example.org", TokenType::Refresh)
            .unwrap()
            .nonce(nonce)
            .device_id("TABLET")
            .to_token()
    };
    let secret = MacaroonSecret::from_passphrase(KEYS[0].1);
    let signed = |caveats: &[&str]| {
        let caveats: Vec<&[u8]> = caveats.iter().map(|c| c.as_bytes()).collect();
        sign(&secret, KEYS[0].0.as_bytes(), &caveats, MacaroonFormat::V1)
    };
    let session = "0123456789abcdef0123456789abcdef";
    let before = NOW_MS - 1;
    // A session another process of the crate began before the run: its nonce first, where only
    // the minter writes. Exchanged like the run's own (any "log out everywhere" in the run
    // catches it: its epoch is 0).
    let ours = signed(&[
        &format!("nonce = {session}.0.{before}.r.{before}.0.-"),
        "gen = 1",
        "user_id = @alice:example.org",
        "type = refresh",
        "device_id = TABLET",
    ]);
    // The four-field nonce of earlier versions, where they wrote it (after `type`), and the
    // session grammar appended: neither names a session.
    let old = foreign(&format!("{session}.0.{before}.r"));
    let appended = foreign(&format!("{session}.0.{before}.r.{before}.0.-"));
    // Synapse's random nonce.
    let synapse = foreign("q0mP8wYb5J2sRxL1");
    // `F` lines: caveats of a token minted elsewhere, `|`-separated.
    let alice = |kind: &str| format!("gen = 1|user_id = @alice:example.org|type = {kind}");
    // A session nonce of session `id` (1 to 9: sessions the run never saw).
    let nonce = |id: u8, generation: u32, kind: char, epoch: u64| {
        let session = format!("{:032x}", u128::from(id) * 0x1111_1111);
        format!("nonce = {session}.{generation}.{NOW_MS}.{kind}.{NOW_MS}.{epoch}.-")
    };
    let expiring = NOW_MS + 60_000;
    let body = |placeholder: &str| format!("{{\"refresh_token\":\"{placeholder}\"}}");
    let lifecycle: Vec<(&str, u8, Vec<String>)> = vec![
        // The docs' table, /v3/refresh: old tokens live until a successor is used.
        (
            "rotate",
            b'0',
            vec![
                "L0".into(),
                format!("V0000{}", body("$R0")),
                "U$A1".into(),
                format!("V0000{}", body("$R1")),
                "U$A0".into(),
                format!("V0000{}", body("$R2")),
                "U$A2".into(),
                format!("V0000{}", body("$R1")),
                format!("V0000{}", body("$R0")),
            ],
        ),
        // /r0/tokenrefresh: single use, the old generation dies at once.
        (
            "single_use",
            b'0',
            vec![
                "L0".into(),
                format!("T0000{}", body("$R0")),
                format!("T0000{}", body("$R1")),
                "U$A1".into(),
                "U$A0".into(),
                format!("V0000{}", body("$R0")),
                format!("T0000{}", body("$R0")),
            ],
        ),
        // What is not a valid refresh token, and one that is, re-encoded.
        (
            "wrong_tokens",
            b'0',
            vec![
                "L0".into(),
                "K0".into(),
                format!("V0000{}", body("$A0")),
                format!("T0000{}", body("$A0")),
                format!("V0000{}", body("$G0")),
                format!("V0000{}", body("$F0")),
                format!("V0000{}", body("$K0")),
                format!("V0000{}", body("$X0")),
                format!("V0000{}", body("$E0")),
                format!("V0000{}", body("$M0")),
                format!("V0000{}", body("$Q")),
                format!("V0000{}", body("$W0")),
                format!("T0000{}", body("$W1")),
            ],
        ),
        (
            "attenuated",
            b'0',
            vec![
                "L0".into(),
                format!("V0000{}", body("$T0")),
                format!("V0000{}", body("$Y1")),
                "U$M0".into(),
                format!("T0000{}", body("$Y0")),
            ],
        ),
        (
            "bodies",
            b'0',
            vec![
                "L0".into(),
                "V0000".into(),
                "V0000{}".into(),
                "V0000[]".into(),
                "V0000{\"refresh_token\":null}".into(),
                "V0000{\"refresh_token\":1}".into(),
                "V0000{\"refresh_token\":[\"$R0\"]}".into(),
                "V0000\"$R0\"".into(),
                "V0000{\"refresh_token\":\"$R0\"".into(),
                "V0000{\"refresh_token\":\"\\u0041\\ud800\"}".into(),
                "V0000{\"refresh_token\":\"x\",\"refresh_token\":\"$R0\"}".into(),
                "T0000{\"refresh_token\":\"$R0\",\"refresh_token\":\"x\"}".into(),
                "V0000{\"refresh_token\":\"$R0\",\"device_id\":\"OTHER\",\"x\":[1,2,{}]}".into(),
                format!("V0000{}$H$H", body("$R0")),
                "V0000$H$H".into(),
                format!("V0000 $H{}$H", body("$R0")),
            ],
        ),
        (
            "methods_and_types",
            b'0',
            vec![
                "L0".into(),
                format!("V5000{}", body("$R0")),
                format!("T6000{}", body("$R0")),
                format!("V7000{}", body("$R0")),
                format!("V0100{}", body("$R0")),
                format!("T0600{}", body("$R1")),
                format!("V0030{}", body("$R0")),
                format!("T0040{}", body("$R0")),
                format!("V0050{}", body("$R0")),
                format!("V0060{}", body("$R0")),
                format!("V0070{}", body("$R0")),
            ],
        ),
        (
            "rate_limited",
            b'0',
            vec![
                "L0".into(),
                format!("V0004{}", body("$R0")),
                format!("T0005{}", body("$R0")),
                format!("V0006{}", body("$R0")),
                format!("T0007{}", body("$R0")),
                "V5007".into(),
                format!("T0000{}", body("$R0")),
            ],
        ),
        // Refresh tokens that live an hour, access tokens 1 ms.
        (
            "expiry",
            b'D',
            vec![
                "L0".into(),
                "U$A0".into(),
                "+1".into(),
                "U$A0".into(),
                format!("V0000{}", body("$R0")),
                "U$A0".into(),
                "+1".into(),
                "O$A1".into(),
                "U$A1".into(),
                format!("V0000{}", body("$R1")),
                format!("V0000{}", body("$R0")),
                "+3600000".into(),
                format!("T0000{}", body("$R0")),
            ],
        ),
        (
            "logout",
            b'0',
            vec![
                "L0".into(),
                "L8".into(),
                "L0".into(),
                "O$A0".into(),
                format!("V0000{}", body("$R0")),
                format!("V0000{}", body("$R2")),
                "U$A2".into(),
                "Z$A1".into(),
                format!("T0000{}", body("$R1")),
                "U$A1".into(),
                "O$A1".into(),
            ],
        ),
        // Log out everywhere, in the millisecond of the login and after it.
        (
            "logout_all",
            b'0',
            vec![
                "L0".into(),
                "L0".into(),
                "Z$A0".into(),
                "U$A0".into(),
                "U$A1".into(),
                "L0".into(),
                "U$A0".into(),
                "+1".into(),
                "L4".into(),
                "Z$A0".into(),
                "U$A1".into(),
                format!("V0000{}", body("$R1")),
            ],
        ),
        (
            "login_tokens",
            b'0',
            vec![
                "K0".into(),
                "g$G0".into(),
                "g$G0".into(),
                "K1".into(),
                "L0".into(),
                "g$A0".into(),
                "g$R0".into(),
                "U$G0".into(),
                format!("V0000{}", body("$G0")),
                "+120000".into(),
                "g$G0".into(),
                "K0".into(),
                "Z$A0".into(),
                "g$G0".into(),
                "gsyt_not_a_macaroon".into(),
            ],
        ),
        (
            "nonces",
            b'0',
            vec![
                "L0".into(),
                "N$n0".into(),
                "N$n1".into(),
                format!("N00000000000000000000000000000abc.7.{NOW_MS}.r.{before}.0.-"),
                format!("N00000000000000000000000000000abc.7.{NOW_MS}.r.{before}.9.{NOW_MS}"),
                "N00000000000000000000000000000ABC.07.0.a.00.0.-".into(),
                "N00000000000000000000000000000abc.4294967296.0.l.0.0.-".into(),
                "N00000000000000000000000000000abc.1.18446744073709551616.l.0.0.5".into(),
                "N00000000000000000000000000000abc.1.2.a.3.18446744073709551615.18446744073709551615"
                    .into(),
                "N00000000000000000000000000000abc.1.2.a.3.4.".into(),
                "N00000000000000000000000000000abc.1.2.a.3.4.-.".into(),
                "N00000000000000000000000000000abc.1.2.a.3.4.+5".into(),
                "N00000000000000000000000000000abc.1.2.x.3.4.-".into(),
                format!("N00000000000000000000000000000abc.7.{NOW_MS}.r"),
                "N0000000000000000000000000000000.0.0.a.0.0.-".into(),
                "N00000000000000000000000000000000.0.0.a.0.0.-".into(),
                "Nq0mP8wYb5J2sRxL1".into(),
            ],
        ),
        (
            "guest_no_device",
            b'0',
            vec![
                "L6".into(),
                format!("V0000{}", body("$R0")),
                "U$A0".into(),
                "L1".into(),
                format!("V0000{}", body("$R0")),
                "O$A0".into(),
            ],
        ),
        (
            "v2",
            1,
            vec![
                "L0".into(),
                format!("V0000{}", body("$R0")),
                "U$A0".into(),
                format!("T0000{}", body("$W0")),
            ],
        ),
        (
            "v2json",
            2,
            vec![
                "L0".into(),
                format!("V0000{}", body("$R0")),
                "U$A0".into(),
                format!("T0000{}", body("$F0")),
                format!("T0000{}", body("$R0")),
                "K0".into(),
                "g$G0".into(),
            ],
        ),
        (
            "lifetimes",
            0x8c,
            vec![
                "L1".into(),
                "U$A0".into(),
                "+86400000".into(),
                "U$A0".into(),
                "L0".into(),
                format!("V0000{}", body("$R0")),
            ],
        ),
        (
            "foreign",
            b'0',
            vec![
                format!("V0000{}", body(&ours)),
                "U$A0".into(),
                format!("V0000{}", body(&ours)),
                format!("T0000{}", body(&old)),
                format!("V0000{}", body(&appended)),
                format!("T0000{}", body(&synapse)),
                format!("T0000{}", body(&synapse)),
                "U$A0".into(),
                format!("V0000{}", body("$R0")),
            ],
        ),
        // Nonces a holder appended (to a token minted without one, or after the session's):
        // never the session's.
        (
            "grafted",
            b'0',
            vec![
                "L0".into(),
                format!("V0000{}", body("$J0")),
                "U$I1".into(),
                "O$A0".into(),
                "U$I1".into(),
                "U$A0".into(),
                format!("F0nonce = $n1|{}", alice("access")),
                "U$S0".into(),
                format!("F0{}|nonce = $n1", alice("access")),
                "U$S0".into(),
                "L0".into(),
                format!("V0000{}", body("$Y0")),
                "Z$I1".into(),
                "U$S0".into(),
                "U$A0".into(),
                "L0".into(),
                "U$A0".into(),
            ],
        ),
        // Log out everywhere by epoch: sessions that began before it are revoked in every
        // generation, later ones are spared, even within one millisecond; tokens without a
        // session nonce are revoked, minted before or after it.
        (
            "epochs",
            b'0',
            vec![
                "L0".into(),
                "L8".into(),
                "Z$A1".into(),
                "U$A0".into(),
                "L0".into(),
                "U$A0".into(),
                format!("V0000{}", body("$R0")),
                "U$A0".into(),
                "Z$A0".into(),
                "U$A0".into(),
                format!("V0000{}", body("$R0")),
                "L0".into(),
                "U$A0".into(),
                "+5".into(),
                format!("F0{}|nonce = q0mP8wYb5J2sRxL1", alice("access")),
                "U$S0".into(),
                format!("F0{}|{}", nonce(1, 0, 'a', NOW_MS + 1), alice("access")),
                "U$S0".into(),
                format!("F0{}|{}", nonce(2, 0, 'a', NOW_MS), alice("access")),
                "U$S0".into(),
            ],
        ),
        // A refresh in flight when the user logs out everywhere: its successor is revoked too.
        (
            "in_flight",
            b'0',
            vec![
                "L0".into(),
                "L0".into(),
                format!("V0000{}", body("$R1")),
                "Z$A0".into(),
                "U$A0".into(),
                format!("T0000{}", body("$R0")),
                "+1".into(),
                "L0".into(),
                format!("T0000{}", body("$R0")),
                "U$A0".into(),
            ],
        ),
        // Session nonces whose kind is not the token's type; generations no refresh minted.
        (
            "kinds",
            b'0',
            vec![
                format!("F0{}|{}", nonce(1, 0, 'a', 0), alice("refresh")),
                format!("V0000{}", body("$S0")),
                format!("F1{}|{}", nonce(2, 0, 'r', 0), alice("access")),
                "U$S0".into(),
                format!("F2{}|{}|time < {expiring}", nonce(3, 0, 'l', 0), alice("login")),
                "g$S0".into(),
                "g$S0".into(),
                format!("F0{}|{}|time < {expiring}", nonce(4, 0, 'a', 0), alice("login")),
                "g$S0".into(),
                format!("F0{}|{}", nonce(5, 3, 'r', 0), alice("refresh")),
                format!("V0000{}", body("$S0")),
                format!("F0{}|{}", nonce(5, 1, 'r', 0), alice("refresh")),
                format!("V0000{}", body("$S0")),
                format!("F0{}|{}", nonce(5, 0, 'r', 0), alice("refresh")),
                format!("V0000{}", body("$S0")),
                format!("V0000{}", body("$S1")),
                "U$A0".into(),
                format!("V0000{}", body("$S2")),
            ],
        ),
        // Login tokens minted elsewhere: known by the chain through their first `time <`.
        (
            "login_foreign",
            b'0',
            vec![
                format!("F0{}|nonce = q0mP8wYb5J2sRxL1|time < {expiring}", alice("login")),
                "g$S0".into(),
                "g$S0".into(),
                format!(
                    "F0{}|nonce = q0mP8wYb5J2sRxL1|time < {expiring}|nonce = x",
                    alice("login")
                ),
                "g$S0".into(),
                format!(
                    "F0{}|nonce = q0mP8wYb5J2sRxL1|time < {expiring}|time < {}",
                    alice("login"),
                    expiring - 1
                ),
                "g$S0".into(),
                format!("F0{}|nonce = q0mP8wYb5J2sRxL1", alice("login")),
                "g$S0".into(),
                format!("F0{}|time < {expiring}", alice("login")),
                "g$S0".into(),
                format!("F0{}|time < {expiring}|{}", alice("login"), nonce(1, 0, 'l', 0)),
                "g$S0".into(),
                "L0".into(),
                "Z$A0".into(),
                format!("F0{}|time < {expiring}|nonce = y", alice("login")),
                "g$S0".into(),
            ],
        ),
        // A session's state belongs to the user whose token made it.
        (
            "owners",
            b'0',
            vec![
                "L0".into(),
                format!("V0000{}", body("$R0")),
                "F0nonce = $n0|gen = 1|user_id = @bob:example.org|type = refresh".into(),
                format!("V0000{}", body("$S0")),
                "F0nonce = $n1|gen = 1|user_id = @bob:example.org|type = access".into(),
                "U$S0".into(),
                "L8".into(),
                format!("F0nonce = $n0|{}", alice("refresh")),
                format!("T0000{}", body("$S0")),
                format!("F0nonce = $n1|{}", alice("access")),
                "O$S0".into(),
                "U$A0".into(),
                format!("T0000{}", body("$R0")),
            ],
        ),
        // What the store records is kept until the session's tokens have expired, and no
        // longer (refresh tokens live an hour, access tokens without a refresh token a day).
        (
            "sweep",
            b'<',
            vec![
                "L0".into(),
                "L1".into(),
                "O$A0".into(),
                "O$A1".into(),
                "S".into(),
                "U$A1".into(),
                "+3599999".into(),
                "S".into(),
                "U$A1".into(),
                "+1".into(),
                "S".into(),
                "U$A1".into(),
                format!("V0000{}", body("$R0")),
                "O$A1".into(),
                "U$A0".into(),
                "+86400000".into(),
                "S".into(),
                "U$A0".into(),
            ],
        ),
        // Tokens minted elsewhere: a logout and a used login token made through a copy that
        // expires sooner are kept (at least) until the copy has expired.
        (
            "sweep_foreign",
            b'0',
            vec![
                format!("F0{}|nonce = q0mP8wYb5J2sRxL1", alice("access")),
                format!(
                    "F0{}|nonce = q0mP8wYb5J2sRxL1|time < {}",
                    alice("access"),
                    NOW_MS + 10
                ),
                "O$S0".into(),
                format!("F0{}|time < {expiring}", alice("login")),
                format!("F0{}|time < {expiring}|time < {}", alice("login"), NOW_MS + 10),
                "g$S0".into(),
                "+9".into(),
                "S".into(),
                "U$S3".into(),
                "g$S1".into(),
                "+1".into(),
                "U$S3".into(),
                "g$S1".into(),
                "U$S2".into(),
            ],
        ),
        // A refresh pushes the session's expiry: a logout with an older token keeps the state
        // for the successor's tokens too.
        (
            "sweep_refresh",
            b'<',
            vec![
                "L0".into(),
                "+1800000".into(),
                format!("V0000{}", body("$R0")),
                "O$A1".into(),
                "+1800001".into(),
                "S".into(),
                "U$A0".into(),
                format!("T0000{}", body("$R0")),
                format!("V0000{}", body("$R1")),
                "K0".into(),
                "g$G0".into(),
                "+120000".into(),
                "S".into(),
                "g$G0".into(),
                "+1800000".into(),
                "S".into(),
                "U$A0".into(),
            ],
        ),
    ];
    for (name, config, lines) in &lifecycle {
        let mut bytes = vec![*config];
        bytes.extend_from_slice(lines.join("\n").as_bytes());
        add("lifecycle", (*name).into(), bytes);
    }

    let only: Vec<String> = std::env::args().skip(1).collect();
    for (target, files) in &seeds {
        if !only.is_empty() && !only.iter().any(|t| t == target) {
            continue;
        }
        let dir = root.join("seeds").join(target);
        std::fs::create_dir_all(&dir)?;
        // Everything written here is written again; the inputs runs found (`regression-*`) stay.
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if !entry
                .file_name()
                .to_string_lossy()
                .starts_with("regression-")
            {
                std::fs::remove_file(entry.path())?;
            }
        }
        for (name, bytes) in files {
            std::fs::write(dir.join(name), bytes)?;
        }
        println!("{target}: {} seeds", files.len());
    }
    Ok(())
}
