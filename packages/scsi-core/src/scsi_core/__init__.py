"""SCSI types: opcodes, CDB fields, status, sense, LUN encoding and the transport-independent Target interface."""
