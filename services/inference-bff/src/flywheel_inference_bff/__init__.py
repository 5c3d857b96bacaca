"""inference-bff: one predict core behind /predict, /predict/batch and a Label Studio ML backend."""
