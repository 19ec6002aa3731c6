#!/usr/bin/env python3
"""Sends exactly N authenticated GET requests over 16 keep-alive connections and checks that
every answer is 200: the request driver of benches/instructions.sh, where the server runs under
callgrind (a few thousand requests a second), so a simple client is fast enough.

    exact_requests.py URL TOKEN N
"""
import asyncio
import sys
from urllib.parse import urlsplit

CONNECTIONS = 16


async def main(url, token, total):
    parts = urlsplit(url)
    request = (
        f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
    ).encode()
    left = total
    failures = []

    async def connection():
        nonlocal left
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        while left > 0:
            left -= 1
            writer.write(request)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200 "):
                failures.append(head.split(b"\r\n", 1)[0].decode(errors="replace"))
        writer.close()
        await writer.wait_closed()

    await asyncio.gather(*(connection() for _ in range(CONNECTIONS)))
    if failures:
        sys.exit(f"{len(failures)} of {total} requests failed, first: {failures[0]}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
