"""The preprocess model's DALI pipeline, for DALI's own autoserialization.

Triton's DALI backend (GPU target) finds no serialized ``model.dali`` and runs this file with the
server's own DALI (``nvidia.dali._utils.autoserialize.invoke_autoserialize``), so the pipeline is
always serialized by the DALI version that will run it; a pipeline serialized by a newer DALI may
carry arguments an older one rejects. ``make repo`` serializes the embedded target's ``model.dali``
from this same file, with the same command.

Beside this file: the ``served`` package (a copy of the project's, holding served/dali_graph.py, the one
graph definition) and ``preprocess.json`` (the checkpoint's preprocessing spec, the device, the batch
size), both written by ``make repo``. Nothing else is importable here: the backend's Python has only
DALI on its path.
"""

import json
import os
import sys
from types import SimpleNamespace

from nvidia.dali import pipeline_def
from nvidia.dali.plugin.triton import autoserialize

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # the backend runs this file by path, from the server's working directory
from served.dali_graph import preprocess_graph  # noqa: E402

with open(os.path.join(HERE, "preprocess.json")) as f:
    CONFIG = json.load(f)


@autoserialize
@pipeline_def(batch_size=CONFIG["max_batch_size"], num_threads=CONFIG["num_threads"], device_id=CONFIG["device_id"])
def preprocess():
    return preprocess_graph(SimpleNamespace(**CONFIG["spec"]), CONFIG["device"], CONFIG["input_name"])
