"""Kubeflow Pipelines (kfp v2) built from the ``ops`` steps: ``replaceme_pipeline`` and its compiled YAML."""
