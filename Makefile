# The user interface: every stage is a target, driven by the variables below; `make demo` chains them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)

# data and training
SYNTHETIC   := data/synthetic
DATA        ?= $(SYNTHETIC)
ARTIFACTS   ?= artifacts
# a built-in network (resnet_tiny, resnet18, resnet34, resnet50) or any classification model of a library:
# torchvision:<name>, timm:<name> (training/sources.py)
ARCH        ?= resnet_tiny
# fine-tuning: WEIGHTS = pretrained weights (a file, or the library's name: IMAGENET1K_V1, a timm tag); the
# backbone learns at BACKBONE_LR_SCALE of LR (unset: 0.1), and not at all for FREEZE_EPOCHS (unset: 1); the
# preprocessing is the model's own (its resize fraction, interpolation, mean/std) at IMG_SIZE
WEIGHTS     ?=
BACKBONE_LR_SCALE ?=
FREEZE_EPOCHS ?=
# a timm model: layer-wise learning-rate decay instead of BACKBONE_LR_SCALE (e.g. 0.75)
LAYER_DECAY ?=
EPOCHS      ?= 12
IMG_SIZE    ?= 64
BATCH_SIZE  ?= 64
LR          ?= 0.1
SEED        ?= 0
WORKERS     ?= 2
NPROC       ?= 1
CONFIG      ?=
RESUME      ?=
TRAIN_ARGS  ?=
TEACHER     ?= $(ARTIFACTS)/best.pt
STUDENT_ARCH ?= resnet_tiny
STUDENT_WIDTH ?= 16
STUDENT_OUT ?= $(ARTIFACTS)/student
CKPT        ?= $(ARTIFACTS)/best.pt
SPLIT       ?= val
EVAL_OUT    ?= $(ARTIFACTS)/eval
# export and repository
ONNX        ?= $(ARTIFACTS)/model.onnx
TOLERANCE   ?= 1e-3
# embedded: fp32 | fp16 | bf16 | int8 | auto (the fastest candidate that passed make quantize's gate; without
# make quantize, make repo measures the FP32 file on every engine and hint that needs no calibration), on ENGINE
# (onnxruntime | openvino; unset: the fastest measured for PRECISION, else onnxruntime); gpu: auto = the plan's
PRECISION   ?= auto
ENGINE      ?=
TARGET      ?= embedded
PLAN        ?=
# TARGET=gpu: the serving host's CPU cores, which size the DALI threads (unset: this machine's)
HOST_CORES  ?=
# the served layout (build/layouts.py): fused (embedded only: one Python model runs the whole chain) |
# postprocess (an ensemble; a Python model returns LABELS/SCORES) | classification (no Python model after the
# classifier: top-k via Triton's classification extension); unset: as the repository was rendered, else
# fused for embedded, classification for gpu
LAYOUT      ?=
REPO        ?= $(if $(filter gpu,$(TARGET)),model_repository_gpu,model_repository)
# the GPU repository whose batching settings the engine's optimization profile follows
GPU_REPO    ?= $(if $(filter gpu,$(TARGET)),$(REPO),model_repository_gpu)
# pruning (make prune): channels of CKPT pruned to PRUNE_FLOPS of its FLOPs (and PRUNE_PARAMS of its
# parameters, if set), PRUNE_EPOCHS of distillation from CKPT, the top-1 gate, export, served side by side
PRUNE_OUT   ?= $(ARTIFACTS)/pruned
PRUNE_FLOPS ?= 0.5
PRUNE_PARAMS ?=
PRUNE_EPOCHS ?= 8
PRUNE_ROUNDS ?= 3
# 2:4 = also 2:4-sparse weights (ModelOpt) for TensorRT's sparse tensor cores; `make engine` then builds with them
SPARSITY    ?= none
# quantization and engines
# unset: build/quantize.py's defaults (128 images, max calibration, 1.0 point)
CALIB_SIZE  ?=
CALIB_METHOD ?=
MAX_TOP1_DROP ?=
# the gate's least top-1 agreement with the reference, labelled data or not (make quantize, and make repo's
# own engine choice without it), in percent (unset: build/gate.py's 99.0)
MIN_AGREEMENT ?=
GATE_ARGS = $(if $(MAX_TOP1_DROP),--max-top1-drop $(MAX_TOP1_DROP))
AGREEMENT_ARGS = $(if $(MIN_AGREEMENT),--min-agreement $(MIN_AGREEMENT))
ENGINE_PRECISION = $(if $(filter fp32 auto,$(PRECISION)),fp16,$(PRECISION))
include $(dir $(lastword $(MAKEFILE_LIST)))mk/settings.mk
# serving and clients: the server listens on HOST only (0.0.0.0 opens it to the network); its model
# control and config APIs need the admin key ($$TRITON_ADMIN_KEY, else ADMIN_KEY_FILE, generated on first use)
HOST        ?= 127.0.0.1
ADMIN_KEY_FILE ?= .cache/admin.key
export TRITON_ADMIN_KEY_FILE := $(abspath $(ADMIN_KEY_FILE))
# inference, metadata and statistics need the inference key ($$TRITON_INFERENCE_KEY, else INFERENCE_KEY_FILE):
# INFERENCE_KEY=auto when HOST is not loopback, on, or off; the clients send it (clients.keys)
INFERENCE_KEY ?= auto
INFERENCE_KEY_FILE ?= .cache/inference.key
export TRITON_INFERENCE_KEY_FILE := $(abspath $(INFERENCE_KEY_FILE))
# gRPC over TLS: GRPC_TLS_CERT + GRPC_TLS_KEY (PEM; GRPC_TLS_CLIENT_CA: mutual TLS); `make client` and the load
# targets with URL= check the server against TLS_ROOT_CERT
GRPC_TLS_CERT ?=
GRPC_TLS_KEY ?=
GRPC_TLS_CLIENT_CA ?=
TLS_ROOT_CERT ?=
HTTP_PORT   ?= 8000
GRPC_PORT   ?= 8001
METRICS_PORT ?= 8002
# http | grpc: what `make client` speaks, and the load targets with URL=
PROTOCOL    ?= http
IMAGES      ?= $(DATA)/val
CLIENT_ARGS ?=
PYTEST_ARGS ?=
# load testing
CONCURRENCY ?= 1 2 4 8 16 32
USERS       ?= 16
DURATION    ?= 20
P99_BUDGET_MS ?= 50
# make perf, loadtest, report URL=host:port: a running server's PROTOCOL endpoint, measured as it is (nothing started or
# stopped, the parts that need a local server left out), with the inference key as `make client` sends it
# ($$TRITON_INFERENCE_KEY, else INFERENCE_KEY_FILE) and gRPC TLS checked against TLS_ROOT_CERT; perf_analyzer also
# needs the admin key ($$TRITON_ADMIN_KEY, else ADMIN_KEY_FILE) where the server keeps the model's configuration behind it
URL         ?=
DEPLOYMENT_ARGS = $(if $(URL),--url $(URL) --protocol $(PROTOCOL) $(if $(TLS_ROOT_CERT),--tls-root-cert $(TLS_ROOT_CERT)))
# what the load targets build first: make demo's artifacts; with URL= only the images to send (make data's, unless IMAGES=)
LOAD_DEPS = $(if $(URL),$(if $(filter command line,$(origin IMAGES)),venv,data),artifacts)
# served side by side by `make precisions` (fp32 is the reference), at this one concurrency
PRECISIONS  ?= fp32 int8
PRECISION_CONCURRENCY ?= 16
BASELINE_PORT ?= 8080
# the default recipe on real data sets that packages ship (perf/experiments/real_data.py)
REAL_DATASETS ?= digits mnist5k animals faces

