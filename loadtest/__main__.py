"""`python -m loadtest`: every benchmark with its defaults, one after the other (what `make bench` runs).

1. `loadtest.compare`: loragate (everything on, everything off) against LiteLLM's proxy and a bare
   pass-through, with 1 and N workers, against a mock upstream (about 5 minutes; installs LiteLLM into
   .venv-litellm the first time);
2. `loadtest.overhead`: what the gateway itself costs, against a mock upstream (about a minute);
3. `loadtest.routing`: what routing through an experiment alias adds over a plain alias, against a mock
   upstream (about a minute);
4. `loadtest.records`: what recording costs: the completion log's writer into Redis, requests/s with
   recording on vs off, and feedback latency by durability, against a mock upstream (2-3 minutes);
5. `loadtest.adapters`: cold adapters, mixed-adapter throughput and adapter memory with a real vLLM on
   the CPU (about 6-8 minutes on 2 cores);
6. `loadtest.engine_dtype`: vLLM on this CPU in bf16 and in float32, base and LoRA (about 5-10 minutes);
7. `loadtest.retraining`: training throughput (examples/s, tokens/s) and the whole retraining loop, 500
   feedback events to a promoted canary, against its 10-minute target (about 30 minutes on 2 cores).

Each writes its own results to loadtest/results/. `--only compare overhead` runs those alone (`make
bench BENCH="compare overhead"`); for other options run one alone, e.g. `python -m loadtest.compare
--help` (or `loadtest.overhead`, `loadtest.routing`, `loadtest.records`, `loadtest.adapters`,
`loadtest.engine_dtype`, `loadtest.retraining`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from loadtest import adapters, compare, engine_dtype, overhead, records, retraining, routing

INTERRUPTED = 130
BENCHMARKS = {
    "compare": compare,
    "overhead": overhead,
    "routing": routing,
    "records": records,
    "adapters": adapters,
    "engine_dtype": engine_dtype,
    "retraining": retraining,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Run the compare, overhead, routing, records, adapters, engine-dtype and retraining benchmarks, "
        "one after the other, with their defaults.",
        epilog="Options for one benchmark: python -m loadtest.compare --help "
        "(or overhead, routing, records, adapters, engine_dtype, retraining)",
    )
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="Run only these, in this order.")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    codes = []
    for name in args.only or list(BENCHMARKS):
        code = BENCHMARKS[name].main([])
        codes.append(code)
        if code == INTERRUPTED:
            return code
    return next((code for code in codes if code), 0)


if __name__ == "__main__":
    sys.exit(main())
