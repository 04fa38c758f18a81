"""TCP forwarding from the local cluster's bridge address to the stack's loopback services.

The registry (Quarkus) and Jaeger's receiver each bind one host, 127.0.0.1, where the tests
reach them; pods reach this machine only on the bridge's address. HTTP carries no addresses
of its own, so a byte-for-byte forward is all it takes (Kafka, which advertises addresses,
gets a listener of its own instead).

    python3 forward.py [--owner=TEXT] LISTEN_HOST PORT[:TARGET_PORT]...

The target host is 127.0.0.1. --owner is not used: it marks the command line, so that the
stack script knows the process for its own.
"""

import asyncio
import sys


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


def handler(target_port: int):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError as e:
            print(f"forward: 127.0.0.1:{target_port} refused a connection: {e}", flush=True)
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    return handle


async def main(host: str, specs: list[str]) -> None:
    servers = []
    for spec in specs:
        port, _, target = spec.partition(":")
        servers.append(await asyncio.start_server(handler(int(target or port)), host, int(port)))
        print(f"forward: {host}:{port} -> 127.0.0.1:{target or port}", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--owner=")]
    if len(args) < 2:
        sys.exit(__doc__)
    asyncio.run(main(args[0], args[1:]))
