"""`python -m loadtest`: every benchmark with its defaults, one after the other (what `make bench` runs).

1. `loadtest.compare`: loragate (everything on, everything off) against LiteLLM's proxy and a bare
   pass-through, with 1 and N workers, against a mock upstream (about 5 minutes; installs LiteLLM into
   .venv-litellm the first time);
2. `loadtest.overhead`: what the gateway itself costs, against a mock upstream (about a minute);
3. `loadtest.routing`: what routing through an experiment alias adds over a plain alias, against a mock
   upstream (about a minute);
4. `loadtest.scale`: routing and /v1/models by registry size (10 to 10,000 versions), saturation by gateway
   processes (1, 2, 4) with quotas and recording on, against a mock upstream (about 3 minutes);
5. `loadtest.records`: what recording costs: the completion log's writer into Redis, requests/s with
   recording on vs off, and feedback latency by durability, against a mock upstream (2-3 minutes);
6. `loadtest.adapters`: cold adapters, mixed-adapter throughput and adapter memory with a real vLLM on
   the CPU (about 6-8 minutes on 2 cores);
7. `loadtest.throughput`: real-model tokens/s through loragate vs straight to vLLM, and by adapter count (8,
   32, 128), with a real vLLM on the CPU (about 15 minutes on 2 cores);
8. `loadtest.engine_dtype`: vLLM on this CPU in bf16 and in float32, base and LoRA (about 5-10 minutes);
9. `loadtest.engine_cores`: two vLLM replicas with vLLM's auto CPU binding vs a share of cores each, as
   the engine supervisor starts them (about 5 minutes);
10. `loadtest.retraining`: training throughput (examples/s, tokens/s) and the whole retraining loop, 500
   feedback events to a promoted canary, against its 10-minute target (about 30 minutes on 2 cores).

Each writes its own results to loadtest/results/. `--only compare overhead` runs those alone (`make
bench BENCH="compare overhead"`); for other options run one alone, e.g. `python -m loadtest.compare
--help` (or `loadtest.overhead`, `loadtest.routing`, `loadtest.records`, `loadtest.adapters`,
`loadtest.scale`, `loadtest.throughput`, `loadtest.engine_dtype`, `loadtest.engine_cores`,
`loadtest.retraining`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from loadtest import (
    adapters,
    compare,
    engine_cores,
    engine_dtype,
    overhead,
    records,
    retraining,
    routing,
    scale,
    throughput,
)

INTERRUPTED = 130
BENCHMARKS = {
    "compare": compare,
    "overhead": overhead,
    "routing": routing,
    "scale": scale,
    "records": records,
    "adapters": adapters,
    "throughput": throughput,
    "engine_dtype": engine_dtype,
    "engine_cores": engine_cores,
    "retraining": retraining,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Run the compare, overhead, routing, scale, records, adapters, throughput, engine-dtype, "
        "engine-cores and retraining benchmarks, "
        "one after the other, with their defaults.",
        epilog="Options for one benchmark: python -m loadtest.compare --help "
        "(or overhead, routing, scale, records, adapters, throughput, engine_dtype, engine_cores, retraining)",
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
