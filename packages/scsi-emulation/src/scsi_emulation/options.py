"""Per-logical-unit configuration of an emulated block device.

Holds `BlockDeviceOptions`: read-only, solid-state, block sizes, identification strings, write
cache, thin provisioning, removable medium and the limits advertised in the Block Limits VPD
page (including WRITE ATOMIC's). Knows nothing about commands or storage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scsi_emulation.identity import DeviceIdentity

__all__ = ["BlockDeviceOptions"]


@dataclass(frozen=True, slots=True)
class BlockDeviceOptions:
    """How a `BlockDevice` presents itself. Defaults suit a Linux guest's root disk."""

    read_only: bool = False
    #: Medium rotation rate 1 (non-rotating) in VPD B1h; Linux then marks the disk non-rotational.
    solid_state: bool = True
    #: Logical block size: 512 or 4096.
    block_size: int = 512
    #: Physical block size for READ CAPACITY(16) LBPPBE; None = the back-end's allocation unit.
    physical_block_size: int | None = None
    identity: DeviceIdentity = field(default_factory=DeviceIdentity)
    #: Initial WCE (caching mode page). Off: every write is durable before GOOD.
    write_cache: bool = True
    #: LBPME: UNMAP, WRITE SAME with UNMAP, GET LBA STATUS report deallocated ranges.
    thin_provisioning: bool = True
    #: RMB: START STOP UNIT can eject/load, PREVENT ALLOW MEDIUM REMOVAL applies.
    removable: bool = False
    #: Sense format when the control mode page's D_SENSE is set at power on.
    descriptor_sense: bool = False
    #: Block Limits VPD (B0h) values, in logical blocks.
    max_transfer_blocks: int = 65536
    optimal_transfer_blocks: int = 0
    #: At most 1 Mi blocks: libiscsi's Inquiry.BlockLimits calls larger values insane.
    max_unmap_lba_count: int = 0x100000
    max_unmap_descriptors: int = 256
    max_write_same_blocks: int = 0x400000
    max_compare_and_write_blocks: int = 255
    #: WRITE ATOMIC(16) limit; 0 leaves the command out. Capped at MAXIMUM TRANSFER LENGTH and
    #: at the 16-bit TRANSFER LENGTH field (see `atomic_transfer_limit`).
    max_atomic_transfer_blocks: int = 0xFFFF

    def __post_init__(self) -> None:
        if self.block_size not in (512, 4096):
            raise ValueError(f"logical block size must be 512 or 4096, not {self.block_size}")
        pbs = self.physical_block_size
        if pbs is not None and (pbs < self.block_size or pbs & (pbs - 1)):
            raise ValueError(f"physical block size {pbs} is not a power-of-two multiple")

    @property
    def atomic_transfer_limit(self) -> int:
        """MAXIMUM ATOMIC TRANSFER LENGTH as advertised (SBC-4 6.6.4) and enforced."""
        return min(self.max_atomic_transfer_blocks, self.max_transfer_blocks, 0xFFFF)
