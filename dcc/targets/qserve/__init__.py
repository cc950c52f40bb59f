"""QServe target (W4A8 per channel / progressive g128, W8A8): layout, pipeline, emitter, schema."""
