"""The code that runs inside Triton: the served stages (stages.py), the engine registry (engines.py), payload
sampling (payloads.py), shadow scoring (shadow.py), the DALI preprocessing graph (dali_graph.py), the models'
statistics (metrics.py) and the Python-backend model entry files (models/).

``make repo`` copies this package as one unit into each Python model's version folder (``<model>/1/served/``)
and into the DALI pipeline's; the model's ``model.py`` (a file of models/) puts its own folder on ``sys.path``
and imports ``from served import stages, ...``. Inside it, modules import each other as ``served.<module>``
and nothing of the rest of the project: only the standard library, NumPy and the engines' and Triton's own
packages (tests/test_architecture.py). Nothing is imported here: Triton and DALI's autoserialize load it.
"""
