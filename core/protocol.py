"""The served ensemble's wire contract: model and tensor names, shared by the repository renderer,
the clients, the tests and the load tools. Nothing else spells these names."""

ENSEMBLE = "classify"
PREPROCESS, CLASSIFIER, POSTPROCESS = "preprocess", "classifier", "postprocess"
GUARD = "guard"  # the GPU target's first model: the decode policy's checks before DALI

IMAGE = "IMAGE"                  # UINT8 [-1]: encoded image bytes, rows zero-padded to a common length
PROBABILITIES = "PROBABILITIES"  # FP32 [num_classes]: softmax over the classes
LABELS = "LABELS"                # BYTES [k]: top-k class names, best first
SCORES = "SCORES"                # FP32 [k]: their probabilities
OUTPUTS = (PROBABILITIES, LABELS, SCORES)

# Between the composing models
PIXELS = "PIXELS"                # FP32 [3, H, W]: normalized model input
LOGITS = "LOGITS"                # FP32 [num_classes]
CHECKED = "CHECKED"              # UINT8 [-1]: IMAGE as the guard passed it on (unchanged)
