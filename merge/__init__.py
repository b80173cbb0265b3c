"""Stage 2: merge methods, the layer-wise genome, CMA-ES search and weak-label fitness."""
