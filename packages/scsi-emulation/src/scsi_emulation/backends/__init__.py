"""Storage back-ends beyond a local file: block devices, NBD exports, Ceph RBD images.

Each lives in its own module (`blockdev`, `nbd`, `rbd`); `uri` turns what an operator writes
(``IMG``, ``file:IMG``, ``/dev/...``, ``nbd://...``, ``nbd+unix://...``, ``rbd:...``) into an
opened `scsi_emulation.backend.StorageBackend`. Nothing here imports a Ceph binding until an
``rbd:`` URI is opened.
"""