.PHONY: lint ab metrics-cost client-metrics-cost cache-check flood-check shadow-cost monitor-check batch-fit relabel workloads transfer import peers analyzer analyze compare publish rollback reliability soak s3-server s3-upload help help-vars test-fast export dali1 venv data train distill prune eval onnx quantize engine gpu-check repo serve client demo test clean artifacts perf loadtest baseline tune report precisions benchmark-data

help: ## [start] this list, every target by stage (make help-vars: every variable and its default)
	@awk '/^[a-zA-Z0-9_-]+:.*## \[/ { i = index($$0, "## ["); rest = substr($$0, i + 4); j = index(rest, "] "); \
	  name = substr($$0, 1, index($$0, ":") - 1); group = substr(rest, 1, j - 1); \
	  if (!(group in lines)) order[++n] = group; lines[group] = lines[group] sprintf("  make %-20s %s\n", name, substr(rest, j + 2)) } \
	  END { for (k = 1; k <= n; k++) printf "%s\n%s", order[k], lines[order[k]] }' $(firstword $(MAKEFILE_LIST))

# every `NAME ?= default` of the Makefile and mk/settings.mk, with the comment right above it
help-vars: ## [start] every variable, its default and what it does (the repository settings: python -m build.render_repo --help)
	@awk '/^#/ { if (!incomment) text = ""; text = text substr($$0, 3) " "; incomment = 1; next } \
	  /^[A-Z][A-Z0-9_]* *\?=/ { k = index($$0, "?="); name = substr($$0, 1, k - 1); gsub(/ /, "", name); \
	    value = substr($$0, k + 2); gsub(/^ +| +$$/, "", value); \
	    printf "  %-22s %-30s %s\n", name, (value == "" ? "(unset)" : value), text; text = ""; incomment = 0; next } \
	  { text = ""; incomment = 0 }' $(MAKEFILE_LIST)
	@echo "  (the repository settings' built-in defaults, for every unset one: .venv/bin/python -m build.render_repo --help)"

