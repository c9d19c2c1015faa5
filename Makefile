# The two commands of the README's contract. Each sets up what it needs on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
REPLICAS ?= 2

.PHONY: serve test env models cluster wheelhouse

env:
	bash scripts/setup_env.sh $(VENV)

models: env
	HF_HUB_OFFLINE=1 $(PY) -m faser_sgl.default_models

serve: models
	HF_HUB_OFFLINE=1 $(PY) -m faser_sgl.launch_server $(ARGS)

# N replicas behind SGLang's router (smg), one endpoint: make cluster REPLICAS=2 ARGS="..."
cluster: models
	HF_HUB_OFFLINE=1 $(PY) -m faser_sgl.launch_cluster --replicas $(REPLICAS) $(ARGS)

test: models
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -rs $(ARGS)

# What the borrowed GPU machine lacks (FlashInfer, slimmed, and small pure-Python pieces), within
# the 64 MiB carry limit: bash scripts/gpu_check.sh there (docs/gpu_check.md).
wheelhouse: env
	PY=$(PY) bash scripts/build_wheelhouse.sh
