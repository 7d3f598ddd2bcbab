"""The contract's XML documents: parsing, validation (RelaxNG) and writing."""
