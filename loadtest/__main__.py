"""`python -m loadtest`: every benchmark with its defaults, one after the other (what `make bench` runs).

1. `loadtest.overhead`: what the gateway itself costs, against a mock upstream (about a minute);
2. `loadtest.records`: what recording costs: the completion log's writer into Redis, requests/s with
   recording on vs off, and feedback latency by durability, against a mock upstream (2-3 minutes);
3. `loadtest.adapters`: cold adapters, mixed-adapter throughput and adapter memory with a real vLLM on
   the CPU (about 6-8 minutes on 2 cores);
4. `loadtest.engine_dtype`: vLLM on this CPU in bf16 and in float32, base and LoRA (about 5-10 minutes).

Each writes its own results to loadtest/results/. Run one alone, or with other options, with
`python -m loadtest.overhead --help`, `python -m loadtest.records --help` or `python -m loadtest.adapters --help`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from loadtest import adapters, engine_dtype, overhead, records

INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Run the overhead, records, adapters and engine-dtype benchmarks, one after the other, with their "
        "defaults.",
        epilog="Options for one benchmark: python -m loadtest.overhead --help (or records, adapters, engine_dtype)",
    )
    parser.parse_args(sys.argv[1:] if argv is None else argv)
    codes = []
    for bench in (overhead, records, adapters, engine_dtype):
        code = bench.main([])
        codes.append(code)
        if code == INTERRUPTED:
            return code
    return next((code for code in codes if code), 0)


if __name__ == "__main__":
    sys.exit(main())
