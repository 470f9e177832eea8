"""CDA R2 header reading and official validation (XSD, CI-SIS schematrons)."""
