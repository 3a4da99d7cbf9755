"""An emulated SCSI target: SPC/SBC block devices over storage back-ends, dispatched by LUN."""
