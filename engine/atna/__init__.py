"""Export of the audit trail in the IHE ATNA style (ITI TF-2 3.20, Record Audit Event): each
audit row becomes a DICOM PS3.15 A.5 audit message (``message``) sent as an RFC 5424 syslog
message over UDP (RFC 5426), TCP (RFC 6587 octet counting) or TLS (RFC 5425) by ``sender``,
in a thread of its own: the audited action never waits for it and never fails because of it.
"""
