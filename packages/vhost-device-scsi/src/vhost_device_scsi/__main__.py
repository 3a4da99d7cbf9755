"""`python -m vhost_device_scsi`: the daemon's command line (see `cli`)."""

from vhost_device_scsi.cli import main

main()
