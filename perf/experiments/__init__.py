"""ML experiments, measured offline: transfer from this project's own pretrained network (transfer.py), the
default recipe on real data sets (real_data.py), the served preprocessing against the libraries' own
transforms (library_fidelity.py)."""
