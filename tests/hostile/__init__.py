"""Hostile input (issue 14, item 6): property-based tests (hypothesis) that send generated and mutated
JSON to every REST route and generated field values and raw bytes to every gRPC method, with and
without valid keys, against the session stack.

`make test` runs a bounded, derandomized set (profile `hostile-ci`); a larger random run:
`make fuzz FUZZ_EXAMPLES=200` (N random examples per route and method).
"""