# Debian packages: perf_analyzer (shipped in tritonclient[all]) links libb64.so.0d; wrk is the one load
# generator that measures every HTTP server side by side (make compare)
# chromium: the report's page is checked in a real headless browser (perf/report/browser.py)
APT_PACKAGES := libb64-0d wrk chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

venv: $(VENV)/.installed ## [setup] the project virtualenv .venv (requirements.txt) and the Debian packages it needs
$(VENV)/.installed: requirements.txt requirements-data.txt
	@dpkg -s $(APT_PACKAGES) >/dev/null 2>&1 || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q $(APT_PACKAGES); }
	@$(PYTHON) -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 13))' || { echo "$(PYTHON) is Python \
	  $$($(PYTHON) -c 'import platform; print(platform.python_version())'): the project needs 3.10-3.13 (PYTHON=python3.11 ...)"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-data.txt
	touch $@

# the peer servers `make compare` and `make report` measure beside Triton, each in its own virtualenv
# (their pins clash with the project's): perf/reference/peers/
peers: .venv-ray/.installed .venv-bentoml/.installed ## [setup] the peer servers' virtualenvs (.venv-ray, .venv-bentoml) for compare and report
# Triton Model Analyzer, also in its own virtualenv (perf/tuning/analyze.py)
analyzer: .venv-analyzer/.installed ## [setup] Triton Model Analyzer's virtualenv (.venv-analyzer) for make analyze
# DALI 1.53 (the GPU container's 1.x line) in its own virtualenv, for the served graph's check under it (tests/test_dali1.py)
dali1: .venv-dali1/.installed ## [setup] DALI of the GPU container's 1.x line (.venv-dali1), for tests/test_dali1.py
.venv-%/.installed: requirements-%.txt
	test -x .venv-$*/bin/python || $(PYTHON) -m venv .venv-$*
	.venv-$*/bin/python -m pip install --quiet --disable-pip-version-check -r $<
	touch $@

data: venv ## [stages] the synthetic data set, or check DATA=<your ImageFolder> has train/ and val/
ifeq ($(DATA),$(SYNTHETIC))
	@test -f $(DATA)/.complete-seed$(SEED) || { $(PY) -m training.synthetic --out $(DATA) --seed $(SEED) && touch $(DATA)/.complete-seed$(SEED); }
else
	@test -d "$(DATA)/train" -a -d "$(DATA)/val" || { echo "DATA=$(DATA) must be an ImageFolder root with train/<class>/ and val/<class>/"; exit 2; }
endif

# NPROC>1 trains with torchrun DDP (gloo on CPU, NCCL on GPU); BATCH_SIZE is per process.
TRAIN := $(if $(filter-out 1,$(NPROC)),$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) -m training.train,$(PY) -m training.train)
# CONFIG=recipe.yaml replaces the recipe variables below (the file sets them; TRAIN_ARGS still adds flags).
RECIPE = $(if $(CONFIG),--config $(CONFIG),--img-size $(IMG_SIZE) --batch-size $(BATCH_SIZE) --lr $(LR) \
  --seed $(SEED) --workers $(WORKERS) --epochs $(EPOCHS))
RUN_FLAGS = --data $(DATA) $(if $(RESUME),--resume $(RESUME)) $(if $(WEIGHTS),--weights $(WEIGHTS)) \
  $(if $(BACKBONE_LR_SCALE),--backbone-lr-scale $(BACKBONE_LR_SCALE)) \
  $(if $(FREEZE_EPOCHS),--freeze-epochs $(FREEZE_EPOCHS)) $(if $(LAYER_DECAY),--layer-decay $(LAYER_DECAY)) $(TRAIN_ARGS)

train: data ## [stages] train ARCH on DATA (WEIGHTS= to fine-tune a pretrained model): ARTIFACTS/best.pt
	$(TRAIN) $(RECIPE) $(if $(CONFIG),,--arch $(ARCH)) $(RUN_FLAGS) --out $(ARTIFACTS)

distill: data ## [stages] a smaller student (STUDENT_ARCH) distilled from TEACHER
	$(TRAIN) $(RECIPE) --arch $(STUDENT_ARCH) --width $(STUDENT_WIDTH) --teacher $(TEACHER) $(RUN_FLAGS) --out $(STUDENT_OUT)

