"""Imaging/clinical report channel core: CI-SIS CDA-in-HL7 v2 parsing into a canonical submission."""
