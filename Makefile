# Everything a fresh Debian 12 machine (as root) needs, then the two jobs from the README.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LLAMA_CPP_PYTHON_VERSION := 0.3.36
# The build every host runs: the public sdist plus our llama.cpp patch series (inference/patches/llama.cpp,
# each patch says what and why), marked with a local version label so that a mixed cluster is told apart by
# name. Change the label whenever the series changes; pyproject.toml, the inference_package role and the
# cluster harness name the same version (a unit test checks).
LLAMA_CPP_PYTHON_BUILD := $(LLAMA_CPP_PYTHON_VERSION)+llmfleet.8
# The RPC backend is off in llama-cpp-python's default build; every host needs the same build so that the
# RPC protocol versions match. The wheelhouse outlives clones so the build happens once per machine.
LLAMA_CMAKE_ARGS ?= -DGGML_RPC=on
WHEELHOUSE ?= $(HOME)/.cache/llmfleet/wheelhouse/llama-cpp-python-$(LLAMA_CPP_PYTHON_BUILD)-rpc
APT_PACKAGES := python3 python3-venv python3-dev build-essential cmake git curl ca-certificates patch \
	openssh-client iproute2 nftables systemd-container debootstrap rsync e2fsprogs prometheus

LLAMA_SERVER_DIR ?= $(HOME)/.cache/llmfleet/llama-server-$(LLAMA_CPP_PYTHON_VERSION)
LLAMA_SERVER := $(LLAMA_SERVER_DIR)/build/bin/llama-server

.PHONY: help system-packages wheelhouse install demo demo-down test lint unit bench llama-server cluster-wheelhouse

help:
	@echo "make demo   install everything and run the service on a local cluster"
	@echo "make test   install everything and run linters and the whole test suite"

system-packages:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing || exit 1; \
	  case " $$missing " in *" prometheus "*) \
	    if [ -d /run/systemd/system ]; then \
	      echo "Stopping the Prometheus server Debian's package started: here only its promtool is used"; \
	      systemctl disable --now prometheus.service; \
	    fi;; \
	  esac; \
	fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel

wheelhouse: $(BIN)/python
	@if ! ls $(WHEELHOUSE)/llama_cpp_python-$(LLAMA_CPP_PYTHON_BUILD)-*.whl >/dev/null 2>&1; then \
	  echo "Building llama-cpp-python $(LLAMA_CPP_PYTHON_BUILD) with $(LLAMA_CMAKE_ARGS) (several minutes)"; \
	  rm -rf $(WHEELHOUSE).tmp; \
	  $(BIN)/python inference/patches/build_wheel.py --version "$(LLAMA_CPP_PYTHON_BUILD)" \
	    --cmake-args="$(LLAMA_CMAKE_ARGS)" --out $(WHEELHOUSE).tmp; \
	  mkdir -p $(WHEELHOUSE) && mv $(WHEELHOUSE).tmp/*.whl $(WHEELHOUSE)/ && rmdir $(WHEELHOUSE).tmp; \
	fi

install: system-packages wheelhouse
	$(BIN)/pip install -q --find-links $(WHEELHOUSE) -e '.[dev]'
	$(BIN)/python -m inference check-build --expect "$(LLAMA_CPP_PYTHON_BUILD)"

# llama.cpp's own server from the sources vendored in the same llama-cpp-python sdist, for benchmarks.
$(LLAMA_SERVER): | $(BIN)/python
	mkdir -p $(LLAMA_SERVER_DIR)
	cd $(LLAMA_SERVER_DIR) && $(CURDIR)/$(BIN)/pip download -q --no-deps --no-binary :all: \
	  "llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION)" -d . && tar xzf llama_cpp_python-*.tar.gz
	cmake -S $(LLAMA_SERVER_DIR)/llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION)/vendor/llama.cpp \
	  -B $(LLAMA_SERVER_DIR)/build -DCMAKE_BUILD_TYPE=Release -DGGML_RPC=ON -DLLAMA_CURL=OFF \
	  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
	cmake --build $(LLAMA_SERVER_DIR)/build --target llama-server -j $$(nproc)

llama-server: $(LLAMA_SERVER)

bench: install $(LLAMA_SERVER)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m inference bench --llama-server $(LLAMA_SERVER)

# The main job on the local five-host cluster: tune, deploy the sharded service, check it, show it.
demo: install cluster-wheelhouse
	$(BIN)/python -m tests.cluster up
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/ansible-playbook playbooks/site.yml
	$(BIN)/python -m tests.cluster report

demo-down:
	$(BIN)/python -m tests.cluster down

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/yamllint -s .
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/ansible-lint

unit: install
	$(BIN)/pytest -m "not cluster"

# The wheelhouse the offline test hosts install from: the RPC build of llama-cpp-python plus every dependency.
cluster-wheelhouse: install
	$(BIN)/python -m tests.cluster wheelhouse

# Tuning roles whose molecule scenario (apply, idempotence, verify, reboot, verify again) runs on the cluster.
MOLECULE_ROLES := cpu_tuning memory_tuning storage_tuning cpu_pinning pi_boot cgroup_slices debloat monitoring

test: lint cluster-wheelhouse
	$(BIN)/pytest
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/molecule test -s cluster
	$(BIN)/python -m tests.cluster up --fresh
	for role in $(MOLECULE_ROLES); do \
	  (cd roles/$$role && PATH=$(CURDIR)/$(BIN):$$PATH $(CURDIR)/$(BIN)/molecule test) || exit 1; \
	done
	$(BIN)/python -m tests.cluster down