# needs CKPT exported to ONNX (as `make demo` leaves it); writes PRUNE_OUT/{best.pt,model.onnx,prune_report.md}
prune: artifacts ## [stages] CKPT pruned to PRUNE_FLOPS of its FLOPs, fine-tuned, exported, served side by side
	$(PY) -m training.prune --ckpt $(CKPT) --data $(DATA) --out $(PRUNE_OUT) --target-flops $(PRUNE_FLOPS) \
	  $(if $(PRUNE_PARAMS),--target-params $(PRUNE_PARAMS)) --epochs $(PRUNE_EPOCHS) --sparsity $(SPARSITY) $(GATE_ARGS)
	$(PY) -m build.export_onnx --ckpt $(PRUNE_OUT)/best.pt --data $(DATA) --out $(PRUNE_OUT)/model.onnx --tolerance $(TOLERANCE)
	$(MAKE) --no-print-directory ab WHAT=pruned

eval: venv ## [stages] CKPT evaluated on SPLIT: metrics, confusion matrix
	$(PY) -m training.evaluate --ckpt $(CKPT) --data $(DATA) --split $(SPLIT) --out $(EVAL_OUT)

onnx: venv ## [stages] CKPT exported to ONNX, checked against PyTorch, metadata and drift reference embedded
	$(PY) -m build.export_onnx --ckpt $(CKPT) --data $(DATA) --out $(ONNX) --tolerance $(TOLERANCE)

# a pretrained torchvision or timm model as it is (its own classes and preprocessing, nothing trained), validated on
# EXPORT_IMAGES (any folder of images: by default scikit-image's photographs, written to data/photos), whose answers
# also become the drift reference: give images like the traffic it will serve
PHOTOS      := data/photos
EXPORT_IMAGES ?= $(PHOTOS)
export: venv ## [stages] a pretrained model as it is: ARCH=timm:<name>|torchvision:<name> WEIGHTS=<file or tag> [EXPORT_IMAGES=]
	@test -n "$(WEIGHTS)" || { echo "make export needs ARCH=<torchvision:name or timm:name> WEIGHTS=<a file, or the library's name for its weights>"; exit 2; }
	@test "$(EXPORT_IMAGES)" != "$(PHOTOS)" -o -f $(PHOTOS)/.complete-seed0 || $(PY) -m training.real_datasets --name photos --out $(PHOTOS)
	$(PY) -m training.pretrained --arch $(ARCH) --weights $(WEIGHTS) --out $(ARTIFACTS)/pretrained.pt \
	  $(if $(filter command line,$(origin IMG_SIZE)),--img-size $(IMG_SIZE))
	$(PY) -m build.export_onnx --ckpt $(ARTIFACTS)/pretrained.pt --data $(EXPORT_IMAGES) --out $(ONNX) --tolerance $(TOLERANCE)

# a model trained elsewhere: `make import ONNX=their_model.onnx LABELS=labels.txt LIKE=timm:<name> IMG_SIZE=224`
# checks and fixes it, and writes $(ARTIFACTS)/model.onnx with the metadata contract (then quantize, repo, serve)
LABELS      ?=
LIKE        ?=
import: venv ## [stages] a model trained elsewhere: ONNX=<file> LABELS=<names> [LIKE=timm:<name>] into ARTIFACTS/model.onnx
	@test "$(origin ONNX)" = "command line" -a -n "$(LABELS)" || { echo "make import needs ONNX=<the model> LABELS=<class names, one per line>"; exit 2; }
	$(PY) -m build.import_onnx --onnx $(ONNX) --labels $(LABELS) --out $(ARTIFACTS)/model.onnx \
	  $(if $(filter command line,$(origin IMG_SIZE)),--img-size $(IMG_SIZE)) \
	  $(if $(LIKE),--like $(LIKE)) $(if $(filter-out $(SYNTHETIC),$(DATA)),--data $(DATA))

quantize: venv ## [stages] FP16 and INT8 (calibrated on DATA, labelled or not) on ONNX Runtime and OpenVINO, scored, gated, timed
	$(PY) -m build.quantize --onnx $(ONNX) --data $(DATA) --out $(ARTIFACTS) \
	  $(if $(CALIB_SIZE),--calib-size $(CALIB_SIZE)) $(if $(CALIB_METHOD),--calib-method $(CALIB_METHOD)) $(GATE_ARGS) $(AGREEMENT_ARGS)

# GPU + TensorRT only (the NGC container, see docker/); elsewhere it stops with what is missing
engine: venv ## [gpu] a TensorRT plan from the ONNX (GPU + TensorRT: the docker/ container)
	$(PY) -m build.engine --onnx $(ARTIFACTS)/model_$(ENGINE_PRECISION).onnx --precision $(ENGINE_PRECISION) \
	  --out $(ARTIFACTS)/model_$(ENGINE_PRECISION).plan --repo $(GPU_REPO) $(SETTINGS_ARGS) \
	  $(if $(filter 2:4,$(SPARSITY)),--sparsity)

