# meshbox — build, test, bench, lint.
CARGO ?= cargo

.PHONY: build run test test-lanes test-docker lint bench fmt images images-local fuzz conformance
MESHBOX := target/release/meshbox
CA_BUNDLE ?= /etc/ssl/certs/ca-certificates.crt

build:
	$(CARGO) build --release

# The daemon on 127.0.0.1:7901 (process backend where no Docker engine answers).
run:
	$(CARGO) run --release -- serve

# The whole test suite that runs anywhere: formatting, lints, unit, route and
# process integration tests. Needs no network, Docker or root.
test: lint
	$(CARGO) test --no-fail-fast

# The lanes with prerequisites (#[ignore = "needs …"]): Docker and the runner
# images, root, the package registries, MCP client SDKs, Prometheus. Each test
# fails, never skips, when its prerequisite is missing. `.ci/run` installs
# them and runs this.
test-lanes:
	$(CARGO) test --no-fail-fast -- --ignored

# The official MCP conformance suite against the gateway, both revisions
# (needs node/npm and the npm registry; fails on a required scenario).
conformance:
	scripts/conformance.sh

test-docker:
	$(CARGO) test --test docker -- --ignored

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt

# Speed figures as ratios against baselines measured in the same run.
bench:
	$(CARGO) bench --bench calls
	$(CARGO) bench --bench sources
	$(CARGO) bench --bench docker
	$(CARGO) bench --bench sandbox
	$(CARGO) bench --bench gateway

# Runner images from the official base images (needs a registry of images).
images: build
	$(MESHBOX) images build all

# The same runner images with no image registry: local Debian bases
# (debootstrap → docker import → Debian packages) and the host CA bundle.
images-local: build
	scripts/local-base-images.sh
	$(MESHBOX) images build all \
	  --base-image-node meshbox-local/node:bookworm \
	  --base-image-python meshbox-local/python:bookworm \
	  --base-image-bun meshbox-local/node:bookworm \
	  --ca-bundle $(CA_BUNDLE)

# Fuzz the JSON-RPC line framer and the source-string parser, FUZZ_SECS each
# (cargo-fuzz from crates.io; RUSTC_BOOTSTRAP lets the stable toolchain take
# its sanitizer flags). A crash fails the target.
FUZZ_SECS ?= 60
fuzz:
	command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run source_parser -- -max_total_time=$(FUZZ_SECS)
	RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run line_framer -- -max_total_time=$(FUZZ_SECS)
