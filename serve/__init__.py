"""Starting and stopping the real tritonserver on a model repository."""
