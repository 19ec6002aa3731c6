#!/usr/bin/env python3
"""Mint macaroon test vectors with pymacaroons, the library Synapse used.

Writes tests/vectors/pymacaroons.json: Synapse-shaped access/guest/refresh/login
tokens plus attenuated, expired, rotated-key and malformed ones, each with the
outcome our access-token layer must produce at now_ms.

    python3 -m venv .venv && .venv/bin/pip install -r tests/vectors/requirements.txt
    .venv/bin/python tests/vectors/generate.py      # run from the repo root
    (--output PATH writes elsewhere; ./scripts/test.sh uses it to check the file is reproducible)

Deterministic: fixed nonces and times, and a fixed NaCl nonce for the one
third-party caveat, so rerunning reproduces the file byte for byte.

"expect" semantics: `valid` = accepted by the access layer at now_ms.
`token_type` is the single distinct `type` value if there is exactly one
(even when the token is invalid), else null. user_id/device_id/is_guest/
expires_at_ms are only filled when the token is valid, or valid as the type
named in `valid_as` (refresh/login tokens); otherwise null/false.
Before writing, every vector is checked with pymacaroons' own Verifier using
Synapse-like rules; it must accept exactly the tokens we call valid (except
no_type_v1: a caveat-by-caveat verifier cannot notice a *missing* caveat).
"""
import base64
import json
import os
import sys

import pymacaroons
from pymacaroons import Macaroon, MACAROON_V1, MACAROON_V2, Verifier
from pymacaroons.serializers import BinarySerializer, JsonSerializer

SERVER = "test.example"
NOW_MS = 1700000000000
KEYS = {"key": "test secret: this is the synapse macaroon_secret_key",
        "key2": "second secret for rotation"}
ALICE = "@alice:test.example"
NONCE = "kZ3pQx9LwT2mVbRc"  # Synapse used random_string(16)
BASE = ["gen = 1", "user_id = " + ALICE, "type = access", "nonce = " + NONCE]
# Caveats pymacaroons accepts but our layer rejects (see docstring).
STRICTER_THAN_PYMACAROONS = {"no_type_v1"}
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pymacaroons.json")


def mint(caveats, ident="key", secret=KEYS["key"], version=MACAROON_V1):
    m = Macaroon(location=SERVER, identifier=ident, key=secret, version=version)
    for c in caveats:
        m.add_first_party_caveat(c)
    return m


def holder_append(token, *caveats):
    """What a token holder can do: deserialize, append caveats, reserialize."""
    m = Macaroon.deserialize(token)
    for c in caveats:
        m.add_first_party_caveat(c)
    return m.serialize()


def b64_std_padded(token):
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    return base64.b64encode(raw).decode("ascii")


def parse(token, fmt):
    if fmt == "v2json":
        return Macaroon.deserialize(token, serializer=JsonSerializer())
    return Macaroon.deserialize(token)


def caveat_ok(pred, want_type, now=NOW_MS):
    """Synapse-style general caveat checks (time, nonce, guest, device)."""
    key, _, rest = pred.partition(" ")
    op, _, val = rest.partition(" ")
    if key == "time" and op in ("<", ">", "=="):
        try:
            t = int(val)
        except ValueError:
            return False
        return {"<": now < t, ">": now > t, "==": now == t}[op]
    if key == "nonce" and op == "=" and val:
        return True
    if key == "device_id" and op == "=" and val:
        return True
    return pred == "guest = true"


def pymacaroons_accepts(token, fmt, want_type):
    m = parse(token, fmt)
    secret = KEYS.get(m.identifier_bytes.decode("utf-8", "replace"))
    if secret is None:
        return False
    v = Verifier()
    v.satisfy_exact("gen = 1")
    v.satisfy_exact("type = " + want_type)
    v.satisfy_exact("user_id = " + ALICE)
    v.satisfy_general(lambda p: caveat_ok(p, want_type))
    try:
        return v.verify(m, secret)
    except Exception:
        return False


