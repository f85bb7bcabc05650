# The two commands of the README: `make test` and `make demo`.
# Both set up what they need (idempotent, quick the second time).
BUILD_DIR ?= build
JOBS ?= 2
CMAKE_ARGS ?=

.PHONY: setup configure build test demo format clean

setup:
	@bash tools/setup.sh

configure: setup
	@if [ ! -f $(BUILD_DIR)/build.ninja ]; then \
	  cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=Release $(CMAKE_ARGS); fi

build: configure
	cmake --build $(BUILD_DIR) -j $(JOBS)

test: build
	cd $(BUILD_DIR) && ctest --output-on-failure -j $(JOBS)

demo:
	@echo "make demo: the real fine-tune on the bundled default arrives with the trainer (issue 5)." >&2
	@exit 2

format:
	@find include csrc tests benchmarks tools -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' | xargs clang-format -i

clean:
	rm -rf $(BUILD_DIR)