gpu-check: venv ## [gpu] engines, serving and fidelity end to end on a GPU: artifacts/gpu_check/
	$(PY) -m perf.checks.gpu_check --artifacts $(ARTIFACTS) --data $(DATA) --repo $(GPU_REPO) $(GATE_ARGS) $(SETTINGS_ARGS)

# PRECISION and ENGINE pick what serves (ONNX=file overrides the file); TARGET=gpu renders the GPU repository
repo: venv ## [stages] render model_repository/ (PRECISION, ENGINE, TARGET, LAYOUT, the repository settings)
	$(PY) -m build.render_repo $(if $(filter command line,$(origin ONNX)),--onnx $(ONNX)) --artifacts $(ARTIFACTS) \
	  $(if $(filter command line environment,$(origin PRECISION)),--precision $(PRECISION)) $(if $(ENGINE),--engine $(ENGINE)) \
	  --target $(TARGET) $(if $(PLAN),--plan $(PLAN)) \
	  $(if $(LAYOUT),--layout $(LAYOUT)) $(if $(HOST_CORES),--host-cores $(HOST_CORES)) \
	  --data $(DATA) $(GATE_ARGS) $(AGREEMENT_ARGS) --out $(REPO) $(SETTINGS_ARGS)

serve: venv ## [stages] start Triton on REPO (HTTP_PORT, GRPC_PORT, METRICS_PORT; HOST=0.0.0.0 with keys)
	$(PY) -m serve --repo $(REPO) --host $(HOST) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT) \
	  --inference-key $(INFERENCE_KEY) $(if $(GRPC_TLS_CERT),--grpc-tls-cert $(GRPC_TLS_CERT) --grpc-tls-key $(GRPC_TLS_KEY)) \
	  $(if $(GRPC_TLS_CLIENT_CA),--grpc-tls-client-ca $(GRPC_TLS_CLIENT_CA))

client: venv ## [stages] classify IMAGES with the running server (PROTOCOL=http|grpc)
	$(PY) -m clients $(IMAGES) --protocol $(PROTOCOL) \
	  --url localhost:$(if $(filter grpc,$(PROTOCOL)),$(GRPC_PORT),$(HTTP_PORT)) $(if $(TLS_ROOT_CERT),--tls-root-cert $(TLS_ROOT_CERT)) \
	  $(CLIENT_ARGS)

demo: data train onnx repo ## [start] data -> train -> onnx -> repo, then Triton started, sample images classified over HTTP and gRPC, stopped
	$(PY) -m serve.demo --repo $(REPO) --images $(DATA)/val \
	  --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

# `make demo`'s artifacts, built only when the repository has not been rendered yet
artifacts: venv ## [stages] make demo's artifacts, only if REPO has not been rendered yet
	@test -f $(REPO)/build.json || $(MAKE) data train onnx repo

perf: $(LOAD_DEPS) ## [load testing] perf_analyzer sweeps (HTTP, gRPC, request rate) and the in-process ceiling (URL=: a running server)
	$(PY) -m perf.report --parts ceiling,perf --repo $(REPO) --images $(IMAGES) --concurrency $(CONCURRENCY) $(DEPLOYMENT_ARGS)

loadtest: $(LOAD_DEPS) ## [load testing] locust against Triton and the naive baseline (URL=: a running server)
	$(PY) -m perf.report --parts loadtest --repo $(REPO) --images $(IMAGES) --users $(USERS) --duration $(DURATION) \
	  $(DEPLOYMENT_ARGS)

baseline: venv ## [load testing] the naive Flask + PyTorch baseline server on CKPT
	$(PY) -m perf.reference.baseline --ckpt $(CKPT) --port $(BASELINE_PORT)

precisions: artifacts ## [A/B measurements] = make ab WHAT=precisions: PRECISIONS served side by side
	@test -f $(ARTIFACTS)/build_report.json || $(MAKE) quantize
	$(MAKE) --no-print-directory ab WHAT=precisions

