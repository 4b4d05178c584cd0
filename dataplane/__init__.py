"""The dataplane: policy model, compiler, agent, controller and CLI, built on
the loader (which knows nothing of policies)."""
