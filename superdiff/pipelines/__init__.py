"""diffusers pipelines built on the superdiff core."""
