#!/usr/bin/env python3
"""A real Matrix client library (matrix-nio) against the example homeserver.

Starts the built example (`target/debug/examples/homeserver`, or $HOMESERVER_BIN) on a free
loopback port, then: password login through nio, whoami, a wrong password, a refresh (raw HTTP:
nio has no refresh-token support) whose new token nio then uses, `m.login.token` through nio,
sync, createRoom, join, send, state and displayname through nio, logout and logout/all through
nio. With $MATRIX_DATABASE_URL set the server keeps its revocation state in PostgreSQL. Prints `N passed, M failed` and exits non-zero on any failure.
"""
import asyncio
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import nio
import pymacaroons

SERVER = "localhost"
USERS = "alice:correct horse,bob:battery staple"
results = {"passed": 0, "failed": 0}


def check(name, condition, detail=""):
    if condition:
        results["passed"] += 1
        print(f"ok   {name}")
    else:
        results["failed"] += 1
        print(f"FAIL {name} {detail}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw(base, method, path, body=None, token=None):
    """A plain HTTP call: (status, JSON body)."""
    request = urllib.request.Request(base + path, method=method,
                                     data=None if body is None else json.dumps(body).encode())
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


SECRET = "nio end-to-end secret"


def synapse_accepts(token, user_id, token_type):
    """pymacaroons with Synapse's rules (plus our device_id caveat) - not our own verifier."""
    macaroon = pymacaroons.Macaroon.deserialize(token)
    verifier = pymacaroons.Verifier()
    verifier.satisfy_exact("gen = 1")
    verifier.satisfy_exact("type = " + token_type)
    verifier.satisfy_exact("user_id = " + user_id)
    verifier.satisfy_general(lambda c: c.startswith("nonce = "))
    verifier.satisfy_general(lambda c: c.startswith("time < ") and int(c[7:]) > 0)
    verifier.satisfy_general(lambda c: c.startswith("device_id = "))
    verifier.satisfy_exact("guest = true")
    try:
        return verifier.verify(macaroon, SECRET)
    except Exception as error:  # pymacaroons raises on any unmet caveat
        print("pymacaroons:", error)
        return False


def start_server(port):
    binary = os.environ.get("HOMESERVER_BIN", "target/debug/examples/homeserver")
    env = dict(os.environ, MATRIX_LISTEN=f"127.0.0.1:{port}", MATRIX_SERVER_NAME=SERVER,
               MATRIX_MACAROON_SECRET=SECRET, MATRIX_USERS=USERS,
               MATRIX_TOKEN_LIFETIME_MS="600000", RUST_LOG="warn",
               MATRIX_APPSERVICE_TOKEN="as-secret-token", MATRIX_APPSERVICE_SENDER="@bridge:localhost",
               MATRIX_APPSERVICE_NAMESPACE="@bridged_.*:localhost",
               MATRIX_OPAQUE_TOKENS="syt_opaque_demo_token:@legacy:localhost")
    server = subprocess.Popen([binary], env=env, stdout=subprocess.PIPE, text=True)
    for line in server.stdout:  # the server prints this once it is bound
        if line.startswith("listening on"):
            return server
    raise RuntimeError("the homeserver exited before listening")


async def scenario(base):
    client = nio.AsyncClient(base, "alice")
    response = await client.login("correct horse", device_name="nio test")
    check("password login through nio", isinstance(response, nio.LoginResponse), response)
    check("login answers a device id", bool(getattr(response, "device_id", None)))
    who = await client.whoami()
    check("whoami through nio", isinstance(who, nio.WhoamiResponse) and who.user_id == "@alice:localhost", who)
    check("whoami says the device", getattr(who, "device_id", None) == response.device_id, who)

    wrong = nio.AsyncClient(base, "@alice:localhost")
    denied = await wrong.login("wrong password")
    check("wrong password is 403 M_FORBIDDEN", isinstance(denied, nio.LoginError) and denied.status_code == "M_FORBIDDEN", denied)
    await wrong.close()

    status, flows = raw(base, "GET", "/_matrix/client/v3/login")
    check("GET /login lists password and token flows",
          status == 200 and {f["type"] for f in flows["flows"]} == {"m.login.password", "m.login.token"}, flows)

    # Refresh: log in asking for a refresh token, exchange it, let nio use the new access token.
    status, login = raw(base, "POST", "/_matrix/client/v3/login", {
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": "bob"},
        "password": "battery staple", "refresh_token": True})
    check("login with refresh_token: true", status == 200 and "refresh_token" in login and login.get("expires_in_ms") == 600000, login)
    check("pymacaroons (Synapse's rules) accepts our access token",
          synapse_accepts(login["access_token"], "@bob:localhost", "access"))
    check("pymacaroons accepts our refresh token as a refresh token",
          synapse_accepts(login["refresh_token"], "@bob:localhost", "refresh"))
    check("pymacaroons refuses our access token as another user's",
          not synapse_accepts(login["access_token"], "@alice:localhost", "access"))
    status, refreshed = raw(base, "POST", "/_matrix/client/v3/refresh", {"refresh_token": login["refresh_token"]})
    check("POST /v3/refresh", status == 200 and refreshed.get("access_token"), refreshed)
    bob = nio.AsyncClient(base, "@bob:localhost")
    bob.access_token, bob.user_id = login["access_token"], "@bob:localhost"
    check("old token works until the new one is used", isinstance(await bob.whoami(), nio.WhoamiResponse))
    bob.access_token = refreshed["access_token"]
    who = await bob.whoami()
    check("nio uses the refreshed token", isinstance(who, nio.WhoamiResponse) and who.user_id == "@bob:localhost", who)
    bob.access_token = login["access_token"]
    stale = await bob.whoami()
    check("old token dead after the new one was used", isinstance(stale, nio.WhoamiError) and stale.status_code == "M_UNKNOWN_TOKEN", stale)
    status, again = raw(base, "POST", "/_matrix/client/v3/refresh", {"refresh_token": login["refresh_token"]})
    check("reused refresh token is 401 M_UNKNOWN_TOKEN", status == 401 and again["errcode"] == "M_UNKNOWN_TOKEN", again)
    status, single = raw(base, "POST", "/_matrix/client/r0/tokenrefresh", {"refresh_token": refreshed["refresh_token"]})
    check("POST /r0/tokenrefresh", status == 200 and single.get("access_token"), single)
    status, twice = raw(base, "POST", "/_matrix/client/r0/tokenrefresh", {"refresh_token": refreshed["refresh_token"]})
    check("tokenrefresh is single-use (403 M_FORBIDDEN)", status == 403 and twice["errcode"] == "M_FORBIDDEN", twice)
    await bob.close()

    # m.login.token through nio, with a token from MSC3882's get_token.
    status, issued = raw(base, "POST", "/_matrix/client/v1/login/get_token", {}, client.access_token)
    check("get_token", status == 200 and issued.get("login_token"), issued)
    second = nio.AsyncClient(base, "@alice:localhost")
    by_token = await second.login(token=issued["login_token"])
    check("m.login.token through nio", isinstance(by_token, nio.LoginResponse) and by_token.user_id == "@alice:localhost", by_token)
    third = nio.AsyncClient(base, "@alice:localhost")
    reused = await third.login(token=issued["login_token"])
    check("a login token is single-use", isinstance(reused, nio.LoginError) and reused.status_code == "M_FORBIDDEN", reused)
    await third.close()

    # The room and profile routes (answered from memory) in the shapes nio parses.
    synced = await client.sync(timeout=0)
    check("sync through nio", isinstance(synced, nio.SyncResponse) and synced.next_batch, synced)
    created = await client.room_create()
    check("createRoom through nio", isinstance(created, nio.RoomCreateResponse)
          and created.room_id.startswith("!"), created)
    joined = await client.join("#lobby:localhost")
    check("join by alias through nio", isinstance(joined, nio.JoinResponse) and joined.room_id.startswith("!"), joined)
    sent = await client.room_send(created.room_id, "m.room.message", {"msgtype": "m.text", "body": "hi"})
    check("send through nio", isinstance(sent, nio.RoomSendResponse) and sent.event_id.startswith("$"), sent)
    state = await client.room_put_state(created.room_id, "m.room.topic", {"topic": "a topic"})
    check("state through nio", isinstance(state, nio.RoomPutStateResponse) and state.event_id.startswith("$"), state)
    named = await client.set_displayname("Alice")
    check("displayname through nio", isinstance(named, nio.ProfileSetDisplayNameResponse), named)

    out = await client.logout()
    check("logout through nio", isinstance(out, nio.LogoutResponse), out)
    status, gone = raw(base, "GET", "/_matrix/client/v3/account/whoami", token=response.access_token)
    check("logged-out token is 401 M_UNKNOWN_TOKEN", status == 401 and gone["errcode"] == "M_UNKNOWN_TOKEN", gone)
    await client.close()

    # The example's application service and opaque token (the environment variables of examples/homeserver.rs).
    whoami = "/_matrix/client/v3/account/whoami"
    status, who = raw(base, "GET", whoami, token="as-secret-token")
    check("as_token acts as the sender", status == 200 and who["user_id"] == "@bridge:localhost", who)
    status, who = raw(base, "GET", whoami + "?user_id=@bridged_carol:localhost", token="as-secret-token")
    check("as_token acts as a namespace user", status == 200 and who["user_id"] == "@bridged_carol:localhost", who)
    status, who = raw(base, "GET", whoami + "?user_id=@alice:localhost", token="as-secret-token")
    check("outside the namespace is 403 M_FORBIDDEN", status == 403 and who["errcode"] == "M_FORBIDDEN", who)
    status, who = raw(base, "GET", whoami + "?user_id=@alice:localhost", token=by_token.access_token)
    check("an ordinary user's ?user_id= is ignored", status == 200 and who["user_id"] == "@alice:localhost", who)
    status, who = raw(base, "GET", whoami + "?user_id=@bridged_carol:localhost&device_id=NOPE", token="as-secret-token")
    check("unknown ?device_id= is 400 M_UNKNOWN_DEVICE", status == 400 and who["errcode"] == "M_UNKNOWN_DEVICE", who)
    status, who = raw(base, "GET", whoami, token="syt_opaque_demo_token")
    check("an opaque token resolves", status == 200 and who["user_id"] == "@legacy:localhost", who)
    status, who = raw(base, "GET", whoami, token="syt_opaque_wrong_token")
    check("an unknown opaque token is 401 M_UNKNOWN_TOKEN", status == 401 and who["errcode"] == "M_UNKNOWN_TOKEN", who)

    everywhere = await second.logout(all_devices=True)
    check("logout/all through nio", isinstance(everywhere, nio.LogoutResponse), everywhere)
    status, gone = raw(base, "GET", "/_matrix/client/v3/account/whoami", token=by_token.access_token)
    check("logout/all revokes the user's tokens", status == 401, gone)
    await second.close()


def main():
    port = free_port()
    server = start_server(port)
    try:
        asyncio.run(scenario(f"http://127.0.0.1:{port}"))
    finally:
        server.terminate()
        server.wait(timeout=10)
    store = "PostgreSQL" if os.environ.get("MATRIX_DATABASE_URL") else "memory"
    print(f"matrix-nio against the example homeserver, {store} store")
    print(f"matrix-nio: {results['passed']} passed, {results['failed']} failed")
    sys.exit(1 if results["failed"] else 0)


if __name__ == "__main__":
    main()
