"""A back-end process for the inflight test: ``--hold`` completes half of what it pops.

Each chain's writable buffer is filled with the byte (head + 1) so the test can tell which
request was completed by which run. Run as a script; not collected by pytest.
"""

from __future__ import annotations

import argparse
import logging

import trio
from vhost_user import ProtocolFeature, VhostUserBackend, Vring, serve
from virtio_queue import VIRTIO_F_VERSION_1


class HoldingBackend(VhostUserBackend):
    num_queues = 1

    def __init__(self, hold: bool) -> None:
        self.hold = hold
        self.held: list[int] = []

    def features(self) -> int:
        return 1 << VIRTIO_F_VERSION_1

    def protocol_features(self) -> int:
        return int(ProtocolFeature.CONFIG)

    def handle_kick(self, index: int, vring: Vring) -> None:
        popped = 0
        while (chain := vring.pop()) is not None:
            popped += 1
            if self.hold and popped % 2 == 0:
                self.held.append(chain.head)  # "slow I/O": never completed by this run
                continue
            writer = chain.writer()
            vring.add_used(chain.head, writer.write(bytes([chain.head + 1]) * writer.remaining()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket-path", required=True)
    parser.add_argument("--hold", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    trio.run(
        lambda: serve(
            lambda: HoldingBackend(args.hold), socket_path=args.socket_path, handle_signals=True
        )
    )


if __name__ == "__main__":
    main()
