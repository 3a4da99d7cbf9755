"""vhost-user-rng: a virtio entropy device (virtio 1.2 section 5.4) in a few lines.

It proves that vhost_user is a library for any device type: one request queue, no config
space, and every device-writable buffer filled from the kernel's CSPRNG (``os.getrandom``).

    python3 examples/vhost_user_rng.py --socket-path /tmp/rng.sock
    qemu-system-x86_64 ... -chardev socket,id=rng0,path=/tmp/rng.sock \\
        -device vhost-user-rng-pci,chardev=rng0
"""

from __future__ import annotations

import argparse
import logging
import os

import trio
from vhost_user import VhostUserBackend, Vring, serve
from virtio_queue import VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC, InvalidChain

log = logging.getLogger("vhost-user-rng")


class RngBackend(VhostUserBackend):
    """virtio-rng: one queue of device-writable buffers, filled with random bytes."""

    num_queues = 1

    def features(self) -> int:
        return (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC)

    def handle_kick(self, index: int, vring: Vring) -> None:
        while True:
            try:
                chain = vring.pop()
            except InvalidChain as exc:
                vring.add_used(exc.head, 0)
                continue
            if chain is None:
                return
            written = 0
            for buffer in chain.writable:
                # getrandom may return fewer bytes than asked (it never blocks once the pool
                # is initialised); report exactly what was written.
                data = os.getrandom(len(buffer))
                buffer[: len(data)] = data
                written += len(data)
                if len(data) < len(buffer):
                    break
            vring.add_used(chain.head, written)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket-path", help="listen on this unix socket")
    where.add_argument("--fd", type=int, help="listen on this inherited socket")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    trio.run(
        lambda: serve(
            RngBackend, socket_path=args.socket_path, listen_fd=args.fd, handle_signals=True
        )
    )


if __name__ == "__main__":
    main()
