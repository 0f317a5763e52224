"""ferry's native InferenceService: Generate and GenerateStream."""
