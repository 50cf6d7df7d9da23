# Two commands do all set-up on a fresh machine: `make run` and `make test`.
.PHONY: setup run test test-unit bench clean

setup:
	@scripts/setup.sh

run: setup
	@scripts/run.sh

test: setup
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)

test-unit: setup
	.venv/bin/python -m pytest -q tests/unit

bench: setup
	.venv/bin/python -m loadtest.overhead

clean:
	rm -rf .venv .pytest_cache