def expect(valid, token_type="access", soft_logout=False, user_id=None,
           device_id=None, is_guest=False, expires_at_ms=None, valid_as=None):
    e = {"valid": valid, "soft_logout": soft_logout, "token_type": token_type,
         "user_id": user_id, "device_id": device_id, "is_guest": is_guest,
         "expires_at_ms": expires_at_ms}
    if valid_as:
        e["valid_as"] = valid_as
    return e


def ok(**kw):
    return expect(True, user_id=ALICE, **kw)


def bad(token_type="access", soft_logout=False):
    return expect(False, token_type=token_type, soft_logout=soft_logout)


def build():
    v1 = mint(BASE).serialize()
    v2m = mint(BASE, version=MACAROON_V2)
    # (name, description, token, format, expect)
    yield ("synapse_access_v1", "standard Synapse access token, V1 binary, base64url unpadded",
           v1, "v1", ok())
    yield ("synapse_access_v1_padded_std", "same token re-encoded as standard base64 with padding",
           b64_std_padded(v1), "v1", ok())
    yield ("access_v2", "same caveats, V2 binary (Macaroon(version=MACAROON_V2)), base64url unpadded",
           v2m.serialize(BinarySerializer()), "v2", ok())
    yield ("access_v2json", "same caveats, V2 JSON (JsonSerializer on a V2 macaroon)",
           v2m.serialize(JsonSerializer()), "v2json", ok())
    guest = mint(BASE + ["guest = true"]).serialize()
    yield ("guest_v1", "guest access token (guest = true after nonce)", guest, "v1", ok(is_guest=True))
    yield ("attenuated_v1", "holder appended time < 1800000000000",
           holder_append(v1, "time < 1800000000000"), "v1", ok(expires_at_ms=1800000000000))
    yield ("attenuated_expired_v1", "holder appended an already-passed time < 1600000000000",
           holder_append(v1, "time < 1600000000000"), "v1", bad(soft_logout=True))
    yield ("expiring_v1", "minted with time < now+60s",
           mint(BASE + ["time < 1700000060000"]).serialize(), "v1", ok(expires_at_ms=1700000060000))
    # The plain access token is a multiple of 3 bytes (no '=' when padded); this one isn't.
    padded = b64_std_padded(mint(BASE + ["guest = true", "time < 1700000060000"]).serialize())
    assert padded.endswith("=") and "+" in padded and "/" in padded
    yield ("guest_expiring_v1_padded_std", "guest token with time < now+60s, standard base64 "
           "with '=' padding, '+' and '/'", padded, "v1", ok(is_guest=True, expires_at_ms=1700000060000))
    yield ("expired_v1", "minted with time < now-1ms",
           mint(BASE + ["time < 1699999999999"]).serialize(), "v1", bad(soft_logout=True))
    yield ("not_before_v1", "time > now is not yet satisfied (strict)",
           mint(BASE + ["time > 1700000000000"]).serialize(), "v1", bad())
    yield ("not_before_ok_v1", "time > now-1ms is satisfied",
           mint(BASE + ["time > 1699999999999"]).serialize(), "v1", ok())
    yield ("device_v1", "access token carrying device_id = ABCDEFGH",
           mint(BASE + ["device_id = ABCDEFGH"]).serialize(), "v1", ok(device_id="ABCDEFGH"))
    yield ("second_user_id_attack_v1", "holder of alice's token appended user_id = @mallory:test.example",
           holder_append(v1, "user_id = @mallory:test.example"), "v1", bad())
    yield ("same_user_id_twice_v1", "holder appended the same user_id again",
           holder_append(v1, "user_id = " + ALICE), "v1", ok())
    refresh = ["gen = 1", "user_id = " + ALICE, "type = refresh", "nonce = " + NONCE]
    yield ("refresh_v1", "refresh token: rejected by the access layer, valid as refresh",
           mint(refresh).serialize(), "v1",
           expect(False, token_type="refresh", user_id=ALICE, valid_as="refresh"))
    login = ["gen = 1", "user_id = " + ALICE, "type = login", "time < 1700000120000"]
    yield ("login_v1", "Synapse login token: rejected by the access layer, valid as login",
           mint(login).serialize(), "v1",
           expect(False, token_type="login", user_id=ALICE, expires_at_ms=1700000120000,
                  valid_as="login"))
    yield ("wrong_secret_v1", "identifier key but signed with a different secret",
           mint(BASE, secret="not the right secret").serialize(), "v1", bad())
    yield ("rotated_key2_v1", "identifier key2 signed with the second secret",
           mint(BASE, ident="key2", secret=KEYS["key2"]).serialize(), "v1", ok())
    yield ("unknown_identifier_v1", "identifier key3 is not in the key ring",
           mint(BASE, ident="key3", secret=KEYS["key"]).serialize(), "v1", bad())
    yield ("unknown_caveat_v1", "extra caveat method = GET must fail closed",
           mint(BASE + ["method = GET"]).serialize(), "v1", bad())
    tp = mint(BASE)
    tp.add_third_party_caveat("https://auth.example", "third party shared key",
                              "nonce = third-party-cid", nonce=bytes(range(24)))
    yield ("third_party_v1", "third-party caveat (cid parses as a first-party caveat) must be rejected",
           tp.serialize(), "v1", bad())
    yield ("no_type_v1", "no type caveat at all",
           mint(["gen = 1", "user_id = " + ALICE, "nonce = " + NONCE]).serialize(), "v1",
           bad(token_type=None))
    yield ("two_types_v1", "holder appended type = refresh to an access token",
           holder_append(v1, "type = refresh"), "v1", bad(token_type=None))
    yield ("gen_2_v1", "gen = 2 instead of gen = 1",
           mint(["gen = 2"] + BASE[1:]).serialize(), "v1", bad())
    yield ("bad_user_id_v1", "user_id = alice is not a Matrix user id",
           mint(["gen = 1", "user_id = alice"] + BASE[2:]).serialize(), "v1", bad())
    yield ("malformed_double_space_v1", "caveat with two spaces: user_id  = @alice:test.example",
           mint(["gen = 1", "user_id  = " + ALICE] + BASE[2:]).serialize(), "v1", bad())
    yield ("time_not_integer_v1", "time < 17e11 is not an integer",
           mint(BASE + ["time < 17e11"]).serialize(), "v1", bad())
    yield ("guest_false_v1", "guest = false is not an allowed value",
           mint(BASE + ["guest = false"]).serialize(), "v1", bad())


