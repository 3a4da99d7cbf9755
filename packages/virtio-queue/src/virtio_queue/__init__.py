"""Guest memory and virtio split virtqueues (device and driver side) for any virtio device type."""