# live updates (the server started by `make serve`, explicit model control): ONNX becomes the classifier's
# next version once it passes the checks and the accuracy gate on DATA's val split; rollback retires it
# SHADOW=1: the candidate first serves beside the current version on live traffic (mirrored, never answering
# clients) and is promoted only if it agrees (serve/rollout.py): SHADOW_REQUESTS images, SHADOW_AGREEMENT %,
# its p99 within SHADOW_P99_MARGIN, SHADOW_PERCENT of the answered batches mirrored
SHADOW ?=
SHADOW_REQUESTS ?= 500
SHADOW_AGREEMENT ?= 99
SHADOW_P99_MARGIN ?= 0.25
SHADOW_PERCENT ?= 100
publish: venv ## [live updates] ONNX becomes the served classifier's next version after its checks (SHADOW=1: a shadow rollout)
ifneq ($(SHADOW),)
	$(PY) -m serve.rollout --onnx $(ONNX) --repo $(REPO) --data $(DATA) --url $(HOST):$(HTTP_PORT) \
	  --metrics-url http://$(HOST):$(METRICS_PORT)/metrics --min-requests $(SHADOW_REQUESTS) \
	  --min-agreement $(SHADOW_AGREEMENT) --p99-margin $(SHADOW_P99_MARGIN) --percent $(SHADOW_PERCENT) $(GATE_ARGS)
else
	$(PY) -m serve.publish --onnx $(ONNX) --repo $(REPO) --data $(DATA) --url $(HOST):$(HTTP_PORT) $(GATE_ARGS)
endif

rollback: venv ## [live updates] retire the newest version
	$(PY) -m serve.publish --rollback --repo $(REPO) --url $(HOST):$(HTTP_PORT)

# a model repository in an object store: `make s3-server` runs a local S3 (moto, in memory) in the foreground;
# `make s3-upload` copies REPO_DIR there; then `make serve REPO=$(S3_URL)` (any s3://[host:port/]bucket/prefix)
S3_PORT     ?= 9000
S3_URL      ?= s3://127.0.0.1:$(S3_PORT)/models/classify
REPO_DIR    ?= model_repository
s3-server: venv ## [live updates] a local S3 server (moto) in the foreground, for serving from an object store
	$(PY) -m serve.object_store server --port $(S3_PORT)

s3-upload: venv ## [live updates] copy REPO_DIR to S3_URL; then make serve REPO=s3://...
	@test -f $(REPO_DIR)/build.json || $(MAKE) data train onnx repo REPO=$(REPO_DIR)
	$(PY) -m serve.object_store upload --repo $(REPO_DIR) --to $(S3_URL)

# overload, fuzzing, graceful shutdown, live updates and killed stubs on the real server: perf/reports/reliability/
FUZZ_CASES ?= 2000
reliability: artifacts ## [checks] overload, fuzzing, shutdown, live updates and killed stubs on the real server
	$(PY) -m perf.checks.reliability --repo $(REPO) --images $(IMAGES) --data $(DATA) --fuzz-cases $(FUZZ_CASES)

# a steady load for DURATION seconds (default 600 here): errors, memory and descriptor trends, latency per window
SOAK_WORKERS ?= 4
SOAK_WINDOW ?= 60
soak: artifacts ## [checks] a steady load for DURATION seconds: errors, memory, descriptors, latency per window
	$(PY) -m perf.checks.soak --repo $(REPO) --images $(IMAGES) --workers $(SOAK_WORKERS) --window $(SOAK_WINDOW) \
	  --duration $(if $(filter command line environment,$(origin DURATION)),$(DURATION),600)

# Triton (the repository and COMPARE_LAYOUTS, other layouts of the same model) and the naive baseline side by side,
# one generator (wrk), alternating rounds: perf/reports/compare/
COMPARE_ROUNDS ?= 3
COMPARE_SECONDS ?= 10
COMPARE_CONNECTIONS ?= 16
COMPARE_LAYOUTS ?= postprocess
COMPARE_PEERS ?= ray,bentoml
compare: artifacts $(if $(COMPARE_PEERS),peers) ## [load testing] Triton, its other layouts, the peers and the baseline side by side under wrk
	$(PY) -m perf.reference.compare --repo $(REPO) --ckpt $(CKPT) --images $(IMAGES) --rounds $(COMPARE_ROUNDS) \
	  --seconds $(COMPARE_SECONDS) --connections $(COMPARE_CONNECTIONS) --layouts "$(COMPARE_LAYOUTS)" \
	  --peers "$(COMPARE_PEERS)"

# Triton Model Analyzer's quick search (instances, max batch size, concurrency) on the fused model; the
# winner within P99_BUDGET_MS is written back: perf/reports/analyze/
analyze: artifacts analyzer ## [load testing] Triton Model Analyzer's search within P99_BUDGET_MS, the winner written back
	$(PY) -m perf.tuning.analyze --repo $(REPO) --images $(IMAGES) --p99-budget-ms $(P99_BUDGET_MS)

TUNE_ROUNDS ?= 3
tune: artifacts ## [load testing] the batching sweep within P99_BUDGET_MS, the winner written back
	$(PY) -m perf.tuning.tune --repo $(REPO) --images $(IMAGES) --p99-budget-ms $(P99_BUDGET_MS) --rounds $(TUNE_ROUNDS)

