"""Run by the DALI 1.x virtualenv of tests/test_dali1.py, not by the project's: the served graph
(served/dali_graph.py, on the path) built under that DALI on the CPU, each image of a folder through it alone.

    python decode.py SPEC_JSON IN_DIR OUT_DIR     # writes OUT_DIR/<image name>.npy and OUT_DIR/version.txt
"""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import nvidia.dali
from nvidia.dali import pipeline_def

from served.dali_graph import preprocess_graph

spec = SimpleNamespace(**json.loads(Path(sys.argv[1]).read_text()))
src, out = Path(sys.argv[2]), Path(sys.argv[3])


# one image in, one out, in order: nothing prefetched ahead of the input fed
@pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1, exec_pipelined=False,
              exec_async=False)
def pipeline():
    return preprocess_graph(spec, "cpu", "IMAGE")


pipe = pipeline()
pipe.build()
for path in sorted(src.iterdir()):
    pipe.feed_input("IMAGE", [np.frombuffer(path.read_bytes(), np.uint8)])
    (result,) = pipe.run()
    np.save(out / f"{path.name}.npy", np.asarray(result.as_array()[0]))
(out / "version.txt").write_text(nvidia.dali.__version__)
