"""A vhost-user virtio-scsi device daemon serving image files to QEMU guests."""
