"""Load tests and benchmarks for loragate: `python -m loadtest.overhead` measures what the gateway adds."""
