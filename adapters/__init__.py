"""The adapter registry shared by serving and training: the base model, manifests, validation, versioned storage."""
