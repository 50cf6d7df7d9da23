# Two commands do all set-up on a fresh machine: `make run` and `make test`.
.PHONY: setup run test test-unit lint bench clean

setup:
	@scripts/setup.sh

run: setup
	@scripts/run.sh

test: setup
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)

test-unit: setup
	.venv/bin/python -m pytest -q tests/unit

lint: setup
	.venv/bin/ruff check gateway adapters tests
	.venv/bin/ruff format --check gateway adapters tests
	.venv/bin/mypy gateway adapters

bench: setup
	.venv/bin/python -m loadtest

clean:
	rm -rf .venv .pytest_cache
