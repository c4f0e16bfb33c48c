"""Fuzzing the SCIM endpoints: request strategies (strategies.py) and the checking client
(harness.py). `tests/test_fuzz.py` runs a short, derandomized pass in `make test`;
`make fuzz` runs the same test with SCIMLEDGER_FUZZ_EXAMPLES raised."""
