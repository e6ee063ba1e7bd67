# meshbox — build, test, bench, lint.
CARGO ?= cargo

.PHONY: build run test lint bench fmt

build:
	$(CARGO) build --release

# The daemon on 127.0.0.1:7901 (process backend where no Docker engine answers).
run:
	$(CARGO) run --release -- serve

# The whole test suite: formatting, lints, unit and integration tests.
test: lint
	$(CARGO) test --all-targets --no-fail-fast

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt

# Speed figures as ratios against baselines measured in the same run.
bench:
	$(CARGO) bench --bench calls
	$(CARGO) bench --bench sources
