# The two Quickstart commands. Each performs whatever set-up is missing (virtualenv from pinned wheels, tiny model
# export), then does its job; a second run skips the set-up.
.PHONY: demo test test-corpus setup setup-gpu lint

demo:
	scripts/demo.sh

test:
	scripts/test.sh

# The tests that read real documents made by others: PIXTRACT_CORPUS or ../shared/corpus (fails when absent).
test-corpus:
	scripts/test-corpus.sh

setup:
	scripts/setup.sh

setup-gpu:
	scripts/setup.sh --gpu

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
