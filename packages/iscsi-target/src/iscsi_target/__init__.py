"""An iSCSI target (RFC 7143) for the scsi-emulation logical units.

A sans-IO PDU core (codec, text negotiation, login, session and full-feature phase) and a
trio server around it.
"""
