"""A rogue agent in a process of its own: registers, then sends status frames as fast as it can.

``python -m tests.support.flooder MANAGEMENT_URL LLAMACPP_PORT FRAMES`` prints ``registered``,
then, when the socket ends, ``closed <the balancer's close code> <frames sent>``.
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp

from paddler import protocol
from paddler.protocol import LlamaCppState, Status


async def flood(management_url: str, port: int, frames: int) -> None:
    async with aiohttp.ClientSession() as session:
        # Each frame differs (slots and models change), so none can be skipped as a repeat.
        encoded = [
            protocol.encode(
                Status(
                    state=LlamaCppState.OK,
                    slots_idle=number % 3,
                    slots_processing=1,
                    models=(f"model-{number % 2}",),
                )
            )
            for number in range(frames)
        ]
        socket = await session.ws_connect(management_url + protocol.AGENT_SOCKET_PATH)
        first = Status(state=LlamaCppState.OK, slots_idle=2)
        register = protocol.Register(name="flooder", host="127.0.0.1", port=port, status=first)
        await socket.send_str(protocol.encode(register))
        await socket.receive_str()
        print("registered", flush=True)
        listener = asyncio.create_task(socket.receive())  # the balancer's error message
        sent = 0
        try:
            for frame in encoded:
                if listener.done():
                    break
                await socket.send_str(frame)
                sent += 1
        except (aiohttp.ClientError, ConnectionError):
            pass
        code = None
        message = await listener
        while message.type not in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
            message = await socket.receive()
        if message.type is aiohttp.WSMsgType.CLOSE:
            code = message.data  # the balancer's close code, as it sent it
        print("closed", code, sent, flush=True)


if __name__ == "__main__":
    asyncio.run(flood(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
