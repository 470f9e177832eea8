"""mini-PFI: HL7 v2 / IHE integration engine for French medical imaging."""

__version__ = "0.1.0"