# everything in one run: ceiling, perf_analyzer, locust, and every server side by side under wrk (the
# COMPARE_* variables); the page is then checked in headless Chromium (a screenshot, report.png, beside it)
report: $(if $(URL),$(LOAD_DEPS),artifacts $(if $(COMPARE_PEERS),peers)) ## [load testing] everything in one run: ceiling, perf_analyzer, locust, every server under wrk, the page (URL=: a running server's)
	$(PY) -m perf.report --repo $(REPO) --images $(IMAGES) --concurrency $(CONCURRENCY) --users $(USERS) --duration $(DURATION) \
	  --layouts "$(COMPARE_LAYOUTS)" --peers "$(COMPARE_PEERS)" --compare-rounds $(COMPARE_ROUNDS) \
	  --compare-seconds $(COMPARE_SECONDS) --workloads "$(REPORT_WORKLOADS)" --ckpt $(CKPT) --data $(DATA) $(DEPLOYMENT_ARGS)

# transfer, measured offline: this project's own pretrained network (TRANSFER_SOURCE) fine-tuned on another real
# data set against training from scratch, equal epochs, several seeds: .cache/transfer/results.md
TRANSFER_SOURCE ?= animals
TRANSFER_TARGETS ?= digits faces
# the architectures measured, each pretrained on TRANSFER_SOURCE
TRANSFER_ARCHS ?= resnet_tiny torchvision:mobilenet_v3_small
# the A/B measurements (perf/ab/: one registry, one entry point): `make ab WHAT=<name>`, `make ab` lists them;
# AB_ARGS_<name> are each one's arguments (AB_ARGS adds more); the targets below are aliases of `make ab WHAT=...`
WHAT        ?=
AB_ARGS     ?=
AB_SIDE_BY_SIDE = --repo $(REPO) --images $(IMAGES) --rounds $(COMPARE_ROUNDS) --seconds $(COMPARE_SECONDS) \
  --connections $(COMPARE_CONNECTIONS)
AB_ARGS_metrics-cost = $(AB_SIDE_BY_SIDE)
AB_ARGS_client-metrics-cost = --repo $(REPO) --images $(IMAGES) --rounds $(COMPARE_ROUNDS) --seconds $(COMPARE_SECONDS)
AB_ARGS_cache = $(AB_SIDE_BY_SIDE)
AB_ARGS_flood = $(AB_SIDE_BY_SIDE) --flood-connections $(FLOOD_CONNECTIONS)
AB_ARGS_shadow-cost = $(AB_SIDE_BY_SIDE) --percent $(SHADOW_PERCENT)
AB_ARGS_batch-fit = $(AB_SIDE_BY_SIDE)
AB_ARGS_instances = $(AB_SIDE_BY_SIDE)
AB_ARGS_precisions = --repo $(REPO) --artifacts $(ARTIFACTS) --images $(IMAGES) --precisions $(PRECISIONS) \
  --concurrency $(PRECISION_CONCURRENCY)
AB_ARGS_pruned = --unpruned $(ONNX) --pruned $(PRUNE_OUT) --repo $(REPO) --images $(IMAGES) --rounds $(PRUNE_ROUNDS) \
  --concurrency $(PRECISION_CONCURRENCY)
ab: venv ## [A/B measurements] one A/B measurement: WHAT=<name> (make ab alone lists them)
	$(PY) -m perf.ab $(or $(WHAT),list) $(AB_ARGS_$(WHAT)) $(AB_ARGS)

# the served metrics' cost: the repository's model with them on and off, side by side (perf/ab/metrics_cost.py)
metrics-cost: ## [A/B measurements] = make ab WHAT=metrics-cost: the served metrics on and off
	$(MAKE) --no-print-directory ab WHAT=metrics-cost

# the client library's served metrics (the GPU target's: clients/metrics.py), on and off
# (perf/ab/client_metrics_cost.py)
client-metrics-cost: ## [A/B measurements] = make ab WHAT=client-metrics-cost: the client library's metrics on and off
	$(MAKE) --no-print-directory ab WHAT=client-metrics-cost

# Triton's response cache on a workload with repeats: hit rate and throughput against it off (perf/ab/cache.py)
cache-check: ## [A/B measurements] = make ab WHAT=cache: Triton's response cache on a workload with repeats
	$(MAKE) --no-print-directory ab WHAT=cache

# the served model's sampled requests (make repo PAYLOAD_PERCENT=... PAYLOAD_DIR=...) as an ImageFolder tree by
# predicted class, for a person to correct and train on (training/relabel.py)
SAMPLES     ?= /var/lib/image-inference/payloads/classify
RELABEL_OUT ?= data/relabel
relabel: venv ## [checks] the sampled requests as an ImageFolder by predicted class, for relabelling
	$(PY) -m training.relabel --samples $(SAMPLES) --out $(RELABEL_OUT)

