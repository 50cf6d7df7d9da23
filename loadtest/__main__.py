"""`python -m loadtest`: every benchmark with its defaults, one after the other (what `make bench` runs).

1. `loadtest.overhead`: what the gateway itself costs, against a mock upstream (about a minute);
2. `loadtest.routing`: what routing through an experiment alias adds over a plain alias, against a mock
   upstream (about a minute);
3. `loadtest.records`: what recording costs: the completion log's writer into Redis, requests/s with
   recording on vs off, and feedback latency by durability, against a mock upstream (2-3 minutes);
4. `loadtest.adapters`: cold adapters, mixed-adapter throughput and adapter memory with a real vLLM on
   the CPU (about 6-8 minutes on 2 cores);
5. `loadtest.engine_dtype`: vLLM on this CPU in bf16 and in float32, base and LoRA (about 5-10 minutes);
6. `loadtest.retraining`: training throughput (examples/s, tokens/s) and the whole retraining loop, 500
   feedback events to a promoted canary, against its 10-minute target (about 30 minutes on 2 cores).

Each writes its own results to loadtest/results/. Run one alone, or with other options, with
`python -m loadtest.overhead --help` (or `loadtest.routing`, `loadtest.records`, `loadtest.adapters`,
`loadtest.retraining`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from loadtest import adapters, engine_dtype, overhead, records, retraining, routing

INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Run the overhead, routing, records, adapters, engine-dtype and retraining benchmarks, one after "
        "the other, with their defaults.",
        epilog="Options for one benchmark: python -m loadtest.overhead --help "
        "(or routing, records, adapters, engine_dtype, retraining)",
    )
    parser.parse_args(sys.argv[1:] if argv is None else argv)
    codes = []
    for bench in (overhead, routing, records, adapters, engine_dtype, retraining):
        code = bench.main([])
        codes.append(code)
        if code == INTERRUPTED:
            return code
    return next((code for code in codes if code), 0)


if __name__ == "__main__":
    sys.exit(main())
