"""Inference backends. One small interface (`base.Backend`), one module per engine."""
