"""The project's tools: the executables in this folder (setup, test, demo, fetch-payloads,
bench-stage) and the Python modules they share with the tests (``fetch_payloads``, ``newc``),
importable as ``scripts.<module>`` from the repository root."""
