# The two Quickstart commands. Each performs whatever set-up is missing (virtualenv from pinned wheels, tiny model
# export), then does its job; a second run skips the set-up.
.PHONY: demo test setup setup-gpu lint

demo:
	scripts/demo.sh

test:
	scripts/test.sh

setup:
	scripts/setup.sh

setup-gpu:
	scripts/setup.sh --gpu

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
