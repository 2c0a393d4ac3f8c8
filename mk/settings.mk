# The repository settings as make variables and the flags they become: included by the Makefile and by
# docker/Makefile, so that `make engine` and `make -C docker engine` pass the same ones. Their built-in
# defaults are printed by `python -m build.render_repo --help` (build/settings.py); an unset variable
# passes nothing.
# the repository settings: one given here pins it in the repository's deployment.yaml; unset means "as that
# file pins it, else fitted to the model's measurements, else the built-in default" (python -m
# build.render_repo --help); RESET_SETTINGS=1 unpins everything
MAX_BATCH   ?=
PREFERRED   ?=
QUEUE_DELAY_US ?=
INSTANCES   ?=
DALI_THREADS ?=
ORT_THREADS ?=
TOP_K       ?=
# overload: requests each composing model queues, and how long one may wait, before Triton answers 503 /
# UNAVAILABLE at once (0 = unbounded)
MAX_QUEUE   ?=
QUEUE_TIMEOUT_MS ?=
# inputs refused before decoding (the embedded target's preprocess model)
MAX_IMAGE_PIXELS ?=
MAX_IMAGE_BYTES ?=
# the Python models' own Prometheus metrics (confidence, entropy, class mix, inputs, refusals): 1 on, 0 off
SERVED_METRICS ?=
# how often those metrics are handed to Triton, in ms (0 = after every batch, which costs throughput)
SERVED_METRICS_INTERVAL_MS ?=
# Triton's response cache for repeated images, in MiB (0 = off)
RESPONSE_CACHE_MB ?=
# answers the drift score compares with the val split's answers (0 = off)
DRIFT_WINDOW ?=
# payload sampling (the fused layout): percent of requests, folder, its bound in KiB, images kept (1) or not (0),
# and an s3:// prefix the server ships the samples to (the folder then stages them)
PAYLOAD_PERCENT ?=
PAYLOAD_DIR ?=
PAYLOAD_MAX_KB ?=
PAYLOAD_IMAGES ?=
PAYLOAD_UPLOAD ?=
RESET_SETTINGS ?=
SETTINGS_ARGS = $(if $(MAX_BATCH),--max-batch-size $(MAX_BATCH)) $(if $(PREFERRED),--preferred-batch-sizes $(PREFERRED)) \
  $(if $(QUEUE_DELAY_US),--queue-delay-us $(QUEUE_DELAY_US)) $(if $(TOP_K),--top-k $(TOP_K)) \
  $(if $(INSTANCES),--preprocess-instances $(INSTANCES) --classifier-instances $(INSTANCES)) \
  $(if $(DALI_THREADS),--dali-threads $(DALI_THREADS)) $(if $(ORT_THREADS),--intra-op-threads $(ORT_THREADS)) \
  $(if $(MAX_IMAGE_PIXELS),--max-image-pixels $(MAX_IMAGE_PIXELS)) $(if $(MAX_IMAGE_BYTES),--max-image-bytes $(MAX_IMAGE_BYTES)) \
  $(if $(MAX_QUEUE),--max-queue-size $(MAX_QUEUE)) $(if $(QUEUE_TIMEOUT_MS),--queue-timeout-ms $(QUEUE_TIMEOUT_MS)) \
  $(if $(SERVED_METRICS),--served-metrics $(SERVED_METRICS)) $(if $(RESPONSE_CACHE_MB),--response-cache-mb $(RESPONSE_CACHE_MB)) \
  $(if $(SERVED_METRICS_INTERVAL_MS),--served-metrics-interval-ms $(SERVED_METRICS_INTERVAL_MS)) \
  $(if $(DRIFT_WINDOW),--drift-window $(DRIFT_WINDOW)) $(if $(PAYLOAD_PERCENT),--payload-percent $(PAYLOAD_PERCENT)) \
  $(if $(PAYLOAD_DIR),--payload-dir $(PAYLOAD_DIR)) $(if $(PAYLOAD_MAX_KB),--payload-max-kb $(PAYLOAD_MAX_KB)) \
  $(if $(PAYLOAD_IMAGES),--payload-images $(PAYLOAD_IMAGES)) $(if $(PAYLOAD_UPLOAD),--payload-upload $(PAYLOAD_UPLOAD)) \
  $(if $(RESET_SETTINGS),--reset-settings)
