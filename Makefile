# The two commands a newcomer needs: `make serve` and `make test` (both set up .venv first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
REPO ?= model_repository
WEIGHTS ?= weights
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: venv serve export test test-docker test-swarm test-swarm-nodes lint bench bench-resnet50 bench-precision bench-decode \
	bench-ablations bench-tax \
	reliability gpu-check clean

$(BIN)/activate: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[cpu,openvino,export,bench,dev]"
	touch $(BIN)/activate

venv: $(BIN)/activate

# Export the paper set (checkpoints from $(WEIGHTS)/ where present, random weights otherwise;
# versions already present with the same weights are skipped), then serve it. Models that the
# images in $(CALIBRATION)/ suit (a few hundred like your traffic) get --precision auto.
CALIBRATION ?= calibration
export: venv
	$(BIN)/python -m export --preset paper --weights-dir $(WEIGHTS) --out $(REPO) \
		--calibration-dir $(CALIBRATION)

serve: export
	$(BIN)/python -m service --model-repository $(REPO) --host $(HOST) --port $(PORT)

# ruff, then the import-linter contracts of pyproject.toml (the floor plan of README
# "Architecture").
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest

# The real stack on a real Docker engine (installed and started if absent, stopped after): the
# images built from this Dockerfile with no registry, `docker compose up`, checks from the host.
test-docker: venv
	PYTHON=$(BIN)/python tests/container/run.sh

# Only the Swarm stack (docker-compose.swarm.yml) of test-docker: single-node swarm, balancer,
# replicas, kill, rolling update, scaling, stack rm and swarm leave.
test-swarm: venv
	PYTHON=$(BIN)/python tests/container/run.sh swarm

# Not in CI (about 2.5 min more): two more engines in network namespaces join this one's swarm;
# replicas spread over the three nodes, one node drained under load (tests/container/nodes.sh).
test-swarm-nodes: venv
	PYTHON=$(BIN)/python tests/container/run.sh nodes

# The README's figures: latency per depth (paper preset, PyTorch side by side), then ResNet-50
# fp32 and `--precision auto` (the fastest gated precision on this host) in process (JPEG
# decoding included, and inference alone) and over HTTP at concurrency 1-32, then `auto` per
# depth (fp32 beside the chosen precision, every candidate measured by the exporter).
PHOTOS ?= ../shared/data/photos
CIFAR_LABELED ?= ../shared/data/cifar10-test/cifar10_test_2000.npz
PERF := bench-results/perf-repo
bench: venv
	$(BIN)/python -m bench engine --compare-torch --weights-dir $(WEIGHTS) --out bench-results
	cp bench-results/latency_vs_depth.png docs/latency_vs_depth.png
	$(MAKE) bench-resnet50 bench-precision bench-decode bench-tax

bench-resnet50: venv
	$(BIN)/python -m export resnet50 --weights random:0 --out $(PERF) --skip-existing
	$(BIN)/python -m export resnet50 --weights random:0 --out $(PERF) --skip-existing \
		--precision auto --gate-images $(PHOTOS) --calibration-images $(PHOTOS)
	for m in resnet50 resnet50_auto; do \
		$(BIN)/python -m bench engine --repository $(PERF) --models $$m --batch-sizes 1,8,32 \
			--with-preprocessing --images $(PHOTOS) --out bench-results/$$m && \
		$(BIN)/python -m bench http --start-service --repository $(PERF) --model $$m \
			--images $(PHOTOS) --concurrency 1,8,32 --requests 600 --out bench-results/$$m \
		|| exit 1; \
	done

bench-precision: venv
	$(BIN)/python -m bench precision --weights-dir $(WEIGHTS) --images $(PHOTOS) \
		--cifar-labeled $(CIFAR_LABELED) --out bench-results/precision
	cp bench-results/precision/precision_vs_depth.png docs/precision_vs_depth.png

# README "Image decoding": per photo (500x375, 2400x1600) on one core, and CIFAR accuracy on
# upscaled JPEGs decoded in full and with DCT scaling.
bench-decode: venv
	$(BIN)/python -m bench decode --images $(PHOTOS) --size 500x375,2400x1600 --cifar-accuracy \
		--cifar-labeled $(CIFAR_LABELED) --out bench-results/decode

# README "The serving tax" (~1.5 min): in one run, the Python floor (a minimal ASGI app under the
# service's HTTP server), CIFAR ResNet-20 alone, over HTTP and over gRPC, the nearly free model with
# one and two front-end workers, and the issue's ratios.
CIFAR_SAMPLES ?= ../shared/data/cifar10-test/samples
bench-tax: venv
	$(BIN)/python -m bench tax --images $(CIFAR_SAMPLES) --weights-dir $(WEIGHTS) \
		--cache-repository bench-results/tax-repo --out bench-results/tax

# ResNet-50 fp32, one setting changed at a time (README "ResNet-50 over HTTP", ~4 min): each
# directory holds batch 1 in process and concurrency 32 over HTTP; `default` runs three times.
ABLATE = $(BIN)/python -m bench engine --repository $(PERF) --models resnet50 --batch-sizes 1 \
	--out bench-results/ablations/$(1) $(2) && \
	$(3) $(BIN)/python -m bench http --start-service --repository $(PERF) --model resnet50 \
	--images $(PHOTOS) --concurrency 32 --requests 600 --out bench-results/ablations/$(1) $(4)
bench-ablations: venv
	$(BIN)/python -m export resnet50 --weights random:0 --out $(PERF) --skip-existing
	$(call ABLATE,default-1,,,)
	$(call ABLATE,default-2,,,)
	$(call ABLATE,default-3,,,)
	$(call ABLATE,spinning,--allow-spinning,RESNET_SERVE_ALLOW_SPINNING=true,)
	$(call ABLATE,httpx,,,--client httpx)

# Hostile input, overload, soak, faults, SIGTERM: docs/reliability.md (~4.5 min on 2 cores).
# WORKERS=N runs every service of it with N front-end workers (--workers N).
reliability: venv
	TEST_WORKERS=$(WORKERS) $(BIN)/python -m tests.reliability all --out reliability-results$(if $(WORKERS),-workers$(WORKERS))

# On a host with an NVIDIA GPU and onnxruntime-gpu (README "GPU"): CUDA proof, fp32/fp16 export
# with parity and gate on the GPU, latency per depth at batch 1/8/32/128, ResNet-50 over HTTP at
# c=64/256, and the CUDA-graph, TensorRT and nvImageCodec variants, in under 10 minutes.
# Without a GPU it exits 1 at once.
gpu-check:
	$(BIN)/python -m bench gpu --out bench-results/gpu --images $(PHOTOS) --weights-dir $(WEIGHTS)

clean:
	rm -rf $(REPO) bench-results reliability-results*