def main():
    out = OUT
    if len(sys.argv) == 3 and sys.argv[1] == "--output":
        out = sys.argv[2]  # the test script regenerates elsewhere and compares
    vectors = []
    for name, desc, token, fmt, exp in build():
        m = parse(token, fmt)
        want = exp.get("valid_as") or "access"
        should = exp["valid"] or "valid_as" in exp
        got = pymacaroons_accepts(token, fmt, want)
        if name in STRICTER_THAN_PYMACAROONS:
            assert got and not should, name
        else:
            assert got == should, (name, got, should)
        if "valid_as" in exp:  # and the access layer's rules reject it
            assert not pymacaroons_accepts(token, fmt, "access"), name
        ident = m.identifier_bytes.decode("utf-8")
        assert m.location == SERVER
        vectors.append({
            "name": name,
            "description": desc,
            "token": token,
            "format": fmt,
            "identifier": ident,
            "location": m.location,
            "caveats": [c.caveat_id_bytes.decode("utf-8") for c in m.caveats],
            "third_party_count": len(m.third_party_caveats()),
            "signature_hex": m.signature_bytes.decode("ascii"),
            "expect": exp,
        })
    names = [v["name"] for v in vectors]
    assert len(set(names)) == len(names)
    doc = {
        "generated_by": "pymacaroons %s (tests/vectors/generate.py)" % pymacaroons.__version__,
        "server_name": SERVER,
        "now_ms": NOW_MS,
        "keys": KEYS,
        "vectors": vectors,
    }
    with open(out, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    print("wrote %d vectors to %s" % (len(vectors), out))


if __name__ == "__main__":
    main()
