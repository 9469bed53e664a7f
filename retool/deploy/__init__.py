"""Deploy a serving plan: KServe InferenceService, plain Kubernetes, Model Analyzer hand-off."""