# goodput under a flood (256 connections resending at once after a 503) against capacity, with the queue
# held by time (the default) and the old count of 64 (perf/ab/flood.py)
FLOOD_CONNECTIONS ?= 256
flood-check: ## [A/B measurements] = make ab WHAT=flood: goodput under a flood of resending clients
	$(MAKE) --no-print-directory ab WHAT=flood

# the monitoring end to end on the real server: metrics, drift on shifted sets, payload samples, shadow promotion
# and refusal under load, the cache, the dashboards' and alert rules' metrics (perf/checks/monitor_check.py)
monitor-check: venv ## [checks] the monitoring end to end: metrics, drift, payloads, shadow rollout, cache
	$(PY) -m perf.checks.monitor_check --repo $(REPO) --data $(DATA)

# what shadowing costs the clients: the mirror off and on (SHADOW_PERCENT), side by side (perf/ab/shadow_cost.py)
shadow-cost: ## [A/B measurements] = make ab WHAT=shadow-cost: the shadow mirror off and on
	$(MAKE) --no-print-directory ab WHAT=shadow-cost

# the batcher's preferred batch fitted to the model's cost (make repo) against none, both accepting 32, side by side
# (perf/ab/batch_fit.py)
batch-fit: ## [A/B measurements] = make ab WHAT=batch-fit: the fitted preferred batch against none
	$(MAKE) --no-print-directory ab WHAT=batch-fit

# the demo and 224-px workloads on real photographs, each on its fastest engine, side by side with the
# baseline and the ceiling (perf/report/workloads.py; trains, exports and quantizes the 224-px models first)
WORKLOADS   ?= demo-synthetic demo-photos resnet50-photos mobilenet-photos convnext-photos vit-photos
# make report REPORT_WORKLOADS=all (or a comma list) measures the workloads in the report's own run
REPORT_WORKLOADS ?=
workloads: artifacts $(if $(COMPARE_PEERS),peers) ## [load testing] the 224-px workloads on real photographs, each on its fastest engine
	$(PY) -m perf.report.workloads --workloads $(WORKLOADS) --ckpt $(CKPT) --data $(DATA) --rounds $(COMPARE_ROUNDS) \
	  --seconds $(COMPARE_SECONDS) --connections $(COMPARE_CONNECTIONS) --peers "$(COMPARE_PEERS)" \
	  --p99-budget-ms $(P99_BUDGET_MS)

transfer: venv ## [experiments] fine-tuning against training from scratch, measured on real data sets
	$(PY) -m perf.experiments.transfer --source $(TRANSFER_SOURCE) --targets $(TRANSFER_TARGETS) --archs $(TRANSFER_ARCHS) \
	  --work .cache/transfer

benchmark-data: venv ## [experiments] the default recipe trained and served on real data sets that packages ship
	$(PY) -m perf.experiments.real_data --datasets $(REAL_DATASETS) --work .cache/real_data $(if $(TRAIN_ARGS),--train-args "$(TRAIN_ARGS)")

# lint and types (configured in pyproject.toml); .ci/run runs this before the tests
lint: venv ## [start] ruff and mypy (pyproject.toml), as CI runs them before the tests
	$(PY) -m ruff check .
	$(PY) -m mypy

test: venv peers analyzer dali1 ## [start] the test suite against the real tritonserver (CI: .ci/run)
	$(PY) -m pytest tests $(PYTEST_ARGS)

# the tests that need no trained model and no server (tests/conftest.py marks the others): seconds, not minutes
test-fast: venv ## [start] only the tests that need no trained model and no server (under a minute)
	$(PY) -m pytest tests -m "not model and not server and not slow and not gpu" $(PYTEST_ARGS)

# the data, the artifacts, the rendered repository's generated files and .cache/ (the workloads' and benchmarks'
# trained models and data sets: hours to redo); the server's keys (.cache/*.key) stay unless KEYS=1
KEYS        ?=
clean: ## [stages] remove data, artifacts, the repository's generated files and .cache/ (keys kept unless KEYS=1)
	@echo "removing $(ARTIFACTS)/, $(SYNTHETIC)/, the generated files of $(REPO)/ and .cache/ (trained workloads and" \
	  "benchmark data: hours to redo)$(if $(KEYS),, except the server keys .cache/*.key (KEYS=1 removes them too))"
	rm -rf $(ARTIFACTS) $(SYNTHETIC) .pytest_cache
	@if [ -d .cache ]; then find .cache -mindepth 1 -maxdepth 1 $(if $(KEYS),,! -name '*.key') -exec rm -rf {} +; fi
	@if [ -d $(REPO) ]; then cd $(REPO) && git clean -fqX .; fi
